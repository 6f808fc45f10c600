"""Tiled kernels: the same statistics as dense.py, with memory linear in the batch.

The [R, C] logit block is visited in [T_r, T_c] tiles (two nested `lax.scan`s; R and C need not
be multiples of the tile, the tail is padded with rows that take part in nothing). The forward
pass keeps running log-sum-exps for both directions at once (the online softmax of Milakov &
Gimelshein 2018):

  row i:    m_i ← max(m_i, max_j z_ij),  l_i ← l_i · e^{m_i,old − m_i} + Σ_j e^{z_ij − m_i}
  column j: the same along the other axis, carried across row tiles,

so one pass over the tiles yields row_lse_i = m_i + log l_i and col_lse_j. Nothing of size R × C
is stored: the backward pass (a `jax.custom_vjp`) recomputes each tile's logits and forms the
logit gradient of that tile only,

  G_ij = [allowed_ij] (ḡ^row_i · e^{z_ij − row_lse_i} + ḡ^col_j · e^{z_ij − col_lse_j})
         + [positive_ij] ḡ^pos_i,
  ∂/∂a = s · G b,  ∂/∂b = s · Gᵀ a,  ∂/∂s = Σ_ij G_ij <a_i, b_j>,

accumulating ∂/∂a over column tiles and ∂/∂b over row tiles. Memory: O((R + C) · D + T_r · T_c);
compute: the forward matmul once, the backward three times (one recomputation, two products).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from mmcl.losses import collectives
from mmcl.losses.common import PairRule, SideMeta, finite_or_zero, pad_side, pair_masks
from mmcl.losses.dense import SoftmaxStats, similarity

_ROW_GRAD = (((1,), (0,)), ((), ()))  # G [T_r, T_c] · b [T_c, D] → [T_r, D]
_COL_GRAD = (((0,), (0,)), ((), ()))  # Gᵀ a: G [T_r, T_c], a [T_r, D] → [T_c, D]


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static (hashable) description of one tiled call."""
  rule: PairRule
  tile_rows: int
  tile_cols: int
  want_cols: bool = False
  want_pos: bool = False


