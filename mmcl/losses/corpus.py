"""Softmax over a corpus: cross-entropy of queries against every row of a (large) candidate table.

The loss of recommenders and retrievers that score a query against a whole catalogue (MMSRec's
cloze fine-tuning: every masked position against all N items). With logits z_ij = s · <q_i, c_j>
over the allowed corpus rows A = {j : corpus_valid_j},

  ℓ_i = log Σ_{j ∈ A} exp(z_ij) − z_{i, t_i},
  L   = Σ_{i ∈ V} w_i ℓ_i / Σ_{i ∈ V} w_i,   V = {i : valid_i ∧ t_i ∈ A},

and, on request, the rank of the target, r_i = |{j ∈ A, j ≠ t_i : z_ij > z_{i,t_i}}| (0 = first;
no gradient), from which Recall@k / NDCG@k follow.

Kernels (the same statistic, the per-query log-sum-exp over A):
  dense   the [B, N] logits in memory, plain autodiff (the reference).
  tiled   the corpus visited in chunks of T rows with a `lax.scan` and an online log-sum-exp; the
          backward pass (`jax.custom_vjp`) recomputes each chunk's logits and forms its gradient

            G_ij = [j ∈ A] ḡ_i · exp(z_ij − lse_i),  ∂/∂q = s · G c,  ∂/∂c = s · Gᵀ q,
            ∂/∂s = Σ_ij G_ij <q_i, c_j>,

          so memory is O((B + N) · D + B · T) instead of O(B · N).
Sharding (`axis_name`, inside `shard_map`; or `corpus_softmax_over_mesh` from outside): the corpus
is split over the devices (device k holds rows k·N_l ... (k+1)·N_l − 1), the queries are the same
on every device. Each device computes the partial log-sum-exp over its own rows and the target
logits it owns; the partials are merged with `pmax`/`psum` over [B] vectors
(collectives.merge_partial_lse), so nothing of size N is ever gathered. JAX differentiates the
merge, and the gradients of the replicated queries are summed over the devices.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mmcl.losses import collectives
from mmcl.losses.common import (AUTO_TILED_MIN_LOGITS, check_block_size, check_embeddings,
                                check_mask, check_scalar, check_weights, finite_or_zero,
                                safe_ratio)
from mmcl.losses.dense import masked_logsumexp, similarity

_IMPLS = ("auto", "dense", "tiled")
_ROW_GRAD = (((1,), (0,)), ((), ()))  # G [B, T] · c [T, D] → [B, D]
_COL_GRAD = (((0,), (0,)), ((), ()))  # Gᵀ q: G [B, T], q [B, D] → [T, D]


def _cdiv(n: int, t: int) -> int:
  return -(-n // t)


def _chunks(x: jax.Array, t: int, fill=0) -> jax.Array:
  """[n, ...] → [ceil(n / t), t, ...], padded at the end with `fill`."""
  n = x.shape[0]
  pad = _cdiv(n, t) * t - n
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
  return x.reshape((-1, t) + x.shape[1:])


def _resolve_impl(impl: str, rows: int, cols: int, where: str) -> str:
  """"auto" → "dense" up to common.AUTO_TILED_MIN_LOGITS logits per device, else "tiled"."""
  if impl not in _IMPLS:
    raise ValueError(f"{where}: impl must be one of {_IMPLS}, got {impl!r}")
  if impl == "auto":
    return "dense" if rows * cols <= AUTO_TILED_MIN_LOGITS else "tiled"
  return impl


# ---------------------------------------------------------------------------------------------
# Per-query log-sum-exp over the allowed corpus rows: dense reference and tiled kernel.


def dense_lse(q: jax.Array, c: jax.Array, scale: jax.Array, allowed: jax.Array) -> jax.Array:
  """log Σ_{j allowed} exp(s · <q_i, c_j>): [B] float32 (−inf when no row is allowed).

  Args:
    q: [B, D] float; c: [N, D] float; scale: [] float32; allowed: [N] bool.
  """
  z = scale * similarity(q, c)
  return masked_logsumexp(z, jnp.broadcast_to(allowed[None, :], z.shape), axis=1)


@dataclasses.dataclass(frozen=True)
class _Plan:
  chunk: int


def tiled_lse(q: jax.Array, c: jax.Array, scale: jax.Array, allowed: jax.Array, *,
              block_size: int, axis_name: collectives.AxisName = None) -> jax.Array:
  """Chunked twin of `dense_lse` (same arguments and result), memory O((B + N)·D + B·T).

  Args:
    q: [B, D] float; c: [N, D] float; scale: [] float32; allowed: [N] bool.
    block_size: the corpus chunk T (min(T, N) rows per step).
    axis_name: the `shard_map` axis the caller runs under, if any (the kernel's inputs are marked
      device-varying so that its gradients type-check; see collectives.as_varying).
  """
  plan = _Plan(chunk=min(block_size, c.shape[0]))
  q, c, scale = (collectives.as_varying(x, axis_name) for x in (q, c, scale))
  return _tiled_lse(plan, q, c, scale, allowed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tiled_lse(plan, q, c, scale, allowed):
  return _lse_forward(plan, q, c, scale, allowed)[0]


def _lse_forward(plan: _Plan, q, c, scale, allowed):
  t = plan.chunk
  c_chunks, ok_chunks = _chunks(c, t), _chunks(allowed, t, fill=False)

  def step(state, chunk_in):
    c_chunk, ok = chunk_in
    zm = jnp.where(ok[None, :], scale * similarity(q, c_chunk), -jnp.inf)  # [B, T]
    run_max, run_sum = state
    new_max = jnp.maximum(run_max, jnp.max(zm, axis=1))
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    run_sum = run_sum * jnp.exp(run_max - shift) + jnp.sum(jnp.exp(zm - shift[:, None]), axis=1)
    return (new_max, run_sum), None

  b = q.shape[0]
  init = (jnp.full((b,), -jnp.inf), jnp.zeros((b,), jnp.float32))
  init = collectives.match_varying(init, (q, c, scale, allowed))
  (run_max, run_sum), _ = lax.scan(step, init, (c_chunks, ok_chunks))
  ok = run_sum > 0
  lse = jnp.where(ok, finite_or_zero(run_max) + jnp.log(jnp.where(ok, run_sum, 1.0)), -jnp.inf)
  return lse, (q, c, scale, allowed, lse)


def _lse_backward(plan: _Plan, residuals, g_lse):
  q, c, scale, allowed, lse = residuals
  t, n, dim = plan.chunk, c.shape[0], q.shape[1]
  c_chunks, ok_chunks = _chunks(c, t), _chunks(allowed, t, fill=False)
  lse0 = finite_or_zero(lse)  # a query with nothing allowed has an all-false mask

  def step(carry, chunk_in):
    dq, ds = carry
    c_chunk, ok = chunk_in
    dots = similarity(q, c_chunk)
    g = jnp.where(ok[None, :], g_lse[:, None] * jnp.exp(scale * dots - lse0[:, None]), 0.0)
    ds = ds + jnp.sum(g * dots)
    g = g.astype(q.dtype)
    dq = dq + lax.dot_general(g, c_chunk, _ROW_GRAD, preferred_element_type=jnp.float32)
    dc = lax.dot_general(g, q, _COL_GRAD, preferred_element_type=jnp.float32)
    return (dq, ds), dc

  init = (jnp.zeros((q.shape[0], dim), jnp.float32), jnp.zeros((), jnp.float32))
  init = collectives.match_varying(init, (q, c, scale, allowed, g_lse))
  (dq, ds), dc = lax.scan(step, init, (c_chunks, ok_chunks))
  dq = (scale * dq).astype(q.dtype)
  dc = (scale * dc.reshape(-1, dim)[:n]).astype(c.dtype)
  return dq, dc, ds.astype(scale.dtype), None


_tiled_lse.defvjp(_lse_forward, _lse_backward)


def _count_above(q, c, scale, allowed, local_target, threshold, block_size: int) -> jax.Array:
  """[B] int32: |{j allowed, j ≠ local_target_i : s <q_i, c_j> > threshold_i}| (no gradient)."""
  q, c, scale, threshold = (lax.stop_gradient(x) for x in (q, c, scale, threshold))
  t = min(block_size, c.shape[0])
  index = _chunks(jnp.arange(c.shape[0], dtype=jnp.int32), t, fill=-1)

  def step(count, chunk_in):
    c_chunk, ok, idx = chunk_in
    z = scale * similarity(q, c_chunk)
    above = ok[None, :] & (idx[None, :] != local_target[:, None]) & (z > threshold[:, None])
    return count + jnp.sum(above, axis=1, dtype=jnp.int32), None

  init = collectives.match_varying(jnp.zeros((q.shape[0],), jnp.int32),
                                   (q, c, scale, allowed, local_target, threshold))
  count, _ = lax.scan(step, init, (_chunks(c, t), _chunks(allowed, t, fill=False), index))
  return count


# ---------------------------------------------------------------------------------------------
# The loss.


def corpus_softmax(queries: jax.Array, corpus: jax.Array, targets: jax.Array, *,
                   logit_scale: jax.Array | float, valid: jax.Array | None = None,
                   corpus_valid: jax.Array | None = None, weights: jax.Array | None = None,
                   impl: str = "auto", block_size: int | None = None,
                   return_ranks: bool = False, axis_name: collectives.AxisName = None):
  r"""Cross-entropy of each query against the whole corpus, its target row being the positive.

  L = Σ_{i ∈ V} w_i (log Σ_{j ∈ A} exp(z_ij) − z_{i,t_i}) / Σ_{i ∈ V} w_i, z = s · q cᵀ, with
  A = {j : corpus_valid_j} and V = {i : valid_i ∧ t_i ∈ A} (see the module docstring). 0 with zero
  gradients when V is empty.

  Args:
    queries: [B, D] float, e.g. sequence representations at the masked positions (L2-normalised
      for a cosine softmax).
    corpus: [N, D] float, every candidate's embedding (same dtype and D); under `axis_name`, this
      device's N_l rows of the N_l · n_devices global corpus.
    targets: [B] int, the global corpus row of each query's positive.
    logit_scale: [] float, s = 1/τ (differentiable).
    valid: [B] bool or None (all true), queries that count.
    corpus_valid: [N] bool or None (all true), rows that are candidates (e.g. padding and items
      held out of training are false); under `axis_name`, this device's rows.
    weights: [B] float ≥ 0 or None (all 1).
    impl: "dense" (the [B, N] logits in memory), "tiled" (corpus chunks of `block_size` rows,
      memory O(B · T)) or "auto" (dense up to common.AUTO_TILED_MIN_LOGITS logits per device).
    block_size: corpus chunk T of the tiled kernel (None: common.default_block_size()).
    return_ranks: also return the [B] int32 rank of each target (0 = scored first; ties count
      in its favour), computed without gradient.
    axis_name: inside `shard_map`: the mesh axis (or axes) the corpus is split over; `queries`,
      `targets`, `valid`, `weights` and the result are the same on every device.

  Returns:
    [] float32 loss, or (loss, ranks [B] int32) with `return_ranks`.
  """
  where = "mmcl.losses.corpus_softmax"
  check_embeddings(queries, "queries", where)
  check_embeddings(corpus, "corpus", where)
  b, d = queries.shape
  n_local = corpus.shape[0]
  if corpus.shape[1] != d or corpus.dtype != queries.dtype:
    raise ValueError(f"{where}: `corpus` {tuple(corpus.shape)} {corpus.dtype} must be [N, {d}] of "
                     f"the dtype of `queries` ({queries.dtype})")
  if tuple(getattr(targets, "shape", ())) != (b,) or not jnp.issubdtype(targets.dtype,
                                                                         jnp.integer):
    raise ValueError(f"{where}: `targets` must be a [{b}] integer array, got "
                     f"{getattr(targets, 'shape', type(targets).__name__)}")
  scale = check_scalar(logit_scale, "logit_scale", where)
  valid = check_mask(valid, b, "valid", where)
  corpus_valid = check_mask(corpus_valid, n_local, "corpus_valid", where)
  weights = check_weights(weights, b, "weights", where)
  impl = _resolve_impl(impl, b, n_local, where)
  block_size = check_block_size(block_size, where)

  # The target logits, from the device that owns each target row (nothing of size N moves).
  local_t = targets.astype(jnp.int32) - collectives.row_offset(n_local, axis_name)
  owned = (local_t >= 0) & (local_t < n_local)
  safe_t = jnp.clip(local_t, 0, n_local - 1)
  target_dot = jnp.sum(queries.astype(jnp.float32) * corpus[safe_t].astype(jnp.float32), -1)
  target_z = collectives.global_sum(jnp.where(owned, scale * target_dot, 0.0), axis_name)
  target_ok = collectives.global_sum((owned & corpus_valid[safe_t]).astype(jnp.int32),
                                     axis_name) > 0

  if impl == "dense":
    partial = dense_lse(queries, corpus, scale, corpus_valid)
  else:
    partial = tiled_lse(queries, corpus, scale, corpus_valid, block_size=block_size,
                        axis_name=axis_name)
  lse = collectives.merge_partial_lse(partial, axis_name)

  use = valid & target_ok
  w = jnp.where(use, weights, 0.0)
  per_query = finite_or_zero(lse) - target_z
  loss = safe_ratio(jnp.sum(jnp.where(use, w * per_query, 0.0)), jnp.sum(w))
  if not return_ranks:
    return loss
  ranks = _count_above(queries, corpus, scale, corpus_valid, jnp.where(owned, local_t, -1),
                       target_z, block_size if impl == "tiled" else n_local)
  return loss, collectives.global_sum(ranks, axis_name)


def corpus_softmax_over_mesh(queries: jax.Array, corpus: jax.Array, targets: jax.Array,
                             mesh: Mesh, axis_name: collectives.AxisName = "data", *,
                             logit_scale: jax.Array | float, valid: jax.Array | None = None,
                             corpus_valid: jax.Array | None = None,
                             weights: jax.Array | None = None, impl: str = "auto",
                             block_size: int | None = None, return_ranks: bool = False):
  """`corpus_softmax` with the corpus split over `axis_name` of `mesh` (queries replicated).

  N need not be divisible by the number of devices: the corpus is padded with rows that are never
  candidates. Callable under `jax.jit` and differentiable from outside; returns what
  `corpus_softmax` returns, replicated.
  """
  where = "mmcl.losses.corpus_softmax_over_mesh"
  axes = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
  missing = [ax for ax in axes if ax not in mesh.shape]
  if missing:
    raise ValueError(f"{where}: axis {missing} not in the mesh axes {tuple(mesh.shape)}")
  check_embeddings(corpus, "corpus", where)
  n = corpus.shape[0]
  n_dev = math.prod(mesh.shape[ax] for ax in axes)
  corpus_valid = check_mask(corpus_valid, n, "corpus_valid", where)
  pad = _cdiv(n, n_dev) * n_dev - n
  if pad:
    corpus = jnp.pad(corpus, ((0, pad), (0, 0)))
    corpus_valid = jnp.pad(corpus_valid, (0, pad), constant_values=False)
  spec = P(axes if len(axes) > 1 else axes[0])
  scale = jnp.asarray(logit_scale, jnp.float32)
  replicated = dict(queries=queries, targets=targets, valid=valid, weights=weights,
                    logit_scale=scale)
  replicated = {k: v for k, v in replicated.items() if v is not None}

  def per_device(corpus, corpus_valid, rep):
    return corpus_softmax(corpus=corpus, corpus_valid=corpus_valid, **rep, impl=impl,
                          block_size=block_size, return_ranks=return_ranks,
                          axis_name=axis_name)

  out_specs = (P(), P()) if return_ranks else P()
  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, {k: P() for k in replicated}),
                       out_specs=out_specs)(corpus, corpus_valid, replicated)
