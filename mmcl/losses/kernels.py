"""Chooses the dense, tiled or fused kernel and lays out the (possibly sharded) rows and columns.

Every loss computes statistics of one logit block: rows = this device's B_l anchors, columns = all
B_g candidates (gathered across `axis_name`, B_g = B_l without one). `Layout` holds the metadata of
both sides, with global indices so that "pair i is the positive of anchor i" means the same thing
on every device.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mmcl.losses import collectives, dense, fused, tiled
from mmcl.losses.common import PairRule, SideMeta, check_block_size, resolve_impl


class Layout(NamedTuple):
  """The two sides of the logit block and how to compute it.

  Attributes:
    rows: metadata of the B_l local rows (global indices offset + 0 .. B_l − 1).
    cols: metadata of the B_g columns (global indices 0 .. B_g − 1).
    impl: "dense", "tiled" or "fused".
    block_size: tile edge of the tiled or fused kernel (None with "fused": fused.default_tile(D)).
    axis_name: the `shard_map` axis, or None.
  """
  rows: SideMeta
  cols: SideMeta
  impl: str
  block_size: int | None
  axis_name: collectives.AxisName


def make_layout(num_local: int, *, valid_rows: jax.Array, valid_cols: jax.Array,
                groups: jax.Array | None = None, labels: jax.Array | None = None,
                label_ok: jax.Array | None = None, impl: str, block_size: int | None,
                axis_name: collectives.AxisName, where: str) -> Layout:
  """Builds the row/column metadata from local per-row arrays, gathering the column side.

  Args:
    num_local: B_l, the local batch.
    valid_rows: [B_l] bool, rows that may be anchors (row side validity).
    valid_cols: [B_l] bool, local rows that may be candidates (gathered into the column side).
    groups: [B_l, K] int32 or None, duplicate-group ids (see common.SideMeta).
    labels: [B_l] int32 or None; label_ok: [B_l] bool or None (SupCon positives).
    impl: "auto" | "dense" | "tiled" | "fused" (see common.resolve_impl).
    block_size: tile edge, None for the default.
    axis_name: the `shard_map` axis, or None.
    where: the public function's name, for error messages.
  """
  num_global = num_local * collectives.axis_size(axis_name)
  offset = collectives.row_offset(num_local, axis_name)
  rows = SideMeta(index=offset + jnp.arange(num_local, dtype=jnp.int32), valid=valid_rows,
                  groups=groups, labels=labels, label_ok=label_ok)
  g = lambda x: collectives.gather(x, axis_name)  # noqa: E731
  cols = SideMeta(index=jnp.arange(num_global, dtype=jnp.int32), valid=g(valid_cols),
                  groups=g(groups), labels=g(labels), label_ok=g(label_ok))
  impl = resolve_impl(impl, num_local, num_global, where)
  if impl == "fused":
    block_size = fused.check_tile(block_size, where)
  else:
    block_size = check_block_size(block_size, where)
  return Layout(rows=rows, cols=cols, impl=impl, block_size=block_size, axis_name=axis_name)


def softmax_stats(layout: Layout, a: jax.Array, b_all: jax.Array, scale: jax.Array, *,
                  rule: PairRule, want_cols: bool = False,
                  want_pos: bool = False) -> dense.SoftmaxStats:
  """Softmax statistics of z = s · a b_allᵀ (a: [B_l, D], b_all: [B_g, D]) with any kernel."""
  if layout.impl == "dense":
    return dense.softmax_stats(a, b_all, scale, layout.rows, layout.cols, rule=rule,
                               want_cols=want_cols, want_pos=want_pos)
  if layout.impl == "fused":
    return fused.softmax_stats(a, b_all, scale, layout.rows, layout.cols, rule=rule,
                               want_cols=want_cols, want_pos=want_pos,
                               block_size=layout.block_size, axis_name=layout.axis_name)
  return tiled.softmax_stats(a, b_all, scale, layout.rows, layout.cols, rule=rule,
                             want_cols=want_cols, want_pos=want_pos,
                             block_size=layout.block_size, axis_name=layout.axis_name)


def sigmoid_row_sums(layout: Layout, a: jax.Array, b_all: jax.Array, scale: jax.Array,
                     bias: jax.Array, *, rule: PairRule) -> jax.Array:
  """SigLIP row sums of z = s · a b_allᵀ + c with any kernel: [B_l] float32."""
  if layout.impl == "dense":
    return dense.sigmoid_row_sums(a, b_all, scale, bias, layout.rows, layout.cols, rule=rule)
  if layout.impl == "fused":
    return fused.sigmoid_row_sums(a, b_all, scale, bias, layout.rows, layout.cols, rule=rule,
                                  block_size=layout.block_size, axis_name=layout.axis_name)
  return tiled.sigmoid_row_sums(a, b_all, scale, bias, layout.rows, layout.cols, rule=rule,
                                block_size=layout.block_size, axis_name=layout.axis_name)