def _cdiv(n: int, t: int) -> int:
  return -(-n // t)


def _blocks(x: jax.Array | None, t: int) -> jax.Array | None:
  """[n, ...] → [ceil(n / t), t, ...], zero-padded at the end."""
  if x is None:
    return None
  n = x.shape[0]
  pad = _cdiv(n, t) * t - n
  if pad:
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((-1, t) + x.shape[1:])


def _meta_blocks(meta: SideMeta, t: int) -> SideMeta:
  n = meta.index.shape[0]
  padded = pad_side(meta, _cdiv(n, t) * t)
  return jax.tree.map(lambda x: x.reshape((-1, t) + x.shape[1:]), padded)


def _unblock(x: jax.Array, n: int) -> jax.Array:
  """[n_blocks, t, ...] → [n, ...] (drops the padding)."""
  return x.reshape((-1,) + x.shape[2:])[:n]


def _online_lse(run_max: jax.Array, run_sum: jax.Array, zm: jax.Array, axis: int):
  """Folds one tile (masked entries = −inf) into a running (max, Σ exp(z − max)) along `axis`."""
  new_max = jnp.maximum(run_max, jnp.max(zm, axis=axis))
  shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
  run_sum = (run_sum * jnp.exp(run_max - shift)
             + jnp.sum(jnp.exp(zm - jnp.expand_dims(shift, axis)), axis=axis))
  return new_max, run_sum


def _finish_lse(run_max: jax.Array, run_sum: jax.Array) -> jax.Array:
  ok = run_sum > 0
  return jnp.where(ok, finite_or_zero(run_max) + jnp.log(jnp.where(ok, run_sum, 1.0)), -jnp.inf)


def _tile_plan(rule: PairRule, rows: int, cols: int, block_size: int, **kw) -> _Plan:
  return _Plan(rule=rule, tile_rows=min(block_size, rows), tile_cols=min(block_size, cols), **kw)


# ---------------------------------------------------------------------------------------------
# Softmax statistics (InfoNCE, SupCon).


def softmax_stats(a: jax.Array, b: jax.Array, scale: jax.Array, rows: SideMeta, cols: SideMeta, *,
                  rule: PairRule, want_cols: bool, want_pos: bool, block_size: int,
                  axis_name: collectives.AxisName = None) -> SoftmaxStats:
  """Tiled twin of `dense.softmax_stats` (same arguments and results), memory O((R + C)·D + T²).

  Args:
    a: [R, D] float; b: [C, D] float; scale: [] float32.
    rows, cols: metadata of the rows and columns.
    rule, want_cols, want_pos: as in `dense.softmax_stats`.
    block_size: tile edge T (tiles are [min(T, R), min(T, C)]).
    axis_name: the `shard_map` axis the caller runs under, if any (the kernel's inputs are marked
      device-varying so that its gradients type-check; see collectives.as_varying).
  """
  plan = _tile_plan(rule, a.shape[0], b.shape[0], block_size, want_cols=want_cols,
                    want_pos=want_pos)
  a, b, scale = (collectives.as_varying(x, axis_name) for x in (a, b, scale))
  return _softmax_stats(plan, a, b, scale, rows, cols)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax_stats(plan, a, b, scale, rows, cols):
  return _softmax_forward(plan, a, b, scale, rows, cols)[0]


def _softmax_forward(plan: _Plan, a, b, scale, rows: SideMeta, cols: SideMeta):
  num_rows, num_cols = a.shape[0], b.shape[0]
  tr, tc = plan.tile_rows, plan.tile_cols
  a_tiles, b_tiles = _blocks(a, tr), _blocks(b, tc)
  row_meta, col_meta = _meta_blocks(rows, tr), _meta_blocks(cols, tc)
  n_col_tiles = b_tiles.shape[0]

  def row_tile(col_state, row_in):
    a_tile, r_meta = row_in

    def col_tile(row_state, col_in):
      b_tile, c_meta, c_state = col_in
      z = scale * similarity(a_tile, b_tile)
      allowed, positive = pair_masks(r_meta, c_meta, plan.rule)
      zm = jnp.where(allowed, z, -jnp.inf)
      r_max, r_sum, p_sum, p_count = row_state
      r_max, r_sum = _online_lse(r_max, r_sum, zm, axis=1)
      if plan.want_cols:
        c_state = _online_lse(*c_state, zm, axis=0)
      if plan.want_pos:
        p_sum = p_sum + jnp.sum(jnp.where(positive, z, 0.0), axis=1)
        p_count = p_count + jnp.sum(positive, axis=1).astype(jnp.float32)
      return (r_max, r_sum, p_sum, p_count), c_state

    zeros = jnp.zeros((tr,), jnp.float32)
    init = (jnp.full((tr,), -jnp.inf), zeros,
            zeros if plan.want_pos else None, zeros if plan.want_pos else None)
    init = collectives.match_varying(init, refs)
    (r_max, r_sum, p_sum, p_count), col_state = lax.scan(
        col_tile, init, (b_tiles, col_meta, col_state))
    return col_state, (_finish_lse(r_max, r_sum), p_sum, p_count)

  # Values derived from device-varying inputs vary; scan carries must start out the same way.
  refs = (a, b, scale, rows, cols)
  col_init = None
  if plan.want_cols:
    col_init = (jnp.full((n_col_tiles, tc), -jnp.inf), jnp.zeros((n_col_tiles, tc), jnp.float32))
    col_init = collectives.match_varying(col_init, refs)
  col_state, (row_lse, pos_sum, pos_count) = lax.scan(row_tile, col_init, (a_tiles, row_meta))

  row_lse = _unblock(row_lse, num_rows)
  col_lse = _unblock(_finish_lse(*col_state), num_cols) if plan.want_cols else None
  if plan.want_pos:
    pos_sum, pos_count = _unblock(pos_sum, num_rows), _unblock(pos_count, num_rows)
  stats = SoftmaxStats(row_lse, col_lse, pos_sum, pos_count)
  return stats, (a, b, scale, rows, cols, row_lse, col_lse)


def _softmax_backward(plan: _Plan, residuals, cotangents: SoftmaxStats):
  a, b, scale, rows, cols, row_lse, col_lse = residuals
  num_rows, num_cols, dim = a.shape[0], b.shape[0], a.shape[1]
  tr, tc = plan.tile_rows, plan.tile_cols
  a_tiles, b_tiles = _blocks(a, tr), _blocks(b, tc)
  row_meta, col_meta = _meta_blocks(rows, tr), _meta_blocks(cols, tc)
  # Empty rows/columns have lse = −inf and an all-false mask; 0 keeps exp() finite there.
  r_lse = _blocks(finite_or_zero(row_lse), tr)
  g_row = _blocks(cotangents.row_lse, tr)
  g_pos = _blocks(cotangents.pos_sum, tr) if plan.want_pos else None
  c_lse = _blocks(finite_or_zero(col_lse), tc) if plan.want_cols else None
  g_col = _blocks(cotangents.col_lse, tc) if plan.want_cols else None

  def row_tile(carry, row_in):
    db, ds = carry
    a_tile, r_meta, r_lse_t, g_row_t, g_pos_t = row_in

    def col_tile(inner, col_in):
      da_tile, ds = inner
      b_tile, c_meta, c_lse_t, g_col_t, db_tile = col_in
      dots = similarity(a_tile, b_tile)
      z = scale * dots
      allowed, positive = pair_masks(r_meta, c_meta, plan.rule)
      g = jnp.where(allowed, g_row_t[:, None] * jnp.exp(z - r_lse_t[:, None]), 0.0)
      if plan.want_cols:
        g = g + jnp.where(allowed, g_col_t[None, :] * jnp.exp(z - c_lse_t[None, :]), 0.0)
      if plan.want_pos:
        g = g + jnp.where(positive, g_pos_t[:, None], 0.0)
      ds = ds + jnp.sum(g * dots)
      # Low-precision inputs multiply G in their own dtype (accumulating in float32), as the
      # forward matmul does.
      g = g.astype(a.dtype)
      da_tile = da_tile + lax.dot_general(g, b_tile, _ROW_GRAD, preferred_element_type=jnp.float32)
      db_tile = db_tile + lax.dot_general(g, a_tile, _COL_GRAD, preferred_element_type=jnp.float32)
      return (da_tile, ds), db_tile

    da_init = collectives.match_varying(jnp.zeros((tr, dim), jnp.float32), refs)
    (da_tile, ds), db = lax.scan(col_tile, (da_init, ds), (b_tiles, col_meta, c_lse, g_col, db))
    return (db, ds), da_tile

  refs = (a, b, scale, rows, cols, cotangents)
  init = (jnp.zeros((b_tiles.shape[0], tc, dim), jnp.float32), jnp.zeros((), jnp.float32))
  init = collectives.match_varying(init, refs)
  (db, ds), da = lax.scan(row_tile, init, (a_tiles, row_meta, r_lse, g_row, g_pos))
  da = (scale * _unblock(da, num_rows)).astype(a.dtype)
  db = (scale * _unblock(db, num_cols)).astype(b.dtype)
  return da, db, ds.astype(scale.dtype), None, None


_softmax_stats.defvjp(_softmax_forward, _softmax_backward)


# ---------------------------------------------------------------------------------------------
# Sigmoid (SigLIP) row sums.


def sigmoid_row_sums(a: jax.Array, b: jax.Array, scale: jax.Array, bias: jax.Array,
                     rows: SideMeta, cols: SideMeta, *, rule: PairRule, block_size: int,
                     axis_name: collectives.AxisName = None) -> jax.Array:
  """Tiled twin of `dense.sigmoid_row_sums`: [R] float32, Σ_{j allowed} −log σ(y_ij z_ij).

  The logit gradient of a tile is G_ij = [allowed_ij] ḡ_i · (−y_ij σ(−y_ij z_ij)); ∂/∂c = Σ G.

  Args:
    a: [R, D] float; b: [C, D] float; scale, bias: [] float32.
    rows, cols, rule: as in `dense.sigmoid_row_sums`.
    block_size: tile edge T.
    axis_name: the `shard_map` axis the caller runs under, if any.
  """
  plan = _tile_plan(rule, a.shape[0], b.shape[0], block_size)
  a, b, scale, bias = (collectives.as_varying(x, axis_name) for x in (a, b, scale, bias))
  return _sigmoid_row_sums(plan, a, b, scale, bias, rows, cols)


def _sigmoid_tile(plan: _Plan, a_tile, b_tile, scale, bias, r_meta, c_meta):
  dots = similarity(a_tile, b_tile)
  z = scale * dots + bias
  allowed, positive = pair_masks(r_meta, c_meta, plan.rule)
  signs = jnp.where(positive, 1.0, -1.0)
  return dots, z, allowed, signs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sigmoid_row_sums(plan, a, b, scale, bias, rows, cols):
  return _sigmoid_forward(plan, a, b, scale, bias, rows, cols)[0]


def _sigmoid_forward(plan: _Plan, a, b, scale, bias, rows: SideMeta, cols: SideMeta):
  a_tiles, b_tiles = _blocks(a, plan.tile_rows), _blocks(b, plan.tile_cols)
  row_meta, col_meta = _meta_blocks(rows, plan.tile_rows), _meta_blocks(cols, plan.tile_cols)

  def row_tile(_, row_in):
    a_tile, r_meta = row_in

    def col_tile(acc, col_in):
      b_tile, c_meta = col_in
      _, z, allowed, signs = _sigmoid_tile(plan, a_tile, b_tile, scale, bias, r_meta, c_meta)
      return acc + jnp.sum(jnp.where(allowed, jax.nn.softplus(-signs * z), 0.0), axis=1), None

    acc_init = collectives.match_varying(jnp.zeros((plan.tile_rows,), jnp.float32),
                                         (a, b, scale, bias, rows, cols))
    acc, _ = lax.scan(col_tile, acc_init, (b_tiles, col_meta))
    return None, acc

  _, sums = lax.scan(row_tile, None, (a_tiles, row_meta))
  return _unblock(sums, a.shape[0]), (a, b, scale, bias, rows, cols)


def _sigmoid_backward(plan: _Plan, residuals, g_sums):
  a, b, scale, bias, rows, cols = residuals
  num_rows, num_cols, dim = a.shape[0], b.shape[0], a.shape[1]
  tr, tc = plan.tile_rows, plan.tile_cols
  a_tiles, b_tiles = _blocks(a, tr), _blocks(b, tc)
  row_meta, col_meta = _meta_blocks(rows, tr), _meta_blocks(cols, tc)
  g_rows = _blocks(g_sums, tr)

  def row_tile(carry, row_in):
    db, ds, dc = carry
    a_tile, r_meta, g_t = row_in

    def col_tile(inner, col_in):
      da_tile, ds, dc = inner
      b_tile, c_meta, db_tile = col_in
      dots, z, allowed, signs = _sigmoid_tile(plan, a_tile, b_tile, scale, bias, r_meta, c_meta)
      # d/dz softplus(−y z) = −y σ(−y z).
      g = jnp.where(allowed, g_t[:, None] * (-signs * jax.nn.sigmoid(-signs * z)), 0.0)
      ds = ds + jnp.sum(g * dots)
      dc = dc + jnp.sum(g)
      g = g.astype(a.dtype)
      da_tile = da_tile + lax.dot_general(g, b_tile, _ROW_GRAD, preferred_element_type=jnp.float32)
      db_tile = db_tile + lax.dot_general(g, a_tile, _COL_GRAD, preferred_element_type=jnp.float32)
      return (da_tile, ds, dc), db_tile

    da_init = collectives.match_varying(jnp.zeros((tr, dim), jnp.float32), refs)
    (da_tile, ds, dc), db = lax.scan(col_tile, (da_init, ds, dc), (b_tiles, col_meta, db))
    return (db, ds, dc), da_tile

  refs = (a, b, scale, bias, rows, cols, g_sums)
  zero = jnp.zeros((), jnp.float32)
  init = (jnp.zeros((b_tiles.shape[0], tc, dim), jnp.float32), zero, zero)
  init = collectives.match_varying(init, refs)
  (db, ds, dc), da = lax.scan(row_tile, init, (a_tiles, row_meta, g_rows))
  da = (scale * _unblock(da, num_rows)).astype(a.dtype)
  db = (scale * _unblock(db, num_cols)).astype(b.dtype)
  return da, db, ds.astype(scale.dtype), dc.astype(bias.dtype), None, None


_sigmoid_row_sums.defvjp(_sigmoid_forward, _sigmoid_backward)
