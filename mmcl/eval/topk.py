"""Exact inner-product retrieval, chunked over the corpus so memory stays bounded.

Both entry points stream the corpus through a `lax.scan` in chunks of `corpus_chunk` rows and
process queries in blocks of `query_chunk` rows (`lax.map`), so the largest live score block is
[query_chunk, corpus_chunk + k] whatever the corpus size.

With a `mesh`, the work is split over its "data" axis (`jax.shard_map`) in one of two ways
(`shard=`):
  "queries"  queries sharded, the corpus replicated on every device: no communication until the
             small [Q, k] results are gathered; each device holds the whole corpus.
  "corpus"   the corpus sharded (N / S rows per device), queries replicated: each device ranks
             its corpus slice, then the S local top-k lists are all-gathered ([Q, S·k]) and
             merged (`exact_topk`), or the best positive is agreed on with pmax/pmin and the
             counts above it are summed with psum (`positive_ranks`).
  "auto"     (default) shards whichever of the two is larger, so the replicated operand is the
             smaller one: a 10M-item corpus is split over the devices, a few thousand paired
             image/text embeddings are split by query.
Both modes do the same FLOPs and return identical results (same tie-breaking), so the choice only
moves memory: per device O(N·D + Q·D / S) for "queries", O(N·D / S + Q·D) for "corpus".

On a CPU-only host with no multi-device mesh, `exact_topk` hands the scoring to FAISS
(`faiss.knn`, the brute-force inner-product search behind `IndexFlatIP`: one BLAS sgemm per block
and a heap per query), which is faster than XLA's CPU matmul + `lax.top_k` there, and re-sorts its
candidates so the result is the one the XLA path defines (see `backend=`). Accelerators and corpora
sharded over several devices keep the XLA path.

Ordering, everywhere: decreasing score, ties broken by **lower corpus index first**; a NaN score
ranks last (as -inf): `positive_ranks` ranks a NaN positive below every item, and `exact_topk` never
returns an item whose score is NaN (its slot stays empty, index -1). Scores are
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
SHARD_MODES = ("auto", "queries", "corpus")


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
                 shards: int, shard: str = "queries") -> tuple[int, int]:
  if query_chunk < 1 or corpus_chunk < 1:
    raise ValueError(f"query_chunk and corpus_chunk must be >= 1, got {query_chunk}, "
                     f"{corpus_chunk}")
  # Shrink chunks to the problem (the sharded side to its rows per device) so small evals do
  # not pay for padding.
  if shard == "corpus":
    return min(query_chunk, num_queries), min(corpus_chunk, math.ceil(num_corpus / shards))
  return (min(query_chunk, math.ceil(num_queries / shards)), min(corpus_chunk, num_corpus))


def _pad_rows(x: jax.Array, multiple: int) -> jax.Array:
  """x [N, ...] zero-padded to a multiple of `multiple` rows (x itself when it already is one)."""
  extra = -x.shape[0] % multiple
  return x if not extra else jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))


def _scan_chunks(step: Callable, init, corpus: jax.Array, extras: Sequence[jax.Array], *,
                 chunk: int, corpus_sharded: bool, num_corpus: int):
  """Folds `step(carry, rows, extra_rows, indices, valid) -> carry` over the corpus in chunks.

  Chunks are dynamic slices of `corpus`, never a padded copy of it (a 10M x 512 float32 corpus
  is 20 GB): the last chunk is moved back to end at the last row, and its rows that the previous
  chunk already covered are marked invalid.

  Args:
    corpus: [n, D] this device's corpus rows (all N rows, or its slice when `corpus_sharded`,
      inside shard_map); chunk <= n.
    extras: arrays [n, ...] sliced alongside (e.g. labels).
    chunk: C, rows per step.
    corpus_sharded: the global index of local row r is axis_index("data") * n + r.
    num_corpus: N; rows with a global index >= N (shard padding) are invalid.

  `step` receives rows [C, D], extra_rows [[C, ...]], indices [C] int32 (global, increasing
  from chunk to chunk) and valid [C] bool.
  """
  n = corpus.shape[0]
  offset = jax.lax.axis_index(_DATA_AXIS) * n if corpus_sharded else 0

  def body(carry, i):
    nominal = i * chunk
    start = jnp.minimum(nominal, n - chunk)
    rows = jax.lax.dynamic_slice_in_dim(corpus, start, chunk)
    extra_rows = [jax.lax.dynamic_slice_in_dim(e, start, chunk) for e in extras]
    local = start + jnp.arange(chunk, dtype=jnp.int32)
    indices = (offset + local).astype(jnp.int32)
    valid = (local >= nominal) & (indices < num_corpus)
    return step(carry, rows, extra_rows, indices, valid), None

  carry, _ = jax.lax.scan(body, init, jnp.arange(math.ceil(n / chunk), dtype=jnp.int32))
  return carry


def _scores(queries: jax.Array, rows: jax.Array) -> jax.Array:
  """queries [Qc, D], rows [C, D] -> [Qc, C] float32 inner products at full precision.

  NaN scores become -inf, so a NaN ranks last, never first (a comparison with NaN is always
  false, which would otherwise put it above everything in `positive_ranks`).
  """
  s = jnp.einsum("qd,cd->qc", queries, rows, precision=jax.lax.Precision.HIGHEST,
                 preferred_element_type=jnp.float32)
  return jnp.where(jnp.isnan(s), -jnp.inf, s)


def _over_query_blocks(block_fn: Callable, query_args: Sequence[jax.Array],
                       corpus_args: Sequence[jax.Array], *, query_chunk: int,
                       mesh: Mesh | None, pad_values: Sequence, shard: str = "queries"):
  """Runs `block_fn(*query_blocks, *corpus_args)` over blocks of `query_chunk` query rows.

  Query-side arrays (leading axis Q) are padded with `pad_values` and split into blocks processed
  one after another (`lax.map`). Outputs have a leading Q axis and are cut back to Q rows.

  With a mesh and shard="queries", query arrays are padded to a multiple of shards * query_chunk
  and sharded over the data axis, corpus arrays replicated. With shard="corpus", corpus arrays
  (leading axis a multiple of the shard count) are sharded over the data axis and queries
  replicated; `block_fn` then sees its device's corpus slice and must combine the shards itself
  (collectives over the data axis) so that its output is the same on every device.
  """
  num_queries = query_args[0].shape[0]
  shards = 1 if mesh is None or shard == "corpus" else mesh.shape[_DATA_AXIS]
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
  elif shard == "corpus":
    query_args = [_constrain(x, mesh, P()) for x in query_args]
    corpus_args = [_constrain(x, mesh, P(_DATA_AXIS)) for x in corpus_args]
    out = jax.shard_map(
        local, mesh=mesh,
        in_specs=tuple([P()] * len(query_args) + [P(_DATA_AXIS)] * len(corpus_args)),
        # block_fn reduces over the data axis, so every device holds the same result; the
        # varying-axis check cannot see that through lax.map and would demand pcasts.
        out_specs=P(), check_vma=False)(*query_args, *corpus_args)
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


def _topk_block(queries, exclude, corpus, *, k: int, chunk: int, num_corpus: int,
                corpus_sharded: bool):
  """Top-k of a query block over this device's corpus rows (running merge over chunks).

  Args:
    queries: [Qc, D]; exclude: [Qc, E] int global corpus indices (-1 padded).
    corpus: [n, D] (see `_scan_chunks`).

  Returns:
    scores [Qc, k] float32, indices [Qc, k] int32 (-inf / -1 in empty slots).
  """
  num_q = queries.shape[0]
  rows_q = jnp.arange(num_q)[:, None]

  def step(carry, rows, _, indices, valid):
    top_scores, top_indices = carry
    scores = jnp.where(valid[None, :], _scores(queries, rows), -jnp.inf)
    if exclude.shape[1]:
      local = exclude - indices[0]
      inside = (exclude >= 0) & (local >= 0) & (local < chunk)
      # Out-of-chunk exclusions point past the end and are dropped by the scatter.
      local = jnp.where(inside, local, chunk)
      scores = scores.at[rows_q, local].set(-jnp.inf, mode="drop")
    # Carried entries precede the chunk's and hold lower corpus indices (the chunk's valid rows
    # are all new), and lax.top_k puts the lower position first on ties, so ties resolve to the
    # lower corpus index.
    cand_scores = jnp.concatenate([top_scores, scores], axis=1)
    cand_indices = jnp.concatenate(
        [top_indices, jnp.broadcast_to(indices[None, :], scores.shape)], axis=1)
    top_scores, pos = jax.lax.top_k(cand_scores, k)
    return top_scores, jnp.take_along_axis(cand_indices, pos, axis=1)

  init = (jnp.full((num_q, k), -jnp.inf, jnp.float32), jnp.full((num_q, k), -1, jnp.int32))
  top_scores, top_indices = _scan_chunks(step, init, corpus, [], chunk=chunk,
                                         corpus_sharded=corpus_sharded, num_corpus=num_corpus)
  if corpus_sharded:
    return _merge_shard_topk(top_scores, top_indices, k)
  return top_scores, top_indices


def _merge_shard_topk(scores: jax.Array, indices: jax.Array, k: int
                      ) -> tuple[jax.Array, jax.Array]:
  """Global top-k from each data shard's local top-k; scores, indices: [Qc, k] per shard.

  The all-gather lays the lists out shard by shard, i.e. by increasing corpus index, and each
  list is ordered with ties to the lower index, so lax.top_k (lower position first on ties)
  keeps the global tie-breaking. Empty slots (-inf, -1) stay behind every real item.
  """
  all_scores = jax.lax.all_gather(scores, _DATA_AXIS, axis=1, tiled=True)
  all_indices = jax.lax.all_gather(indices, _DATA_AXIS, axis=1, tiled=True)
  top_scores, pos = jax.lax.top_k(all_scores, k)
  return top_scores, jnp.take_along_axis(all_indices, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "num_corpus", "corpus_chunk", "query_chunk",
                                             "mesh", "shard"))
def _exact_topk(queries, corpus, exclude, *, k, num_corpus, corpus_chunk, query_chunk, mesh,
                shard):
  if shard == "corpus":
    corpus = _pad_rows(corpus, mesh.shape[_DATA_AXIS])
  block = functools.partial(_topk_block, k=k, chunk=corpus_chunk, num_corpus=num_corpus,
                            corpus_sharded=shard == "corpus")
  return _over_query_blocks(block, [queries, exclude], [corpus], query_chunk=query_chunk,
                            mesh=mesh, pad_values=[0, -1], shard=shard)


def _resolve_shard(shard: str, num_queries: int, num_corpus: int, mesh: Mesh | None,
                   where: str) -> str:
  """The effective mode: "queries" or "corpus" ("queries" without a mesh, where it is moot)."""
  if shard not in SHARD_MODES:
    raise ValueError(f"{where}: shard must be one of {SHARD_MODES}, got {shard!r}")
  if mesh is None:
    return "queries"
  if shard == "auto":
    return "corpus" if num_corpus > num_queries else "queries"
  return shard


def _place_corpus(corpus, mesh: Mesh | None, shard: str):
  """Host corpora for shard="corpus" are padded to a multiple of the shard count on the host and
  sent to the devices already split, so no device ever holds the whole corpus (jnp.asarray
  would put it all on one)."""
  if shard != "corpus" or isinstance(corpus, jax.Array):
    return jnp.asarray(corpus)
  corpus = np.asarray(corpus)
  extra = -corpus.shape[0] % mesh.shape[_DATA_AXIS]
  if extra:
    corpus = np.pad(corpus, ((0, extra), (0, 0)))
  return jax.device_put(corpus, NamedSharding(mesh, P(_DATA_AXIS)))


BACKENDS = ("auto", "xla", "faiss")


def _faiss_module():
  """The `faiss` module, or None when it is not installed (the XLA path is used then)."""
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return faiss


def _on_one_cpu_device(mesh: Mesh | None, arrays: Sequence) -> bool:
  """True when the work would run on host CPUs without a corpus sharded over several devices:
  no mesh (or a one-device mesh), and every jax.Array argument lives on CPU devices."""
  if mesh is not None:
    if mesh.devices.size != 1 or mesh.devices.flat[0].platform != "cpu":
      return False
  elif jax.default_backend() != "cpu":
    return False
  for x in arrays:
    if isinstance(x, jax.Array):
      devices = x.sharding.device_set
      if any(d.platform != "cpu" for d in devices) or not x.is_fully_addressable:
        return False
  return True


def _use_faiss(backend: str, mesh: Mesh | None, arrays: Sequence) -> bool:
  if backend not in BACKENDS:
    raise ValueError(f"exact_topk: backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "xla":
    return False
  if _faiss_module() is None:
    if backend == "faiss":
      raise ImportError("exact_topk(backend='faiss') needs the faiss-cpu package "
                        "(pip install 'faiss-cpu>=1.9')")
    return False
  if backend == "faiss":
    return True
  return _on_one_cpu_device(mesh, arrays)


def _faiss_topk(queries: np.ndarray, corpus: np.ndarray, k: int, exclude: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """FAISS brute-force inner-product top-k, made to follow `exact_topk`'s ordering contract.

  FAISS is asked for k + E + 1 candidates (E = exclusions per query); the excluded ones are
  dropped, NaN scores (FAISS never admits them to its heap) and empty slots become -inf / -1,
  and the rest is sorted by (score descending, index ascending). A query whose k-th score ties
  with the last candidate fetched may have an equal-scoring item with a lower index beyond the
  candidates: such queries are flagged for an exact recomputation on the XLA path.

  Args:
    queries: [Q, D] float32 (C-contiguous); corpus: [N, D] float32; k <= N.
    exclude: [Q, E] int corpus indices to leave out (-1 padded).

  Returns:
    scores [Q, k] float32, indices [Q, k] int32, unsure [Q] bool (rows to recompute).
  """
  faiss = _faiss_module()
  num_c = corpus.shape[0]
  fetch = min(num_c, k + exclude.shape[1] + 1)
  raw_scores, raw_ids = faiss.knn(queries, corpus, fetch, metric=faiss.METRIC_INNER_PRODUCT)
  ids = raw_ids.astype(np.int64)
  empty = (ids < 0) | np.isnan(raw_scores)
  if exclude.shape[1]:
    empty |= (ids[:, :, None] == np.where(exclude < 0, -2, exclude)[:, None, :]).any(axis=2)
  scores = np.where(empty, -np.inf, raw_scores).astype(np.float32)
  ids = np.where(empty, -1, ids)
  # Sort by (-score, index), with empty slots (index -1, score -inf) after every real item.
  order = np.lexsort((np.where(ids < 0, num_c, ids), -scores.astype(np.float64)), axis=1)
  scores = np.take_along_axis(scores, order, 1)
  ids = np.take_along_axis(ids, order, 1)
  # Items FAISS did not return score at most its lowest returned score (or NaN); when that
  # equals the k-th score here, one of them could tie with it and hold a lower index. A row
  # with an empty FAISS slot holds every item that has a score.
  full = (raw_ids >= 0).all(axis=1)
  lowest = np.where(raw_ids >= 0, raw_scores, np.inf).min(axis=1)
  kth = scores[:, k - 1]
  unsure = (fetch < num_c) & full & np.isfinite(kth) & (lowest >= kth)
  return scores[:, :k], ids[:, :k].astype(np.int32), unsure


def exact_topk(queries: jax.Array | np.ndarray, corpus: jax.Array | np.ndarray, k: int, *,
               corpus_chunk: int = 8192, query_chunk: int = 1024, mesh: Mesh | None = None,
               exclude: jax.Array | np.ndarray | None = None, shard: str = "auto",
               backend: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Exact top-k corpus items per query by inner product.

  Memory is O(query_chunk * (corpus_chunk + k)) per device beside the inputs; the corpus is
  scanned chunk by chunk (dynamic slices, never a padded copy) with a running top-k merge
  (`lax.top_k` over the carried k and the chunk's scores).

  Args:
    queries: [Q, D] float (any float dtype; scores accumulate in float32).
    corpus: [N, D] float.
    k: number of items to return, 1 <= k <= N.
    corpus_chunk: corpus rows scored per step (clipped to N; a static jit argument).
    query_chunk: query rows per block and device (clipped to the rows per shard; static).
    mesh: optional mesh whose first axis is "data" (explicit or auto axis types); the work is
      split over it as `shard` says; the small outputs come back replicated.
    exclude: optional [Q, E] int corpus indices to leave out per query (e.g. items a user already
      interacted with), padded with -1.
    shard: with a mesh, "queries", "corpus" or "auto" (the larger of the two; see the module
      docstring). A host (numpy) corpus sharded by "corpus" goes to the devices already split.
    backend: "xla" (the chunked scan above, on any device and mesh), "faiss" (FAISS on the host
      CPU; needs faiss-cpu; inputs are gathered to the host as float32) or "auto" (default):
      FAISS when it is installed, the default backend is the CPU, `mesh` has at most one device
      and the inputs live on CPU devices; XLA otherwise. Both return the same items in the same
      order (queries whose k-th score ties beyond FAISS's candidates are recomputed on XLA);
      scores may differ in the last float32 bit (BLAS and XLA sum in different orders).

  Returns:
    scores: [Q, k] float32, non-increasing along k.
    indices: [Q, k] int32 corpus indices; ties broken by lower index. When fewer than k items
      remain after `exclude`, the trailing slots hold score -inf and index -1.
  """
  if not isinstance(queries, jax.Array):
    queries = np.asarray(queries)
  corpus = corpus if isinstance(corpus, jax.Array) else np.asarray(corpus)
  _check_embeddings(queries, corpus, "exact_topk")
  num_q, num_c = queries.shape[0], corpus.shape[0]
  if not 1 <= k <= num_c:
    raise ValueError(f"exact_topk: expected 1 <= k <= N={num_c}, got k={k}")
  if exclude is None:
    exclude = np.zeros((num_q, 0), np.int32)
  if (exclude.ndim != 2 or exclude.shape[0] != num_q
      or not jnp.issubdtype(exclude.dtype, jnp.integer)):
    raise ValueError(f"exact_topk: expected exclude int [Q={num_q}, E], got {exclude.dtype} "
                     f"{tuple(exclude.shape)}")
  _data_shards(mesh, "exact_topk")
  _resolve_shard(shard, num_q, num_c, mesh, "exact_topk")
  if _use_faiss(backend, mesh, (queries, corpus, exclude)):
    host = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    q_host, exclude_host = host(queries), np.asarray(exclude, np.int64)
    scores, indices, unsure = _faiss_topk(q_host, host(corpus), k, exclude_host)
    if unsure.any():
      rows = np.flatnonzero(unsure)
      exact_scores, exact_indices = exact_topk(
          q_host[rows], corpus, k, corpus_chunk=corpus_chunk, query_chunk=query_chunk,
          exclude=exclude_host[rows].astype(np.int32), backend="xla")
      scores[rows], indices[rows] = np.asarray(exact_scores), np.asarray(exact_indices)
    if mesh is not None:
      return tuple(jax.device_put(x, NamedSharding(mesh, P())) for x in (scores, indices))
    return jnp.asarray(scores), jnp.asarray(indices)
  queries, exclude = jnp.asarray(queries), jnp.asarray(exclude)
  shards = _data_shards(mesh, "exact_topk")
  shard = _resolve_shard(shard, num_q, num_c, mesh, "exact_topk")
  query_chunk, corpus_chunk = _chunk_sizes(num_q, num_c, query_chunk, corpus_chunk, shards, shard)
  corpus = _place_corpus(corpus, mesh, shard)
  if mesh is None:
    queries, corpus, exclude = map(_replicated_if_explicit, (queries, corpus, exclude))
  return _exact_topk(queries, corpus, exclude.astype(jnp.int32), k=k, num_corpus=num_c,
                     corpus_chunk=corpus_chunk, query_chunk=query_chunk, mesh=mesh, shard=shard)


