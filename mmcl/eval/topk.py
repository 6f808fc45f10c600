"""Exact inner-product retrieval, chunked over the corpus so memory stays bounded.

Both entry points stream the corpus through a `lax.scan` in chunks of `corpus_chunk` rows and
process queries in blocks of `query_chunk` rows (`lax.map`), so the largest live score block is
[query_chunk, corpus_chunk + k] whatever the corpus size. With a `mesh`, queries are sharded over
its "data" axis (`jax.shard_map`) and the corpus is replicated on every device.

Ordering, everywhere: decreasing score, ties broken by **lower corpus index first**. Scores are
inner products accumulated in float32 at `Precision.HIGHEST` (no bf16/tf32 passes on
accelerators), so the ranking is exact for the given embeddings.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

_DATA_AXIS = "data"


def _check_embeddings(queries, corpus, where: str):
  if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
    raise ValueError(f"{where}: expected queries [Q, D] and corpus [N, D] with the same D, got "
                     f"{tuple(queries.shape)} and {tuple(corpus.shape)}")
  for name, x in (("queries", queries), ("corpus", corpus)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{where}: {name} must be floating point, got {x.dtype}")
  if queries.shape[0] == 0 or corpus.shape[0] == 0:
    raise ValueError(f"{where}: empty queries {tuple(queries.shape)} or corpus "
                     f"{tuple(corpus.shape)}")


def _replicated_if_explicit(x: jax.Array) -> jax.Array:
  """Without a mesh argument, arrays laid out on an explicit-axes mesh are replicated first:
  explicit sharding types would otherwise reject the query x corpus product (both operands
  sharded over the same axis)."""
  sharding = getattr(x, "sharding", None)
  if (isinstance(sharding, NamedSharding) and AxisType.Explicit in sharding.mesh.axis_types
      and not sharding.is_fully_replicated):
    return jax.device_put(x, NamedSharding(sharding.mesh, P()))
  return x


def _data_shards(mesh: Mesh | None, where: str) -> int:
  if mesh is None:
    return 1
  if not mesh.axis_names or mesh.axis_names[0] != _DATA_AXIS:
    raise ValueError(f"{where}: mesh must have '{_DATA_AXIS}' as its first axis, got axes "
                     f"{mesh.axis_names}")
  return mesh.shape[_DATA_AXIS]


def _chunk_sizes(num_queries: int, num_corpus: int, query_chunk: int, corpus_chunk: int,
                 shards: int) -> tuple[int, int]:
  if query_chunk < 1 or corpus_chunk < 1:
    raise ValueError(f"query_chunk and corpus_chunk must be >= 1, got {query_chunk}, "
                     f"{corpus_chunk}")
  # Shrink chunks to the problem so small evals do not pay for padding.
  return (min(query_chunk, math.ceil(num_queries / shards)), min(corpus_chunk, num_corpus))


def _chunked_corpus(corpus: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """corpus [N, D] -> ([num_chunks, chunk, D] zero-padded, [num_chunks] int32 start indices)."""
  num, dim = corpus.shape
  num_chunks = math.ceil(num / chunk)
  padded = jnp.pad(corpus, ((0, num_chunks * chunk - num), (0, 0)))
  return padded.reshape(num_chunks, chunk, dim), jnp.arange(num_chunks, dtype=jnp.int32) * chunk


def _chunk_scores(queries: jax.Array, chunk: jax.Array, start: jax.Array, num_corpus: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Scores of a query block against one corpus chunk.

  Args:
    queries: [Qc, D].
    chunk: [C, D] rows start..start+C-1 of the zero-padded corpus.
    start: [] int32.
    num_corpus: N, rows >= N are padding.

  Returns:
    scores [Qc, C] float32, indices [C] int32, valid [C] bool (False on padding rows).
  """
  scores = jnp.einsum("qd,cd->qc", queries, chunk, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
  indices = start + jnp.arange(chunk.shape[0], dtype=jnp.int32)
  return scores, indices, indices < num_corpus


def _over_query_blocks(block_fn: Callable, query_args: Sequence[jax.Array],
                       corpus_args: Sequence[jax.Array], *, query_chunk: int,
                       mesh: Mesh | None, pad_values: Sequence):
  """Runs `block_fn(*query_blocks, *corpus_args)` over blocks of `query_chunk` query rows.

  Query-side arrays (leading axis Q) are padded to a multiple of shards * query_chunk with
  `pad_values`, sharded over the mesh's data axis when a mesh is given, and split into blocks
  processed one after another (`lax.map`); corpus-side arrays are replicated. Outputs have a
  leading Q axis and are cut back to Q rows.
  """
  num_queries = query_args[0].shape[0]
  shards = 1 if mesh is None else mesh.shape[_DATA_AXIS]
  padded_q = math.ceil(num_queries / (shards * query_chunk)) * shards * query_chunk
  query_args = [
      jnp.pad(x, [(0, padded_q - num_queries)] + [(0, 0)] * (x.ndim - 1), constant_values=v)
      for x, v in zip(query_args, pad_values)]

  def local(*args):
    q_args, c_args = args[:len(query_args)], args[len(query_args):]
    blocks = [x.reshape(x.shape[0] // query_chunk, query_chunk, *x.shape[1:]) for x in q_args]
    out = jax.lax.map(lambda xs: block_fn(*xs, *c_args), blocks)
    return jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), out)

  if mesh is None:
    out = local(*query_args, *corpus_args)
  else:
    query_args = [_constrain(x, mesh, P(_DATA_AXIS)) for x in query_args]
    corpus_args = [_constrain(x, mesh, P()) for x in corpus_args]
    out = jax.shard_map(
        local, mesh=mesh,
        in_specs=tuple([P(_DATA_AXIS)] * len(query_args) + [P()] * len(corpus_args)),
        # Each shard's work is independent (no collectives); the varying-axis check would only
        # demand pcasts on the scan carries.
        out_specs=P(_DATA_AXIS), check_vma=False)(*query_args, *corpus_args)
    # Gather the small [Q, ...] results: cutting the padding off a data-sharded axis is not
    # expressible when Q is not a multiple of the shard count.
    out = jax.tree.map(lambda y: _constrain(y, mesh, P()), out)
  return jax.tree.map(lambda y: y[:num_queries], out)


def _constrain(x: jax.Array, mesh: Mesh, spec: P) -> jax.Array:
  """Lays `x` out as `spec` on `mesh` inside jit, for explicit and auto mesh axes alike."""
  sharding = NamedSharding(mesh, spec)
  if AxisType.Explicit in mesh.axis_types:
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def _topk_block(queries, exclude, chunks, starts, *, k: int, num_corpus: int):
  """Top-k of a query block [Qc, D] over all corpus chunks (running merge); exclude [Qc, E]."""
  num_q = queries.shape[0]
  chunk_size = chunks.shape[1]
  rows = jnp.arange(num_q)[:, None]

  def step(carry, xs):
    top_scores, top_indices = carry
    scores, indices, valid = _chunk_scores(queries, *xs, num_corpus)
    scores = jnp.where(valid[None, :], scores, -jnp.inf)
    if exclude.shape[1]:
      local = exclude - xs[1]
      inside = (exclude >= 0) & (local >= 0) & (local < chunk_size)
      # Out-of-chunk exclusions point past the end and are dropped by the scatter.
      local = jnp.where(inside, local, chunk_size)
      scores = scores.at[rows, local].set(-jnp.inf, mode="drop")
    # Carried entries precede the chunk's and hold lower corpus indices, and lax.top_k puts the
    # lower position first on ties, so ties resolve to the lower corpus index.
    cand_scores = jnp.concatenate([top_scores, scores], axis=1)
    cand_indices = jnp.concatenate(
        [top_indices, jnp.broadcast_to(indices[None, :], scores.shape)], axis=1)
    top_scores, pos = jax.lax.top_k(cand_scores, k)
    return (top_scores, jnp.take_along_axis(cand_indices, pos, axis=1)), None

  init = (jnp.full((num_q, k), -jnp.inf, jnp.float32), jnp.full((num_q, k), -1, jnp.int32))
  (top_scores, top_indices), _ = jax.lax.scan(step, init, (chunks, starts))
  return top_scores, top_indices


@functools.partial(jax.jit, static_argnames=("k", "corpus_chunk", "query_chunk", "mesh"))
def _exact_topk(queries, corpus, exclude, *, k, corpus_chunk, query_chunk, mesh):
  chunks, starts = _chunked_corpus(corpus, corpus_chunk)
  block = functools.partial(_topk_block, k=k, num_corpus=corpus.shape[0])
  return _over_query_blocks(block, [queries, exclude], [chunks, starts], query_chunk=query_chunk,
                            mesh=mesh, pad_values=[0, -1])


def exact_topk(queries: jax.Array | np.ndarray, corpus: jax.Array | np.ndarray, k: int, *,
               corpus_chunk: int = 8192, query_chunk: int = 1024, mesh: Mesh | None = None,
               exclude: jax.Array | np.ndarray | None = None) -> tuple[jax.Array, jax.Array]:
  """Exact top-k corpus items per query by inner product.

  Memory is O(query_chunk * (corpus_chunk + k)) per device beside the inputs; the corpus is
  scanned chunk by chunk with a running top-k merge (`lax.top_k` over the carried k and the
  chunk's scores), the last chunk padded with -inf scores.

  Args:
    queries: [Q, D] float (any float dtype; scores accumulate in float32).
    corpus: [N, D] float.
    k: number of items to return, 1 <= k <= N.
    corpus_chunk: corpus rows scored per step (clipped to N; a static jit argument).
    query_chunk: query rows per block and device (clipped to the rows per shard; static).
    mesh: optional mesh whose first axis is "data" (explicit or auto axis types); queries are
      sharded over it, the corpus replicated; the small outputs come back replicated.
    exclude: optional [Q, E] int corpus indices to leave out per query (e.g. items a user already
      interacted with), padded with -1.

  Returns:
    scores: [Q, k] float32, non-increasing along k.
    indices: [Q, k] int32 corpus indices; ties broken by lower index. When fewer than k items
      remain after `exclude`, the trailing slots hold score -inf and index -1.
  """
  queries = jnp.asarray(queries)
  corpus = jnp.asarray(corpus)
  _check_embeddings(queries, corpus, "exact_topk")
  num_q, num_c = queries.shape[0], corpus.shape[0]
  if not 1 <= k <= num_c:
    raise ValueError(f"exact_topk: expected 1 <= k <= N={num_c}, got k={k}")
  if exclude is None:
    exclude = np.zeros((num_q, 0), np.int32)
  exclude = jnp.asarray(exclude)
  if (exclude.ndim != 2 or exclude.shape[0] != num_q
      or not jnp.issubdtype(exclude.dtype, jnp.integer)):
    raise ValueError(f"exact_topk: expected exclude int [Q={num_q}, E], got {exclude.dtype} "
                     f"{tuple(exclude.shape)}")
  shards = _data_shards(mesh, "exact_topk")
  if mesh is None:
    queries, corpus, exclude = map(_replicated_if_explicit, (queries, corpus, exclude))
  query_chunk, corpus_chunk = _chunk_sizes(num_q, num_c, query_chunk, corpus_chunk, shards)
  return _exact_topk(queries, corpus, exclude.astype(jnp.int32), k=k, corpus_chunk=corpus_chunk,
                     query_chunk=query_chunk, mesh=mesh)


def _rank_block(queries, labels, chunks, starts, corpus_labels, *, num_corpus: int):
  """0-based rank of each query's first positive; queries [Qc, D], labels [Qc]."""
  num_q = queries.shape[0]
  label_chunks = corpus_labels.reshape(chunks.shape[0], chunks.shape[1])

  def chunk(xs):
    chunk_rows, start, chunk_labels = xs
    scores, indices, valid = _chunk_scores(queries, chunk_rows, start, num_corpus)
    positive = valid[None, :] & (chunk_labels[None, :] == labels[:, None])
    return scores, indices, valid, positive

  def best_positive(carry, xs):
    best_score, best_index = carry
    scores, indices, _, positive = chunk(xs)
    scores = jnp.where(positive, scores, -jnp.inf)
    chunk_best = scores.max(axis=1)
    # Strict > keeps the earlier (lower-index) positive on ties; argmax returns the first max.
    better = chunk_best > best_score
    return (jnp.where(better, chunk_best, best_score),
            jnp.where(better, indices[scores.argmax(axis=1)], best_index)), None

  init = (jnp.full((num_q,), -jnp.inf, jnp.float32), jnp.full((num_q,), num_corpus, jnp.int32))
  (best_score, best_index), _ = jax.lax.scan(best_positive, init, (chunks, starts, label_chunks))

  def count_above(count, xs):
    scores, indices, valid, positive = chunk(xs)
    # Positives never count: the rank is that of the first positive, and this keeps the
    # positive from outranking itself even if two score passes rounded differently.
    above = (scores > best_score[:, None]) | (
        (scores == best_score[:, None]) & (indices[None, :] < best_index[:, None]))
    return count + (above & valid[None, :] & ~positive).sum(axis=1, dtype=jnp.int32), None

  count, _ = jax.lax.scan(count_above, jnp.zeros((num_q,), jnp.int32),
                          (chunks, starts, label_chunks))
  return count


@functools.partial(jax.jit, static_argnames=("corpus_chunk", "query_chunk", "mesh"))
def _positive_ranks(queries, corpus, query_labels, corpus_labels, *, corpus_chunk, query_chunk,
                    mesh):
  chunks, starts = _chunked_corpus(corpus, corpus_chunk)
  num_c = corpus.shape[0]
  # Padding rows' labels are irrelevant: `valid` masks them out of both passes.
  corpus_labels = jnp.pad(corpus_labels, (0, chunks.shape[0] * corpus_chunk - num_c))
  block = functools.partial(_rank_block, num_corpus=num_c)
  return _over_query_blocks(block, [queries, query_labels], [chunks, starts, corpus_labels],
                            query_chunk=query_chunk, mesh=mesh, pad_values=[0, -1])


def positive_ranks(queries: jax.Array | np.ndarray, corpus: jax.Array | np.ndarray,
                   query_labels: jax.Array | np.ndarray, corpus_labels: jax.Array | np.ndarray,
                   *, corpus_chunk: int = 8192, query_chunk: int = 1024,
                   mesh: Mesh | None = None) -> jax.Array:
  """Rank of each query's first positive in the full ranking of the corpus, without a top-k.

  Corpus item j is a positive of query q iff `corpus_labels[j] == query_labels[q]` (for paired
  data, both labels are arange). The ranking is the one `exact_topk` returns (decreasing score,
  ties to the lower index), so `rank < k` iff a positive is among `exact_topk(..., k)`.
  Two chunked passes over the corpus: the best positive's score and index, then the count of
  non-positives ranked above it.

  Args:
    queries: [Q, D] float.
    corpus: [N, D] float.
    query_labels: [Q] int; every label must occur in `corpus_labels`.
    corpus_labels: [N] int.
    corpus_chunk, query_chunk, mesh: as in `exact_topk`.

  Returns:
    [Q] int32 0-based ranks (0 = a positive is the top item).
  """
  queries = jnp.asarray(queries)
  corpus = jnp.asarray(corpus)
  _check_embeddings(queries, corpus, "positive_ranks")
  num_q, num_c = queries.shape[0], corpus.shape[0]
  query_labels = np.asarray(query_labels)
  corpus_labels = np.asarray(corpus_labels)
  if query_labels.shape != (num_q,) or corpus_labels.shape != (num_c,):
    raise ValueError(f"positive_ranks: expected query_labels [{num_q}] and corpus_labels "
                     f"[{num_c}], got {query_labels.shape} and {corpus_labels.shape}")
  for name, x in (("query_labels", query_labels), ("corpus_labels", corpus_labels)):
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"positive_ranks: {name} must be integers, got {x.dtype}")
  missing = ~np.isin(query_labels, corpus_labels)
  if missing.any():
    raise ValueError(f"positive_ranks: {int(missing.sum())} queries have no positive in the "
                     f"corpus, e.g. query {int(np.argmax(missing))} with label "
                     f"{query_labels[missing][0]}")
  shards = _data_shards(mesh, "positive_ranks")
  if mesh is None:
    queries, corpus = map(_replicated_if_explicit, (queries, corpus))
  query_chunk, corpus_chunk = _chunk_sizes(num_q, num_c, query_chunk, corpus_chunk, shards)
  return _positive_ranks(queries, corpus, jnp.asarray(query_labels, jnp.int32),
                         jnp.asarray(corpus_labels, jnp.int32), corpus_chunk=corpus_chunk,
                         query_chunk=query_chunk, mesh=mesh)


def pad_ragged(rows: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
  """[Q, E] int32 from ragged per-query index lists, padded with -1 (for `exclude`)."""
  width = max((len(r) for r in rows), default=0) if width is None else width
  out = np.full((len(rows), width), -1, np.int32)
  for q, row in enumerate(rows):
    if len(row) > width:
      raise ValueError(f"pad_ragged: row {q} has {len(row)} entries, more than width {width}")
    out[q, :len(row)] = row
  return out
