"""The collective steps a loss takes when it runs inside `shard_map` over a data axis.

Every device holds B_l rows of the global batch (B_g = n_devices · B_l, device k owns global rows
k·B_l ... (k+1)·B_l − 1). A loss then looks at the rectangular logit block [B_l local rows, B_g
columns]: the columns are all devices' candidates, gathered with `all_gather(tiled=True)`. JAX
differentiates the gather into a reduce-scatter, so the gradient contributions a device computes for
other devices' columns are summed back onto the devices that own them. Column-direction statistics
(CLIP's b→a softmax) are per-device partial log-sum-exps over the local rows, merged with `pmax` and
`psum` over B_g-long vectors (cheap next to gathering [B_g, D]).

With `axis_name=None` every helper is the identity and B_g = B_l.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

AxisName = Hashable | Sequence[Hashable] | None


def _axes(axis_name: AxisName) -> tuple[Hashable, ...]:
  if axis_name is None:
    return ()
  if isinstance(axis_name, (tuple, list)):
    return tuple(axis_name)
  return (axis_name,)


def axis_size(axis_name: AxisName) -> int:
  """Number of devices along `axis_name` (1 without one)."""
  if axis_name is None:
    return 1
  return lax.axis_size(axis_name)


def row_offset(num_local: int, axis_name: AxisName) -> jax.Array | int:
  """Global index of this device's first row: axis_index · B_l (0 without an axis)."""
  if axis_name is None:
    return 0
  return lax.axis_index(axis_name) * num_local


def gather(x: jax.Array | None, axis_name: AxisName) -> jax.Array | None:
  """[B_l, ...] → [B_g, ...]: all devices' rows in global order (differentiable)."""
  if x is None or axis_name is None:
    return x
  return lax.all_gather(x, axis_name, axis=0, tiled=True)


def global_sum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """Sum over the devices of `axis_name` (identity without one)."""
  if axis_name is None:
    return x
  return lax.psum(x, axis_name)


def local_slice(x: jax.Array, num_local: int, axis_name: AxisName) -> jax.Array:
  """[B_g, ...] → this device's [B_l, ...] rows."""
  if axis_name is None:
    return x
  return lax.dynamic_slice_in_dim(x, row_offset(num_local, axis_name), num_local, axis=0)


def merge_partial_lse(partial: jax.Array, axis_name: AxisName) -> jax.Array:
  """Merges per-device log-sum-exps: log Σ_devices exp(partial_k) (−inf where all are −inf).

  Args:
    partial: [n] float32, this device's log-sum-exp over its own rows for each of n columns
      (−inf for an empty set).
    axis_name: the devices to merge over.

  Returns:
    [n] float32, the log-sum-exp over the union of all devices' rows.
  """
  if axis_name is None:
    return partial
  # The shift cancels exactly; it only keeps exp() in range, so no gradient flows through it.
  shift = lax.pmax(lax.stop_gradient(partial), axis_name)
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  total = lax.psum(jnp.exp(partial - shift), axis_name)
  ok = total > 0
  return jnp.where(ok, shift + jnp.log(jnp.where(ok, total, 1.0)), -jnp.inf)


def varying_axes(x: jax.Array) -> frozenset:
  """Mesh axes `x` is typed as varying over (none outside `shard_map` or with check_vma=False)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
  return frozenset(vma)


def match_varying(tree, *refs):
  """Casts every leaf of `tree` to vary over every axis any leaf of `refs` varies over.

  The initial carry of a `lax.scan` inside `shard_map` must already have the varying-ness of what
  the body makes of it (values computed from the device-varying inputs); freshly made constants
  do not. Outside `shard_map` nothing varies and this is the identity.
  """
  wanted = frozenset()
  for leaf in jax.tree.leaves(refs):
    wanted |= varying_axes(leaf)
  if not wanted:
    return tree

  def cast(x):
    missing = tuple(ax for ax in sorted(wanted, key=str) if ax not in varying_axes(x))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def as_varying(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """Marks `x` as device-varying along `axis_name` (a no-op when it already is).

  A `custom_vjp` kernel inside `shard_map` must return cotangents of the same varying-ness as
  its inputs. Its cotangent for a replicated scalar such as `logit_scale` is a per-device partial
  sum, so the scalar is cast to varying first; JAX transposes that cast into the `psum` that adds
  the partial gradients of all devices.
  """
  present = varying_axes(x)
  for axis in _axes(axis_name):
    if axis not in present:
      x = lax.pcast(x, axis, to="varying")
  return x
