"""Dense reference kernels: the whole [R, C] logit block in memory, gradients by plain autodiff.

These are the readable definitions that the tiled kernels (tiled.py) must reproduce exactly. Both
take the same arguments and return the same statistics, so a loss swaps one for the other.
Memory: O(R · C) (the block and a few temporaries of its size).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mmcl.losses.common import PairRule, SideMeta, pair_masks


class SoftmaxStats(NamedTuple):
  """Row (and optionally column) statistics of a masked logit block z [R, C].

  Attributes:
    row_lse: [R] float32, log Σ_{j allowed} exp(z_ij); −inf for a row with no allowed pair.
    col_lse: [C] float32 or None, log Σ_{i allowed} exp(z_ij); −inf for an empty column.
    pos_sum: [R] float32 or None, Σ_{j positive} z_ij.
    pos_count: [R] float32 or None, |{j positive}| (no gradient).
  """
  row_lse: jax.Array
  col_lse: jax.Array | None = None
  pos_sum: jax.Array | None = None
  pos_count: jax.Array | None = None


def similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """a: [R, D], b: [C, D] → <a_i, b_j>: [R, C] float32 (accumulated in float32 for any input)."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def masked_logsumexp(z: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """log Σ_{mask} exp(z) along `axis`; −inf for an all-false slice, with finite gradients.

  Args:
    z: [R, C] float32.
    mask: [R, C] bool.
    axis: the axis reduced.
  """
  zm = jnp.where(mask, z, -jnp.inf)
  shift = lax.stop_gradient(jnp.max(zm, axis=axis, keepdims=True))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  # exp(−inf) = 0 with a zero derivative, so masked entries carry neither value nor gradient.
  total = jnp.sum(jnp.exp(zm - shift), axis=axis)
  ok = total > 0
  return jnp.where(ok, jnp.log(jnp.where(ok, total, 1.0)) + jnp.squeeze(shift, axis), -jnp.inf)


def softmax_stats(a: jax.Array, b: jax.Array, scale: jax.Array, rows: SideMeta, cols: SideMeta, *,
                  rule: PairRule, want_cols: bool, want_pos: bool) -> SoftmaxStats:
  """Statistics of the softmax losses over z = s · a bᵀ, masked by `rule`.

  Args:
    a: [R, D] float, the row embeddings (this device's anchors).
    b: [C, D] float, the column embeddings (all candidates).
    scale: [] float32, the logit scale s.
    rows: metadata of the R rows; cols: metadata of the C columns.
    rule: which pairs take part and which are positive (common.pair_masks).
    want_cols: also return the column log-sum-exps.
    want_pos: also return the positive sums and counts.

  Returns:
    SoftmaxStats (see its fields).
  """
  z = scale * similarity(a, b)
  allowed, positive = pair_masks(rows, cols, rule)
  row_lse = masked_logsumexp(z, allowed, axis=1)
  col_lse = masked_logsumexp(z, allowed, axis=0) if want_cols else None
  pos_sum = pos_count = None
  if want_pos:
    pos_sum = jnp.sum(jnp.where(positive, z, 0.0), axis=1)
    pos_count = jnp.sum(positive, axis=1).astype(jnp.float32)
  return SoftmaxStats(row_lse, col_lse, pos_sum, pos_count)


def sigmoid_row_sums(a: jax.Array, b: jax.Array, scale: jax.Array, bias: jax.Array,
                     rows: SideMeta, cols: SideMeta, *, rule: PairRule) -> jax.Array:
  """Per-row SigLIP sums: Σ_{j allowed} −log σ(y_ij · z_ij), z = s · a bᵀ + c.

  Args:
    a: [R, D] float; b: [C, D] float.
    scale: [] float32, s; bias: [] float32, c.
    rows, cols: metadata of the rows and columns.
    rule: y_ij = +1 for positive pairs, −1 otherwise; pairs not allowed are skipped.

  Returns:
    [R] float32.
  """
  z = scale * similarity(a, b) + bias
  allowed, positive = pair_masks(rows, cols, rule)
  signs = jnp.where(positive, 1.0, -1.0)
  # −log σ(y z) = softplus(−y z), stable for any z.
  return jnp.sum(jnp.where(allowed, jax.nn.softplus(-signs * z), 0.0), axis=1)
