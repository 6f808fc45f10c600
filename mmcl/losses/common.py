"""Pieces shared by every contrastive loss: entry checks, pair metadata, pair masks, impl choice.

A contrastive loss looks at a logit matrix z[i, j] = s · <a_i, b_j> (+ c) whose rows are the local
anchors and whose columns are the candidates (all devices' candidates when sharded). What differs
between losses is which pairs take part and which are positive; both are decided here, from small
per-row metadata, so that the dense and tiled kernels build identical masks block by block.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

IMPLS = ("auto", "dense", "tiled", "fused")

# impl="auto" switches to the tiled kernel (the fused one on a GPU) once the per-device logit block
# [B_local, B_global] has more than this many entries (4096 x 4096: a 64 MiB float32 matrix, plus a
# few temporaries of the same size in the backward pass). Below it the dense kernel is as fast and
# compiles faster.
AUTO_TILED_MIN_LOGITS = 4096 * 4096

# Default tile edge of the tiled kernel. On accelerators, larger tiles keep the matmul units busy
# (the per-tile temporaries, ~6 · T² · 4 bytes, stay well under 1 GiB); on CPU smaller tiles keep
# the working set in cache.
DEFAULT_BLOCK_SIZE_ACCELERATOR = 4096
DEFAULT_BLOCK_SIZE_CPU = 1024


class SideMeta(NamedTuple):
  """Per-row metadata of one side (rows or columns) of the logit matrix; a pytree of arrays.

  Attributes:
    index: [n] int32, the global batch index of each row (the diagonal is index_row == index_col).
    valid: [n] bool, rows that take any part in the loss.
    groups: [n, K] int32 or None. Pairs i != j sharing a non-negative id in any of the K columns are
      removed from each other's denominators (duplicates); negative ids match nothing.
    labels: [n] int32 or None, the class (clip) id used by label-defined positives (SupCon).
    label_ok: [n] bool or None, rows that may take part in a positive pair (SupCon's `exclude`).
  """
  index: jax.Array
  valid: jax.Array
  groups: jax.Array | None = None
  labels: jax.Array | None = None
  label_ok: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class PairRule:
  """Static description of which pairs take part and which are positive.

  Attributes:
    exclude_self: the pair (i, i) never takes part (SupCon's denominator runs over j != i).
    positives: "diagonal" (pair i is the positive of anchor i: CLIP, SigLIP) or "labels" (j != i
      with the same label, both with label_ok: SupCon).
  """
  exclude_self: bool = False
  positives: str = "diagonal"

  def __post_init__(self):
    if self.positives not in ("diagonal", "labels"):
      raise ValueError(f"PairRule.positives must be 'diagonal' or 'labels', got {self.positives!r}")


DIAGONAL = PairRule(exclude_self=False, positives="diagonal")
SUPCON = PairRule(exclude_self=True, positives="labels")


def pair_masks(rows: SideMeta, cols: SideMeta, rule: PairRule) -> tuple[jax.Array, jax.Array]:
  """Masks of one [R, C] block of pairs.

  Args:
    rows: metadata of the R rows of the block.
    cols: metadata of the C columns of the block.
    rule: which pairs take part and which are positive.

  Returns:
    allowed: [R, C] bool, the pair takes part (is in the softmax denominator / summed by SigLIP).
    positive: [R, C] bool, the pair is a positive (always a subset of `allowed`).
  """
  same = rows.index[:, None] == cols.index[None, :]
  allowed = rows.valid[:, None] & cols.valid[None, :]
  if rule.exclude_self:
    allowed = allowed & ~same
  if rows.groups is not None:
    duplicate = jnp.zeros_like(allowed)
    # One [R, C] comparison per id column keeps the temporary at block size (no [R, C, K]).
    for k in range(rows.groups.shape[1]):
      gr, gc = rows.groups[:, k], cols.groups[:, k]
      duplicate = duplicate | ((gr[:, None] == gc[None, :]) & (gr[:, None] >= 0))
    allowed = allowed & (same | ~duplicate)
  if rule.positives == "diagonal":
    positive = allowed & same
  else:
    positive = (allowed & ~same & (rows.labels[:, None] == cols.labels[None, :])
                & rows.label_ok[:, None] & cols.label_ok[None, :])
  return allowed, positive


def pad_side(meta: SideMeta, n: int) -> SideMeta:
  """Pads every field of `meta` from m to n rows with rows that take no part in anything."""
  m = meta.index.shape[0]
  if n == m:
    return meta

  def pad(x, value):
    if x is None:
      return None
    widths = [(0, n - m)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)

  return SideMeta(index=pad(meta.index, -1), valid=pad(meta.valid, False),
                  groups=pad(meta.groups, -1), labels=pad(meta.labels, -1),
                  label_ok=pad(meta.label_ok, False))


def resolve_impl(impl: str, rows: int, cols: int, where: str) -> str:
  """Maps the user's `impl` to "dense", "tiled" or "fused" for an [rows, cols] logit block.

  "auto" is "dense" up to AUTO_TILED_MIN_LOGITS entries; above, "fused" (the Pallas kernels of
  fused.py) on a GPU where they passed a one-time check on the device (`probe.fused_usable`:
  they compile and agree with the tiled kernel), and "tiled" (plain XLA) otherwise. An explicit
  "fused" off a GPU runs the kernels in Pallas interpret mode: exact, but slow (meant for tests).
  """
  if impl not in IMPLS:
    raise ValueError(f"{where}: impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    if rows * cols <= AUTO_TILED_MIN_LOGITS:
      return "dense"
    if jax.default_backend() == "gpu":
      from mmcl.losses import probe  # pylint: disable=g-import-not-at-top (probe uses infonce)
      return "fused" if probe.fused_usable() else "tiled"
    return "tiled"
  return impl


def default_block_size() -> int:
  """Tile edge used when `block_size` is None (see DEFAULT_BLOCK_SIZE_*)."""
  if jax.default_backend() == "cpu":
    return DEFAULT_BLOCK_SIZE_CPU
  return DEFAULT_BLOCK_SIZE_ACCELERATOR


def check_block_size(block_size: int | None, where: str) -> int:
  """Returns a positive tile edge, the default one when `block_size` is None."""
  if block_size is None:
    return default_block_size()
  if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
    raise ValueError(f"{where}: block_size must be a positive int or None, got {block_size!r}")
  return block_size


# ---------------------------------------------------------------------------------------------
# Entry checks. Each raises with what was expected, what was found, and which argument it was.


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", ()))


def check_embeddings(x: Any, name: str, where: str) -> jax.Array:
  """Checks `x` is a [B, D] floating array."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{where}: `{name}` must be a [B, D] array, got {type(x).__name__}")
  if x.ndim != 2:
    raise ValueError(f"{where}: `{name}` must be [B, D] (2-D), got shape {_shape(x)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{where}: `{name}` must be floating point, got dtype {x.dtype}")
  return x


def check_pair(a: Any, b: Any, where: str, names=("a", "b")) -> tuple[int, int]:
  """Checks `a` and `b` are [B, D] floating arrays of one shape and dtype; returns (B, D)."""
  check_embeddings(a, names[0], where)
  check_embeddings(b, names[1], where)
  if a.shape != b.shape:
    raise ValueError(f"{where}: `{names[0]}` and `{names[1]}` must have the same shape [B, D], "
                     f"got {_shape(a)} and {_shape(b)}")
  if a.dtype != b.dtype:
    raise TypeError(f"{where}: `{names[0]}` and `{names[1]}` must have the same dtype, "
                    f"got {a.dtype} and {b.dtype}")
  return a.shape[0], a.shape[1]


def check_scalar(x: Any, name: str, where: str) -> jax.Array:
  """Checks `x` is a real scalar (python number or shape-() float array); returns float32 []."""
  if isinstance(x, (int, float)) and not isinstance(x, bool):
    return jnp.asarray(x, jnp.float32)
  if not hasattr(x, "shape") or _shape(x) != ():
    raise ValueError(f"{where}: `{name}` must be a scalar (shape ()), got shape {_shape(x)} "
                     f"of type {type(x).__name__}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{where}: `{name}` must be floating point, got dtype {x.dtype}")
  return x.astype(jnp.float32)


def check_mask(x: Any, n: int, name: str, where: str) -> jax.Array:
  """Checks `x` is None (all true) or a [n] bool array; returns [n] bool."""
  if x is None:
    return jnp.ones((n,), jnp.bool_)
  if _shape(x) != (n,):
    raise ValueError(f"{where}: `{name}` must have shape ({n},) to match the batch, "
                     f"got {_shape(x)}")
  if x.dtype != jnp.bool_:
    raise TypeError(f"{where}: `{name}` must be a bool array, got dtype {x.dtype}")
  return x


def check_weights(x: Any, n: int, name: str, where: str) -> jax.Array:
  """Checks `x` is None (all ones) or a [n] floating array of non-negative weights; returns f32."""
  if x is None:
    return jnp.ones((n,), jnp.float32)
  if _shape(x) != (n,):
    raise ValueError(f"{where}: `{name}` must have shape ({n},) to match the batch, "
                     f"got {_shape(x)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{where}: `{name}` must be floating point, got dtype {x.dtype}")
  return x.astype(jnp.float32)


def check_ids(x: Any, n: int, name: str, where: str, allow_2d: bool) -> jax.Array:
  """Checks integer ids of shape [n] (or [n, K] when `allow_2d`); returns int32 [n] / [n, K]."""
  shape = _shape(x)
  ok = shape == (n,) or (allow_2d and len(shape) == 2 and shape[0] == n)
  if not ok:
    want = f"({n},) or ({n}, K)" if allow_2d else f"({n},)"
    raise ValueError(f"{where}: `{name}` must have shape {want} to match the batch, got {shape}")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{where}: `{name}` must be an integer array, got dtype {x.dtype}")
  return x.astype(jnp.int32)


def safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 (with zero gradients) where den == 0 (nothing took part)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def finite_or_zero(x: jax.Array) -> jax.Array:
  """Replaces ±inf (the log-sum-exp of an empty set) by 0 so that masked terms cannot make NaNs."""
  return jnp.where(jnp.isfinite(x), x, 0.0)
