"""Fused Pallas kernels (Triton lowering on GPU): the statistics of tiled.py in a few kernels.

Same arguments, results and `jax.custom_vjp` structure as tiled.py (the plain-XLA fallback and the
reference design); only the loops over tiles move into Pallas kernels, so a logit tile lives in
registers / shared memory from the matmul that makes it to the reductions that consume it. With
R rows (a), C columns (b), tiles [T_r, T_c] and P forward programs:

  kernel               grid            each program
  softmax forward      (P,)            takes k = ⌈(R/T_r) / P⌉ consecutive row tiles; for each, one
                                       pass over all column tiles keeps the online row log-sum-exp
                                       (max, Σ exp) in registers and folds the tile into its own
                                       column partial (max, Σ exp) [C], one row of a [P, C] output
  softmax backward dA  (R/T_r,)        one row tile against all column tiles: recomputes z, forms G
                                       (tiled.py's formula), accumulates G·b [T_r, D], Σ_j G·<a,b>
  softmax backward dB  (C/T_c,)        one column tile against all row tiles: accumulates Gᵀ·a
  sigmoid forward      (R/T_r,)        row sums Σ_j softplus(−y z)
  sigmoid backward     dA and dB as above, plus Σ_j G for the bias

XLA merges the P column partials (a log-sum-exp of log-sum-exps over [P, C]), finishes the
log-sum-exps, sums the per-row partials of ∂/∂s (and ∂/∂c) and multiplies the gradients by s.

Why column partials rather than a second kernel over the transposed problem: the transposed pass
recomputes every logit (2·R·C·D more FLOPs, a fifth of the whole forward + backward), while the
partials cost P·C·8 bytes (2 GiB at C = 2²⁰, P = 256) and one read of them in the merge. Why P
programs rather than one per row tile: one partial row per row tile would be (R/T_r)·C·8 bytes
(64 GiB at R = C = 2²⁰, T_r = 128). Each program rewrites its own partial row once per
(row tile, column tile) step: a read-modify-write of 2·T_c floats in global memory (L2-resident)
against 2·T_r·T_c·D FLOPs of matmul. Different threads of a program may hold a given column
element in the load and in the store layouts, so a barrier separates the writes of one row tile
from the reads of the next (`pltriton.debug_barrier`, compiled kernels only).

Triton constraints honoured here: every loaded or stored block has a power-of-two size (tiles are
powers of two ≥ 16, the matmul minimum; D is zero-padded to a power of two ≥ 16, which leaves
every dot product unchanged); R and C are padded to whole tiles with rows that take part in
nothing (as in tiled.py); metadata travels as int32 (no bool buffers); duplicate-group ids as
[K, n] so that each id column is a contiguous load; masks are computed in-kernel from the id
tiles. The backward's dA and dB kernels each recompute the logits (4·R·C·D FLOPs of recompute
+ products each side, 10·R·C·D in all against 6·R·C·D useful); a single backward kernel that
accumulates dB in registers and dA with atomic adds would do 8·R·C·D: the next step if the
measured backward is the bottleneck.

Off a GPU the kernels run in Pallas interpret mode (exact, slow: tests only). Interpret mode cannot
run inside a `shard_map` with check_vma=True (see `_check_interpretable`); compiled kernels can.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mmcl.losses import collectives
from mmcl.losses.common import PairRule, SideMeta, finite_or_zero
from mmcl.losses.dense import SoftmaxStats, similarity

# Upper bound on the programs of the softmax forward kernel, P. The column partials cost
# P · C · 8 bytes; P must also be large enough to fill the GPU (H100: 132 SMs, one or two
# programs each at these tile sizes). Untuned: measure with experiments/bench/loss.py.
DEFAULT_ROW_PROGRAMS = 256

# Smallest tile edge: Triton's matmul needs M, N, K ≥ 16.
MIN_TILE = 16

_ROW_GRAD = (((1,), (0,)), ((), ()))  # G [T_r, T_c] · b [T_c, D] → [T_r, D]
_COL_GRAD = (((0,), (0,)), ((), ()))  # Gᵀ a: G [T_r, T_c], a [T_r, D] → [T_c, D]


def default_tile(dim: int) -> int:
  """Tile edge used when block_size is None, for embeddings of width `dim`.

  The dA / dB accumulators are [T, D] float32 per program, in registers: 64 × 512 × 4 bytes =
  128 KiB, half an H100 SM's register file; at D > 512 the edge halves to stay there. Starting
  points, not measured optima.
  """
  return 64 if _next_pow2(max(dim, MIN_TILE)) <= 512 else 32


def check_tile(block_size: int | None, where: str) -> int | None:
  """Checks a fused-kernel tile edge: None (default per D) or a power of two ≥ 16."""
  if block_size is None:
    return None
  if (not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < MIN_TILE
      or block_size & (block_size - 1)):
    raise ValueError(
        f"{where}: with impl='fused', block_size must be None or a power of two ≥ {MIN_TILE} "
        f"(Triton tiles are powers of two and its matmul needs edges ≥ {MIN_TILE}), "
        f"got {block_size!r}")
  return block_size


def default_interpret() -> bool:
  """Interpret mode everywhere but on a GPU (the kernels are written for the Triton lowering)."""
  return jax.default_backend() != "gpu"


def _check_interpretable(plan: _Plan, x: jax.Array, where: str) -> None:
  """Refuses interpret mode on device-varying values (inside `shard_map` with check_vma=True).

  Pallas's interpreter (JAX 0.10) evaluates the kernel, traced without varying types, on the
  varying blocks, and the first primitive that mixes both fails deep inside JAX. Compiled GPU
  kernels are not affected.
  """
  if plan.interpret and collectives.varying_axes(x):
    raise NotImplementedError(
        f"{where}: impl='fused' runs in Pallas interpret mode off a GPU (backend "
        f"{jax.default_backend()!r}), which cannot run inside a `jax.shard_map` with "
        "check_vma=True; pass check_vma=False to that shard_map (gradients taken outside it "
        "stay exact), or use impl='tiled' (same results).")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static (hashable) description of one fused call."""
  rule: PairRule
  tile_rows: int
  tile_cols: int
  dim: int  # D padded to a power of two
  num_groups: int  # K, duplicate-group id columns (0: none)
  row_programs: int = DEFAULT_ROW_PROGRAMS
  want_cols: bool = False
  want_pos: bool = False
  interpret: bool = True
  num_warps: int = 4
  num_stages: int = 2

  @property
  def with_labels(self) -> bool:
    return self.rule.positives == "labels"


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _cdiv(n: int, t: int) -> int:
  return -(-n // t)


def _make_plan(rule: PairRule, a: jax.Array, b: jax.Array, rows: SideMeta, block_size: int | None,
               row_programs: int | None, interpret: bool | None, **kw) -> _Plan:
  tile = block_size or default_tile(a.shape[1])
  dim = _next_pow2(max(a.shape[1], MIN_TILE))
  # Small sides get a smaller tile (no less than MIN_TILE) instead of padding to a full one.
  return _Plan(rule=rule,
               tile_rows=max(MIN_TILE, min(tile, _next_pow2(a.shape[0]))),
               tile_cols=max(MIN_TILE, min(tile, _next_pow2(b.shape[0]))),
               dim=dim,
               # More threads share the [T, D] float32 accumulators of wide embeddings (untuned).
               num_warps=4 if dim <= 256 else 8,
               num_groups=0 if rows.groups is None else rows.groups.shape[1],
               row_programs=row_programs or DEFAULT_ROW_PROGRAMS,
               interpret=default_interpret() if interpret is None else interpret, **kw)


# ---------------------------------------------------------------------------------------------
# Operand layout shared by all kernels.


def _pad_rows(x: jax.Array, n: int, value) -> jax.Array:
  if x.shape[0] == n:
    return x
  return jnp.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def _embeddings(x: jax.Array, n: int, plan: _Plan) -> jax.Array:
  """[m, D] → [n, D_pad], zero rows and zero columns appended (dot products unchanged)."""
  x = _pad_rows(x, n, 0)
  if x.shape[1] != plan.dim:
    x = jnp.pad(x, [(0, 0), (0, plan.dim - x.shape[1])])
  return x


def _meta_arrays(meta: SideMeta, n: int, plan: _Plan) -> list[jax.Array]:
  """The kernel's view of one side's metadata, padded to n rows that take part in nothing.

  Returns, in this order: index [n] int32, valid [n] int32, groups [K, n] int32 (when K > 0),
  labels [n] int32 and label_ok [n] int32 (when the rule's positives are labels).
  """
  out = [_pad_rows(meta.index.astype(jnp.int32), n, -1),
         _pad_rows(meta.valid.astype(jnp.int32), n, 0)]
  if plan.num_groups:
    out.append(_pad_rows(meta.groups.astype(jnp.int32), n, -1).T)
  if plan.with_labels:
    out.append(_pad_rows(meta.labels.astype(jnp.int32), n, -1))
    out.append(_pad_rows(meta.label_ok.astype(jnp.int32), n, 0))
  return out


def _meta_specs(plan: _Plan, tile: int | None) -> list[Any]:
  """BlockSpecs of `_meta_arrays`: one tile per program (tile given) or the whole array."""
  if tile is None:
    return [pl.no_block_spec] * _num_meta(plan)
  vec = pl.BlockSpec((tile,), lambda i: (i,))
  specs = [vec, vec]
  if plan.num_groups:
    specs.append(pl.BlockSpec((plan.num_groups, tile), lambda i: (0, i)))
  if plan.with_labels:
    specs += [vec, vec]
  return specs


def _num_meta(plan: _Plan) -> int:
  return 2 + (plan.num_groups > 0) + 2 * plan.with_labels


class _TileMeta(NamedTuple):
  """Metadata of the T rows (or columns) of one tile, loaded in-kernel."""
  index: jax.Array  # [T] int32
  valid: jax.Array  # [T] bool
  groups: tuple[jax.Array, ...]  # K × [T] int32
  labels: jax.Array | None  # [T] int32
  label_ok: jax.Array | None  # [T] bool


def _take(refs: Iterator[Any], n: int) -> list[Any]:
  return [next(refs) for _ in range(n)]


def _load_meta(refs: list[Any], plan: _Plan, sl) -> _TileMeta:
  """Loads one tile of metadata; `sl` selects it (a pl.ds, or slice(None) for a blocked ref)."""
  it = iter(refs)
  index, valid = next(it)[sl], next(it)[sl] != 0
  groups = ()
  if plan.num_groups:
    ref = next(it)
    groups = tuple(ref[k, sl] for k in range(plan.num_groups))
  labels = label_ok = None
  if plan.with_labels:
    labels, label_ok = next(it)[sl], next(it)[sl] != 0
  return _TileMeta(index, valid, groups, labels, label_ok)


def _tile_masks(r: _TileMeta, c: _TileMeta, rule: PairRule) -> tuple[jax.Array, jax.Array]:
  """In-kernel twin of common.pair_masks: (allowed, positive), both [T_r, T_c] bool."""
  same = r.index[:, None] == c.index[None, :]
  allowed = r.valid[:, None] & c.valid[None, :]
  if rule.exclude_self:
    allowed = allowed & ~same
  if r.groups:
    duplicate = None
    for gr, gc in zip(r.groups, c.groups, strict=True):
      hit = (gr[:, None] == gc[None, :]) & (gr[:, None] >= 0)
      duplicate = hit if duplicate is None else duplicate | hit
    allowed = allowed & (same | ~duplicate)
  if rule.positives == "diagonal":
    positive = allowed & same
  else:
    positive = (allowed & ~same & (r.labels[:, None] == c.labels[None, :])
                & r.label_ok[:, None] & c.label_ok[None, :])
  return allowed, positive


def _tile_slice(i, t: int):
  return pl.ds(pl.multiple_of(i * t, t), t)


def _online_lse(run_max, run_sum, z, allowed, axis: int):
  """Folds a tile into a running (max, Σ exp(z − max)) along `axis` (tiled._online_lse, with the
  mask applied inside so that no −inf − (−inf) is ever formed)."""
  new_max = jnp.maximum(run_max, jnp.max(jnp.where(allowed, z, -jnp.inf), axis=axis))
  shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
  terms = jnp.where(allowed, jnp.exp(z - jnp.expand_dims(shift, axis)), 0.0)
  return new_max, run_sum * jnp.exp(run_max - shift) + jnp.sum(terms, axis=axis)


def _finish_lse(run_max: jax.Array, run_sum: jax.Array) -> jax.Array:
  ok = run_sum > 0
  return jnp.where(ok, finite_or_zero(run_max) + jnp.log(jnp.where(ok, run_sum, 1.0)), -jnp.inf)


def _barrier(plan: _Plan) -> None:
  if not plan.interpret:
    pltriton.debug_barrier()


def _call(kernel, plan: _Plan, grid: tuple[int, ...], in_specs, out_specs, out_shapes, name: str,
          args: list[jax.Array]):
  """pallas_call with the Triton compiler parameters; float32 outputs of shapes `out_shapes`.

  Inside `shard_map` (check_vma) the outputs must declare how they vary across devices: every
  argument is first cast to vary over every axis any argument varies over, and the outputs
  are declared the same.
  """
  args = collectives.match_varying(list(args), list(args))
  single = isinstance(out_shapes, tuple)
  structs = [_f32_like(shape, args[0]) for shape in ([out_shapes] if single else out_shapes)]
  call = pl.pallas_call(
      kernel, out_shape=structs[0] if single else structs, grid=grid, in_specs=in_specs,
      out_specs=out_specs, interpret=plan.interpret, name=name,
      compiler_params=pltriton.CompilerParams(num_warps=plan.num_warps,
                                              num_stages=plan.num_stages))
  return call(*args)


def _f32_like(shape: tuple[int, ...], like: jax.Array) -> jax.ShapeDtypeStruct:
  """A float32 output type that varies across `shard_map` devices as `like` does."""
  aval = jax.typeof(like)
  try:  # jax ≥ 0.10 names the varying axes' type `manual_axis_type`, earlier versions `vma`.
    return jax.ShapeDtypeStruct(shape, jnp.float32, manual_axis_type=aval.mat)
  except (TypeError, AttributeError):
    return jax.ShapeDtypeStruct(shape, jnp.float32, vma=getattr(aval, "vma", frozenset()))


# ---------------------------------------------------------------------------------------------
# Softmax statistics (InfoNCE, SupCon).


def softmax_stats(a: jax.Array, b: jax.Array, scale: jax.Array, rows: SideMeta, cols: SideMeta, *,
                  rule: PairRule, want_cols: bool, want_pos: bool, block_size: int | None = None,
                  axis_name: collectives.AxisName = None, row_programs: int | None = None,
                  interpret: bool | None = None) -> SoftmaxStats:
  """Fused twin of `tiled.softmax_stats` (same arguments and results).

  Args:
    a: [R, D] float; b: [C, D] float (same dtype); scale: [] float32.
    rows, cols: metadata of the rows and columns.
    rule, want_cols, want_pos: as in `dense.softmax_stats`.
    block_size: tile edge (a power of two ≥ 16), None for `default_tile(D)`.
    axis_name: the `shard_map` axis the caller runs under, if any.
    row_programs: upper bound P on the forward kernel's programs (None: DEFAULT_ROW_PROGRAMS).
    interpret: run the kernels in Pallas interpret mode (None: everywhere but on a GPU).
  """
  plan = _make_plan(rule, a, b, rows, block_size, row_programs, interpret, want_cols=want_cols,
                    want_pos=want_pos)
  a, b, scale = (collectives.as_varying(x, axis_name) for x in (a, b, scale))
  _check_interpretable(plan, a, "mmcl.losses.fused.softmax_stats")
  return _softmax_stats(plan, a, b, scale, rows, cols)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax_stats(plan, a, b, scale, rows, cols):
  return _softmax_forward(plan, a, b, scale, rows, cols)[0]


def _forward_layout(plan: _Plan, num_rows: int) -> tuple[int, int]:
  """(P programs, k row tiles each) of the softmax forward kernel; rows are padded to P·k·T_r."""
  row_tiles = _cdiv(num_rows, plan.tile_rows)
  per_program = _cdiv(row_tiles, plan.row_programs)
  return _cdiv(row_tiles, per_program), per_program


def _softmax_forward_kernel(plan: _Plan, col_tiles: int, per_program: int, *refs):
  """One program: `per_program` row tiles against all `col_tiles` column tiles.

  Refs: a [k·T_r, D], b [C, D], scale [1], row meta (k·T_r each), column meta (whole);
  outputs row max, row Σexp [k·T_r], (positive sum, count [k·T_r]), (column max, Σexp [C]).
  """
  it = iter(refs)
  a_ref, b_ref, scale_ref = _take(it, 3)
  row_refs, col_refs = _take(it, _num_meta(plan)), _take(it, _num_meta(plan))
  row_max_ref, row_sum_ref = _take(it, 2)
  pos_sum_ref, pos_count_ref = _take(it, 2) if plan.want_pos else (None, None)
  col_max_ref, col_sum_ref = _take(it, 2) if plan.want_cols else (None, None)
  tr, tc = plan.tile_rows, plan.tile_cols
  scale = scale_ref[0]

  if plan.want_cols:
    def init_cols(j, carry):
      cs = _tile_slice(j, tc)
      col_max_ref[cs] = jnp.full((tc,), -jnp.inf, jnp.float32)
      col_sum_ref[cs] = jnp.zeros((tc,), jnp.float32)
      return carry

    lax.fori_loop(0, col_tiles, init_cols, 0)
    _barrier(plan)

  def row_tile(t, carry):
    rs = _tile_slice(t, tr)
    a = a_ref[rs, :]
    r = _load_meta(row_refs, plan, rs)

    def col_tile(j, state):
      r_max, r_sum, p_sum, p_count = state
      cs = _tile_slice(j, tc)
      c = _load_meta(col_refs, plan, cs)
      z = scale * similarity(a, b_ref[cs, :])
      allowed, positive = _tile_masks(r, c, plan.rule)
      r_max, r_sum = _online_lse(r_max, r_sum, z, allowed, axis=1)
      if plan.want_cols:
        c_max, c_sum = _online_lse(col_max_ref[cs], col_sum_ref[cs], z, allowed, axis=0)
        col_max_ref[cs] = c_max
        col_sum_ref[cs] = c_sum
      if plan.want_pos:
        p_sum = p_sum + jnp.sum(jnp.where(positive, z, 0.0), axis=1)
        p_count = p_count + jnp.sum(jnp.where(positive, 1.0, 0.0), axis=1)
      return r_max, r_sum, p_sum, p_count

    zeros = jnp.zeros((tr,), jnp.float32)
    r_max, r_sum, p_sum, p_count = lax.fori_loop(
        0, col_tiles, col_tile, (jnp.full((tr,), -jnp.inf, jnp.float32), zeros, zeros, zeros))
    row_max_ref[rs] = r_max
    row_sum_ref[rs] = r_sum
    if plan.want_pos:
      pos_sum_ref[rs] = p_sum
      pos_count_ref[rs] = p_count
    # This row tile's column-partial writes must land before the next one reads them.
    _barrier(plan)
    return carry

  lax.fori_loop(0, per_program, row_tile, 0)


def _softmax_forward(plan: _Plan, a, b, scale, rows: SideMeta, cols: SideMeta):
  num_rows, num_cols = a.shape[0], b.shape[0]
  tr, tc = plan.tile_rows, plan.tile_cols
  programs, per_program = _forward_layout(plan, num_rows)
  rows_pad, cols_pad = programs * per_program * tr, _cdiv(num_cols, tc) * tc
  block = per_program * tr
  inputs = [_embeddings(a, rows_pad, plan), _embeddings(b, cols_pad, plan), scale.reshape(1),
            *_meta_arrays(rows, rows_pad, plan), *_meta_arrays(cols, cols_pad, plan)]
  in_specs = [pl.BlockSpec((block, plan.dim), lambda p: (p, 0)), pl.no_block_spec,
              pl.no_block_spec, *_meta_specs(plan, block), *_meta_specs(plan, None)]
  row_spec = pl.BlockSpec((block,), lambda p: (p,))
  col_spec = pl.BlockSpec((None, cols_pad), lambda p: (p, 0))
  out_shapes = [(rows_pad,)] * 2
  out_specs = [row_spec] * 2
  if plan.want_pos:
    out_shapes += [(rows_pad,)] * 2
    out_specs += [row_spec] * 2
  if plan.want_cols:
    out_shapes += [(programs, cols_pad)] * 2
    out_specs += [col_spec] * 2
  kernel = functools.partial(_softmax_forward_kernel, plan, cols_pad // tc, per_program)
  outs = iter(_call(kernel, plan, (programs,), in_specs, out_specs, out_shapes,
                    "mmcl_softmax_forward", inputs))

  row_lse = _finish_lse(*_take(outs, 2))[:num_rows]
  pos_sum = pos_count = col_lse = None
  if plan.want_pos:
    pos_sum, pos_count = (x[:num_rows] for x in _take(outs, 2))
  if plan.want_cols:
    part_max, part_sum = _take(outs, 2)
    # log Σ_p exp(partial_p): shifted by the largest partial max (0 for an empty column).
    col_max = jnp.max(part_max, axis=0)
    shift = finite_or_zero(col_max)
    col_sum = jnp.sum(part_sum * jnp.exp(part_max - shift), axis=0)
    col_lse = _finish_lse(col_max, col_sum)[:num_cols]
  stats = SoftmaxStats(row_lse, col_lse, pos_sum, pos_count)
  return stats, (a, b, scale, rows, cols, row_lse, col_lse)


def _softmax_logit_grad(plan: _Plan, z, allowed, positive, r_lse, g_row, g_pos, c_lse, g_col):
  """G [T_r, T_c] of one tile (the formula in tiled.py's docstring)."""
  g = jnp.where(allowed, g_row[:, None] * jnp.exp(z - r_lse[:, None]), 0.0)
  if plan.want_cols:
    g = g + jnp.where(allowed, g_col[None, :] * jnp.exp(z - c_lse[None, :]), 0.0)
  if plan.want_pos:
    g = g + jnp.where(positive, g_pos[:, None], 0.0)
  return g


def _row_vectors(plan: _Plan) -> int:
  """Per-row backward inputs: row lse, its cotangent, (positive-sum cotangent)."""
  return 2 + plan.want_pos


def _col_vectors(plan: _Plan) -> int:
  """Per-column backward inputs: (column lse, its cotangent)."""
  return 2 * plan.want_cols


def _softmax_da_kernel(plan: _Plan, col_tiles: int, *refs):
  """One row tile against all column tiles: dA [T_r, D] (unscaled) and Σ_j G·<a, b> [T_r]."""
  it = iter(refs)
  a_ref, b_ref, scale_ref = _take(it, 3)
  row_refs, col_refs = _take(it, _num_meta(plan)), _take(it, _num_meta(plan))
  row_vecs, col_vecs = _take(it, _row_vectors(plan)), _take(it, _col_vectors(plan))
  da_ref, ds_ref = _take(it, 2)
  tc = plan.tile_cols
  scale = scale_ref[0]
  a = a_ref[...]
  r = _load_meta(row_refs, plan, slice(None))
  r_lse, g_row = row_vecs[0][...], row_vecs[1][...]
  g_pos = row_vecs[2][...] if plan.want_pos else None

  def col_tile(j, state):
    da, ds = state
    cs = _tile_slice(j, tc)
    b = b_ref[cs, :]
    c = _load_meta(col_refs, plan, cs)
    c_lse, g_col = (col_vecs[0][cs], col_vecs[1][cs]) if plan.want_cols else (None, None)
    dots = similarity(a, b)
    allowed, positive = _tile_masks(r, c, plan.rule)
    g = _softmax_logit_grad(plan, scale * dots, allowed, positive, r_lse, g_row, g_pos, c_lse,
                            g_col)
    ds = ds + jnp.sum(g * dots, axis=1)
    # Low-precision operands multiply G in their own dtype, accumulating in float32 (as tiled.py).
    da = da + lax.dot_general(g.astype(b.dtype), b, _ROW_GRAD,
                              preferred_element_type=jnp.float32)
    return da, ds

  da, ds = lax.fori_loop(0, col_tiles, col_tile,
                         (jnp.zeros((plan.tile_rows, plan.dim), jnp.float32),
                          jnp.zeros((plan.tile_rows,), jnp.float32)))
  da_ref[...] = da
  ds_ref[...] = ds


def _softmax_db_kernel(plan: _Plan, row_tiles: int, *refs):
  """One column tile against all row tiles: dB [T_c, D] (unscaled)."""
  it = iter(refs)
  a_ref, b_ref, scale_ref = _take(it, 3)
  row_refs, col_refs = _take(it, _num_meta(plan)), _take(it, _num_meta(plan))
  row_vecs, col_vecs = _take(it, _row_vectors(plan)), _take(it, _col_vectors(plan))
  (db_ref,) = _take(it, 1)
  tr = plan.tile_rows
  scale = scale_ref[0]
  b = b_ref[...]
  c = _load_meta(col_refs, plan, slice(None))
  c_lse, g_col = (col_vecs[0][...], col_vecs[1][...]) if plan.want_cols else (None, None)

  def row_tile(i, db):
    rs = _tile_slice(i, tr)
    a = a_ref[rs, :]
    r = _load_meta(row_refs, plan, rs)
    g_pos = row_vecs[2][rs] if plan.want_pos else None
    allowed, positive = _tile_masks(r, c, plan.rule)
    g = _softmax_logit_grad(plan, scale * similarity(a, b), allowed, positive, row_vecs[0][rs],
                            row_vecs[1][rs], g_pos, c_lse, g_col)
    return db + lax.dot_general(g.astype(a.dtype), a, _COL_GRAD,
                                preferred_element_type=jnp.float32)

  db_ref[...] = lax.fori_loop(0, row_tiles, row_tile,
                              jnp.zeros((plan.tile_cols, plan.dim), jnp.float32))


def _backward_inputs(plan: _Plan, a, b, rows, cols, row_vecs, col_vecs):
  """Padded operands of the dA / dB kernels and their padded sizes."""
  rows_pad = _cdiv(a.shape[0], plan.tile_rows) * plan.tile_rows
  cols_pad = _cdiv(b.shape[0], plan.tile_cols) * plan.tile_cols
  inputs = dict(
      a=_embeddings(a, rows_pad, plan), b=_embeddings(b, cols_pad, plan),
      row_meta=_meta_arrays(rows, rows_pad, plan), col_meta=_meta_arrays(cols, cols_pad, plan),
      # Cotangents of padded rows are 0, so padded rows contribute nothing.
      row_vecs=[_pad_rows(v.astype(jnp.float32), rows_pad, 0) for v in row_vecs],
      col_vecs=[_pad_rows(v.astype(jnp.float32), cols_pad, 0) for v in col_vecs])
  return inputs, rows_pad, cols_pad


def _gradient_kernels(plan: _Plan, da_kernel, db_kernel, inputs, scalars, rows_pad, cols_pad,
                      num_row_partials: int, name: str):
  """Runs the dA kernel (grid over row tiles) and the dB kernel (grid over column tiles).

  Returns dA [R_pad, D_pad] f32, dB [C_pad, D_pad] f32 and `num_row_partials` [R_pad] f32 per-row
  partial sums of the scalar gradients.
  """
  tr, tc, d = plan.tile_rows, plan.tile_cols, plan.dim
  nr, nc = len(inputs["row_vecs"]), len(inputs["col_vecs"])
  args = [inputs["a"], inputs["b"], *scalars, *inputs["row_meta"], *inputs["col_meta"],
          *inputs["row_vecs"], *inputs["col_vecs"]]
  whole = pl.no_block_spec
  row_vec = pl.BlockSpec((tr,), lambda i: (i,))
  col_vec = pl.BlockSpec((tc,), lambda j: (j,))

  da_specs = [pl.BlockSpec((tr, d), lambda i: (i, 0)), whole, *[whole] * len(scalars),
              *_meta_specs(plan, tr), *_meta_specs(plan, None), *[row_vec] * nr, *[whole] * nc]
  da_out = _call(functools.partial(da_kernel, plan, cols_pad // tc), plan, (rows_pad // tr,),
                 da_specs, [pl.BlockSpec((tr, d), lambda i: (i, 0))] + [row_vec] * num_row_partials,
                 [(rows_pad, d)] + [(rows_pad,)] * num_row_partials, f"{name}_da", args)
  db_specs = [whole, pl.BlockSpec((tc, d), lambda j: (j, 0)), *[whole] * len(scalars),
              *_meta_specs(plan, None), *_meta_specs(plan, tc), *[whole] * nr, *[col_vec] * nc]
  db = _call(functools.partial(db_kernel, plan, rows_pad // tr), plan, (cols_pad // tc,),
             db_specs, pl.BlockSpec((tc, d), lambda j: (j, 0)), (cols_pad, d), f"{name}_db", args)
  return da_out[0], db, da_out[1:]


def _softmax_backward(plan: _Plan, residuals, cotangents: SoftmaxStats):
  a, b, scale, rows, cols, row_lse, col_lse = residuals
  num_rows, num_cols, dim = a.shape[0], b.shape[0], a.shape[1]
  # Empty rows/columns have lse = −inf and an all-false mask; 0 keeps exp() finite there.
  row_vecs = [finite_or_zero(row_lse), cotangents.row_lse]
  if plan.want_pos:
    row_vecs.append(cotangents.pos_sum)
  col_vecs = [finite_or_zero(col_lse), cotangents.col_lse] if plan.want_cols else []
  inputs, rows_pad, cols_pad = _backward_inputs(plan, a, b, rows, cols, row_vecs, col_vecs)
  da, db, (ds_rows,) = _gradient_kernels(plan, _softmax_da_kernel, _softmax_db_kernel, inputs,
                                         [scale.reshape(1)], rows_pad, cols_pad, 1,
                                         "mmcl_softmax_backward")
  da = (scale * da[:num_rows, :dim]).astype(a.dtype)
  db = (scale * db[:num_cols, :dim]).astype(b.dtype)
  return da, db, jnp.sum(ds_rows).astype(scale.dtype), None, None


_softmax_stats.defvjp(_softmax_forward, _softmax_backward)


# ---------------------------------------------------------------------------------------------
# Sigmoid (SigLIP) row sums.


def sigmoid_row_sums(a: jax.Array, b: jax.Array, scale: jax.Array, bias: jax.Array,
                     rows: SideMeta, cols: SideMeta, *, rule: PairRule,
                     block_size: int | None = None, axis_name: collectives.AxisName = None,
                     interpret: bool | None = None) -> jax.Array:
  """Fused twin of `tiled.sigmoid_row_sums`: [R] float32, Σ_{j allowed} −log σ(y_ij z_ij).

  Args:
    a: [R, D] float; b: [C, D] float (same dtype); scale, bias: [] float32.
    rows, cols, rule: as in `dense.sigmoid_row_sums`.
    block_size: tile edge (a power of two ≥ 16), None for `default_tile(D)`.
    axis_name: the `shard_map` axis the caller runs under, if any.
    interpret: run the kernels in Pallas interpret mode (None: everywhere but on a GPU).
  """
  plan = _make_plan(rule, a, b, rows, block_size, None, interpret)
  a, b, scale, bias = (collectives.as_varying(x, axis_name) for x in (a, b, scale, bias))
  _check_interpretable(plan, a, "mmcl.losses.fused.sigmoid_row_sums")
  return _sigmoid_row_sums(plan, a, b, scale, bias, rows, cols)


def _softplus(x):
  """log(1 + eˣ), stable for any x, from primitives every backend lowers."""
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _sigmoid_tile(plan: _Plan, a, b, scale, bias, r: _TileMeta, c: _TileMeta):
  """(dots, z, allowed, y) of one tile; y = +1 on positives, −1 elsewhere."""
  dots = similarity(a, b)
  allowed, positive = _tile_masks(r, c, plan.rule)
  return dots, scale * dots + bias, allowed, jnp.where(positive, 1.0, -1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sigmoid_row_sums(plan, a, b, scale, bias, rows, cols):
  return _sigmoid_forward(plan, a, b, scale, bias, rows, cols)[0]


def _sigmoid_forward_kernel(plan: _Plan, col_tiles: int, *refs):
  """One row tile against all column tiles: Σ_j softplus(−y z) [T_r]."""
  it = iter(refs)
  a_ref, b_ref, scale_ref, bias_ref = _take(it, 4)
  row_refs, col_refs = _take(it, _num_meta(plan)), _take(it, _num_meta(plan))
  (out_ref,) = _take(it, 1)
  scale, bias = scale_ref[0], bias_ref[0]
  a = a_ref[...]
  r = _load_meta(row_refs, plan, slice(None))

  def col_tile(j, acc):
    cs = _tile_slice(j, plan.tile_cols)
    _, z, allowed, y = _sigmoid_tile(plan, a, b_ref[cs, :], scale, bias, r,
                                     _load_meta(col_refs, plan, cs))
    return acc + jnp.sum(jnp.where(allowed, _softplus(-y * z), 0.0), axis=1)

  out_ref[...] = lax.fori_loop(0, col_tiles, col_tile,
                               jnp.zeros((plan.tile_rows,), jnp.float32))


def _sigmoid_forward(plan: _Plan, a, b, scale, bias, rows: SideMeta, cols: SideMeta):
  tr, tc = plan.tile_rows, plan.tile_cols
  rows_pad = _cdiv(a.shape[0], tr) * tr
  cols_pad = _cdiv(b.shape[0], tc) * tc
  inputs = [_embeddings(a, rows_pad, plan), _embeddings(b, cols_pad, plan), scale.reshape(1),
            bias.reshape(1), *_meta_arrays(rows, rows_pad, plan),
            *_meta_arrays(cols, cols_pad, plan)]
  in_specs = [pl.BlockSpec((tr, plan.dim), lambda i: (i, 0)), pl.no_block_spec,
              pl.no_block_spec, pl.no_block_spec, *_meta_specs(plan, tr),
              *_meta_specs(plan, None)]
  kernel = functools.partial(_sigmoid_forward_kernel, plan, cols_pad // tc)
  sums = _call(kernel, plan, (rows_pad // tr,), in_specs, pl.BlockSpec((tr,), lambda i: (i,)),
               (rows_pad,), "mmcl_sigmoid_forward", inputs)
  return sums[:a.shape[0]], (a, b, scale, bias, rows, cols)


def _sigmoid_logit_grad(z, allowed, y, g_row):
  """G = [allowed] ḡ_i · (−y σ(−y z)) (d/dz softplus(−y z) = −y σ(−y z))."""
  return jnp.where(allowed, g_row[:, None] * (-y * jax.nn.sigmoid(-y * z)), 0.0)


def _sigmoid_da_kernel(plan: _Plan, col_tiles: int, *refs):
  """One row tile: dA [T_r, D] (unscaled), Σ_j G·<a, b> and Σ_j G [T_r]."""
  it = iter(refs)
  a_ref, b_ref, scale_ref, bias_ref = _take(it, 4)
  row_refs, col_refs = _take(it, _num_meta(plan)), _take(it, _num_meta(plan))
  (g_ref,) = _take(it, 1)
  da_ref, ds_ref, dc_ref = _take(it, 3)
  scale, bias = scale_ref[0], bias_ref[0]
  a = a_ref[...]
  r = _load_meta(row_refs, plan, slice(None))
  g_row = g_ref[...]

  def col_tile(j, state):
    da, ds, dc = state
    cs = _tile_slice(j, plan.tile_cols)
    b = b_ref[cs, :]
    dots, z, allowed, y = _sigmoid_tile(plan, a, b, scale, bias, r,
                                        _load_meta(col_refs, plan, cs))
    g = _sigmoid_logit_grad(z, allowed, y, g_row)
    da = da + lax.dot_general(g.astype(b.dtype), b, _ROW_GRAD,
                              preferred_element_type=jnp.float32)
    return da, ds + jnp.sum(g * dots, axis=1), dc + jnp.sum(g, axis=1)

  zeros = jnp.zeros((plan.tile_rows,), jnp.float32)
  da, ds, dc = lax.fori_loop(0, col_tiles, col_tile,
                             (jnp.zeros((plan.tile_rows, plan.dim), jnp.float32), zeros, zeros))
  da_ref[...] = da
  ds_ref[...] = ds
  dc_ref[...] = dc


def _sigmoid_db_kernel(plan: _Plan, row_tiles: int, *refs):
  """One column tile: dB [T_c, D] (unscaled)."""
  it = iter(refs)
  a_ref, b_ref, scale_ref, bias_ref = _take(it, 4)
  row_refs, col_refs = _take(it, _num_meta(plan)), _take(it, _num_meta(plan))
  (g_ref,) = _take(it, 1)
  (db_ref,) = _take(it, 1)
  scale, bias = scale_ref[0], bias_ref[0]
  b = b_ref[...]
  c = _load_meta(col_refs, plan, slice(None))

  def row_tile(i, db):
    rs = _tile_slice(i, plan.tile_rows)
    a = a_ref[rs, :]
    _, z, allowed, y = _sigmoid_tile(plan, a, b, scale, bias, _load_meta(row_refs, plan, rs), c)
    g = _sigmoid_logit_grad(z, allowed, y, g_ref[rs])
    return db + lax.dot_general(g.astype(a.dtype), a, _COL_GRAD,
                                preferred_element_type=jnp.float32)

  db_ref[...] = lax.fori_loop(0, row_tiles, row_tile,
                              jnp.zeros((plan.tile_cols, plan.dim), jnp.float32))


def _sigmoid_backward(plan: _Plan, residuals, g_sums):
  a, b, scale, bias, rows, cols = residuals
  num_rows, num_cols, dim = a.shape[0], b.shape[0], a.shape[1]
  inputs, rows_pad, cols_pad = _backward_inputs(plan, a, b, rows, cols, [g_sums], [])
  da, db, (ds_rows, dc_rows) = _gradient_kernels(
      plan, _sigmoid_da_kernel, _sigmoid_db_kernel, inputs, [scale.reshape(1), bias.reshape(1)],
      rows_pad, cols_pad, 2, "mmcl_sigmoid_backward")
  da = (scale * da[:num_rows, :dim]).astype(a.dtype)
  db = (scale * db[:num_cols, :dim]).astype(b.dtype)
  return (da, db, jnp.sum(ds_rows).astype(scale.dtype), jnp.sum(dc_rows).astype(bias.dtype),
          None, None)


_sigmoid_row_sums.defvjp(_sigmoid_forward, _sigmoid_backward)