def _rank_block(queries, labels, corpus, corpus_labels, *, chunk: int, num_corpus: int,
                corpus_sharded: bool):
  """0-based rank of each query's first positive among this device's corpus rows.

  Args:
    queries: [Qc, D]; labels: [Qc] int (-1 on padding queries).
    corpus: [n, D]; corpus_labels: [n] int (see `_scan_chunks`).

  With `corpus_sharded` (inside shard_map) the devices agree on the global first positive before
  counting, and sum their counts.

  Returns:
    [Qc] int32.
  """
  num_q = queries.shape[0]

  def positives(label_rows, valid):
    return valid[None, :] & (label_rows[0][None, :] == labels[:, None])

  def best_positive(carry, rows, label_rows, indices, valid):
    best_score, best_index = carry
    scores = jnp.where(positives(label_rows, valid), _scores(queries, rows), -jnp.inf)
    chunk_best = scores.max(axis=1)
    # Strict > keeps the earlier (lower-index) positive on ties; argmax returns the first max.
    better = chunk_best > best_score
    return (jnp.where(better, chunk_best, best_score),
            jnp.where(better, indices[scores.argmax(axis=1)], best_index))

  scan = functools.partial(_scan_chunks, corpus=corpus, extras=[corpus_labels], chunk=chunk,
                           corpus_sharded=corpus_sharded, num_corpus=num_corpus)
  init = (jnp.full((num_q,), -jnp.inf, jnp.float32), jnp.full((num_q,), num_corpus, jnp.int32))
  best_score, best_index = scan(best_positive, init)
  if corpus_sharded:
    global_best = jax.lax.pmax(best_score, _DATA_AXIS)
    best_index = jax.lax.pmin(jnp.where(best_score == global_best, best_index, num_corpus),
                              _DATA_AXIS)
    best_score = global_best

  def count_above(count, rows, label_rows, indices, valid):
    scores = _scores(queries, rows)
    # Positives never count: the rank is that of the first positive, and this keeps the
    # positive from outranking itself even if two score passes rounded differently.
    above = (scores > best_score[:, None]) | (
        (scores == best_score[:, None]) & (indices[None, :] < best_index[:, None]))
    return count + (above & valid[None, :] & ~positives(label_rows, valid)).sum(
        axis=1, dtype=jnp.int32)

  count = scan(count_above, jnp.zeros((num_q,), jnp.int32))
  return jax.lax.psum(count, _DATA_AXIS) if corpus_sharded else count


