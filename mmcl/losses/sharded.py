"""Losses over globally sharded arrays: wrap the loss in `shard_map` over a mesh's data axis.

The trainer holds batch arrays sharded along their first axis over `axis_name` of a
`jax.sharding.Mesh` and calls these under `jax.jit`. Each device then computes the loss of its own
rows against every device's rows (see collectives.py for the gather and how gradients flow back);
the result is the global loss, replicated, and differentiable with `jax.grad` from outside.

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  loss = jax.jit(lambda a, b, s: infonce_over_mesh(a, b, mesh, logit_scale=s))(a, b, s)

Inside an existing `shard_map`, call `mmcl.losses.infonce(..., axis_name="data")` directly.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mmcl.losses import collectives, fused
from mmcl.losses import corpus
from mmcl.losses.infonce import infonce
from mmcl.losses.multimodal import multimodal_infonce
from mmcl.losses.sigmoid import sigmoid_loss
from mmcl.losses.supcon import supcon


def _over_mesh(loss_fn: Callable[..., Any], mesh: Mesh, axis_name: collectives.AxisName,
               sharded: dict[str, Any], replicated: dict[str, Any], static: dict[str, Any],
               where: str):
  """Runs loss_fn(**sharded, **replicated, **static, axis_name=axis_name) under shard_map.

  Args:
    loss_fn: a loss of this package.
    mesh: the device mesh.
    axis_name: the mesh axis (or tuple of axes) the batch dimension is split over.
    sharded: batch-major arrays (pytrees of them), split along their first axis; None entries are
      dropped.
    replicated: scalars, given to every device whole.
    static: non-array options, closed over.
    where: the public name, for errors.
  """
  axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  missing = [ax for ax in axes if ax not in mesh.shape]
  if missing:
    raise ValueError(f"{where}: axis {missing} not in the mesh axes {tuple(mesh.shape)}")
  num_devices = math.prod(mesh.shape[ax] for ax in axes)
  sharded = {k: v for k, v in sharded.items() if v is not None}
  for key, tree in sharded.items():
    for leaf in jax.tree.leaves(tree):
      if leaf.ndim == 0 or leaf.shape[0] % num_devices:
        raise ValueError(f"{where}: the batch dimension of `{key}` ({tuple(leaf.shape)}) must be "
                         f"divisible by the {num_devices} devices of mesh axis {axis_name!r}")
  replicated = {k: jnp.asarray(v, jnp.float32) if isinstance(v, (int, float)) else v
                for k, v in replicated.items()}
  spec = P(axes if len(axes) > 1 else axes[0])

  def per_device(sharded_args, replicated_args):
    return loss_fn(**sharded_args, **replicated_args, **static, axis_name=axis_name)

  in_specs = ({k: spec for k in sharded}, {k: P() for k in replicated})
  # Off a GPU the fused kernels run in Pallas interpret mode, which cannot evaluate kernels on
  # device-varying types (see fused._check_interpretable); without the check the losses' values
  # and gradients are the same.
  check_vma = not (static.get("impl") == "fused" and fused.default_interpret())
  return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=P(),
                       check_vma=check_vma)(sharded, replicated)


def infonce_over_mesh(a: jax.Array, b: jax.Array, mesh: Mesh,
                      axis_name: collectives.AxisName = "data", *,
                      logit_scale: jax.Array | float, weights: jax.Array | None = None,
                      a_valid: jax.Array | None = None, b_valid: jax.Array | None = None,
                      group_ids: jax.Array | None = None, impl: str = "auto",
                      block_size: int | None = None) -> jax.Array:
  """`infonce` on [B, D] arrays sharded (or to be sharded) over `axis_name` of `mesh`.

  B must be divisible by the number of devices on `axis_name`. Returns the [] float32 global loss.
  """
  return _over_mesh(infonce, mesh, axis_name,
                    dict(a=a, b=b, weights=weights, a_valid=a_valid, b_valid=b_valid,
                         group_ids=group_ids),
                    dict(logit_scale=logit_scale), dict(impl=impl, block_size=block_size),
                    "mmcl.losses.sharded.infonce_over_mesh")


def sigmoid_loss_over_mesh(a: jax.Array, b: jax.Array, mesh: Mesh,
                           axis_name: collectives.AxisName = "data", *,
                           logit_scale: jax.Array | float, logit_bias: jax.Array | float,
                           weights: jax.Array | None = None, a_valid: jax.Array | None = None,
                           b_valid: jax.Array | None = None, group_ids: jax.Array | None = None,
                           impl: str = "auto", block_size: int | None = None) -> jax.Array:
  """`sigmoid_loss` on [B, D] arrays sharded over `axis_name` of `mesh`; [] float32."""
  return _over_mesh(sigmoid_loss, mesh, axis_name,
                    dict(a=a, b=b, weights=weights, a_valid=a_valid, b_valid=b_valid,
                         group_ids=group_ids),
                    dict(logit_scale=logit_scale, logit_bias=logit_bias),
                    dict(impl=impl, block_size=block_size),
                    "mmcl.losses.sharded.sigmoid_loss_over_mesh")


def supcon_over_mesh(z: jax.Array, mesh: Mesh, axis_name: collectives.AxisName = "data", *,
                     logit_scale: jax.Array | float, clip_ids: jax.Array,
                     exclude: jax.Array | None = None, valid: jax.Array | None = None,
                     impl: str = "auto", block_size: int | None = None) -> jax.Array:
  """`supcon` on [N, D] views sharded over `axis_name` of `mesh`; [] float32."""
  return _over_mesh(supcon, mesh, axis_name,
                    dict(z=z, clip_ids=clip_ids, exclude=exclude, valid=valid),
                    dict(logit_scale=logit_scale), dict(impl=impl, block_size=block_size),
                    "mmcl.losses.sharded.supcon_over_mesh")


def multimodal_infonce_over_mesh(embeddings: Mapping[str, jax.Array],
                                 valid: Mapping[str, jax.Array] | None, mesh: Mesh,
                                 axis_name: collectives.AxisName = "data", *,
                                 logit_scale: jax.Array | float, pairs=None,
                                 weights: jax.Array | None = None,
                                 group_ids: jax.Array | None = None, impl: str = "auto",
                                 block_size: int | None = None,
                                 return_pair_losses: bool = False):
  """`multimodal_infonce` on dicts of [B, D] / [B] arrays sharded over `axis_name` of `mesh`."""
  return _over_mesh(multimodal_infonce, mesh, axis_name,
                    dict(embeddings=dict(embeddings), valid=None if valid is None else dict(valid),
                         weights=weights, group_ids=group_ids),
                    dict(logit_scale=logit_scale),
                    dict(pairs=pairs, impl=impl, block_size=block_size,
                         return_pair_losses=return_pair_losses),
                    "mmcl.losses.sharded.multimodal_infonce_over_mesh")


# The corpus (not the batch) is split over the devices; see corpus.py.
corpus_softmax_over_mesh = corpus.corpus_softmax_over_mesh