@functools.partial(jax.jit, static_argnames=("num_corpus", "corpus_chunk", "query_chunk", "mesh",
                                             "shard"))
def _positive_ranks(queries, corpus, query_labels, corpus_labels, *, num_corpus, corpus_chunk,
                    query_chunk, mesh, shard):
  if shard == "corpus":
    corpus = _pad_rows(corpus, mesh.shape[_DATA_AXIS])
  # Labels of padding rows are irrelevant: `valid` masks those rows out of both passes.
  corpus_labels = jnp.pad(corpus_labels, (0, corpus.shape[0] - corpus_labels.shape[0]))
  block = functools.partial(_rank_block, chunk=corpus_chunk, num_corpus=num_corpus,
                            corpus_sharded=shard == "corpus")
  return _over_query_blocks(block, [queries, query_labels], [corpus, corpus_labels],
                            query_chunk=query_chunk, mesh=mesh, pad_values=[0, -1], shard=shard)


def positive_ranks(queries: jax.Array | np.ndarray, corpus: jax.Array | np.ndarray,
                   query_labels: jax.Array | np.ndarray, corpus_labels: jax.Array | np.ndarray,
                   *, corpus_chunk: int = 8192, query_chunk: int = 1024,
                   mesh: Mesh | None = None, shard: str = "auto") -> jax.Array:
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
    corpus_chunk, query_chunk, mesh, shard: as in `exact_topk`.

  Returns:
    [Q] int32 0-based ranks (0 = a positive is the top item).
  """
  queries = jnp.asarray(queries)
  corpus = corpus if isinstance(corpus, jax.Array) else np.asarray(corpus)
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
  shard = _resolve_shard(shard, num_q, num_c, mesh, "positive_ranks")
  query_chunk, corpus_chunk = _chunk_sizes(num_q, num_c, query_chunk, corpus_chunk, shards, shard)
  corpus = _place_corpus(corpus, mesh, shard)
  if mesh is None:
    queries, corpus = map(_replicated_if_explicit, (queries, corpus))
  return _positive_ranks(queries, corpus, jnp.asarray(query_labels, jnp.int32),
                         jnp.asarray(corpus_labels, jnp.int32), num_corpus=num_c,
                         corpus_chunk=corpus_chunk, query_chunk=query_chunk, mesh=mesh,
                         shard=shard)


def pad_ragged(rows: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
  """[Q, E] int32 from ragged per-query index lists, padded with -1 (for `exclude`)."""
  width = max((len(r) for r in rows), default=0) if width is None else width
  out = np.full((len(rows), width), -1, np.int32)
  for q, row in enumerate(rows):
    if len(row) > width:
      raise ValueError(f"pad_ragged: row {q} has {len(row)} entries, more than width {width}")
    out[q, :len(row)] = row
  return out
