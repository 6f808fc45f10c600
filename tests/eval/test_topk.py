"""exact_topk and positive_ranks against numpy's full sort."""
import time

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from mmcl.eval.topk import exact_topk, pad_ragged, positive_ranks


def _reference_order(queries, corpus, exclude=None):
  """[Q, N] corpus indices by decreasing float64 score, ties to the lower index; excluded last."""
  scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
  if exclude is not None:
    for q, row in enumerate(exclude):
      scores[q, row[row >= 0]] = -np.inf
  index = np.broadcast_to(np.arange(corpus.shape[0]), scores.shape)
  return scores, np.lexsort((index, -scores), axis=1)


def _integer_embeddings(rng, shape, bound=3):
  # Small integers make every dot product exact in float32 and create many exact ties.
  return rng.integers(-bound, bound + 1, shape).astype(np.float32)


@pytest.mark.parametrize("corpus_chunk,query_chunk", [(128, 8), (1000, 64), (7, 1)])
def test_matches_argsort_with_ties(corpus_chunk, query_chunk):
  rng = np.random.default_rng(0)
  queries, corpus = _integer_embeddings(rng, (37, 6)), _integer_embeddings(rng, (1003, 6))
  scores, indices = exact_topk(queries, corpus, 10, corpus_chunk=corpus_chunk,
                               query_chunk=query_chunk)
  ref_scores, order = _reference_order(queries, corpus)
  assert scores.shape == (37, 10) and scores.dtype == np.float32
  assert indices.shape == (37, 10) and indices.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(indices), order[:, :10])
  np.testing.assert_array_equal(np.asarray(scores),
                                np.take_along_axis(ref_scores, order[:, :10], 1))
  # The data must really contain ties inside the top 10 for this test to mean anything.
  assert (np.diff(np.asarray(scores), axis=1) == 0).any()


def test_matches_argsort_random_normal():
  rng = np.random.default_rng(1)
  queries = rng.normal(size=(20, 16)).astype(np.float32)
  corpus = rng.normal(size=(517, 16)).astype(np.float32)
  scores, indices = exact_topk(queries, corpus, 25, corpus_chunk=64, query_chunk=6)
  ref_scores, order = _reference_order(queries, corpus)
  np.testing.assert_array_equal(np.asarray(indices), order[:, :25])
  np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(ref_scores, order[:, :25], 1),
                             rtol=1e-5, atol=1e-5)


def test_k_equals_corpus_size_is_a_full_sort():
  rng = np.random.default_rng(2)
  queries, corpus = _integer_embeddings(rng, (5, 4)), _integer_embeddings(rng, (23, 4))
  _, indices = exact_topk(queries, corpus, 23, corpus_chunk=5)
  np.testing.assert_array_equal(np.asarray(indices), _reference_order(queries, corpus)[1])


def test_exclude_removes_items_and_pads_when_too_few_remain():
  rng = np.random.default_rng(3)
  queries, corpus = _integer_embeddings(rng, (6, 5)), _integer_embeddings(rng, (40, 5))
  seen = [[0, 1, 2], [], [39, 17], list(range(35)), [5, 5, 6], [20]]
  exclude = pad_ragged(seen)
  scores, indices = exact_topk(queries, corpus, 8, corpus_chunk=16, exclude=exclude)
  scores, indices = np.asarray(scores), np.asarray(indices)
  ref_scores, order = _reference_order(queries, corpus, exclude)
  for q, row in enumerate(seen):
    eligible = 40 - len(set(row))
    n = min(8, eligible)
    np.testing.assert_array_equal(indices[q, :n], order[q, :n])
    assert not set(indices[q, :n]) & set(row)
    np.testing.assert_array_equal(indices[q, n:], -1)
    assert np.all(np.isneginf(scores[q, n:]))
  assert (indices[3] == -1).sum() == 3  # 40 - 35 = 5 eligible items for k = 8


@pytest.mark.parametrize("axis_types", [(AxisType.Explicit,), (AxisType.Auto,)])
def test_mesh_sharded_queries_match_unsharded(axis_types):
  rng = np.random.default_rng(4)
  queries, corpus = _integer_embeddings(rng, (13, 8)), _integer_embeddings(rng, (101, 8))
  exclude = pad_ragged([[q, q + 1] for q in range(13)])
  mesh = jax.make_mesh((8,), ("data",), axis_types=axis_types)
  ref = exact_topk(queries, corpus, 7, corpus_chunk=16, exclude=exclude)
  got = exact_topk(queries, corpus, 7, corpus_chunk=16, query_chunk=1, mesh=mesh,
                   exclude=exclude)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(ref[1]))
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(ref[0]))


def test_mesh_with_model_axis():
  rng = np.random.default_rng(5)
  queries, corpus = _integer_embeddings(rng, (9, 8)), _integer_embeddings(rng, (50, 8))
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
  _, indices = exact_topk(queries, corpus, 5, corpus_chunk=16, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(indices), _reference_order(queries, corpus)[1][:, :5])


@pytest.mark.parametrize("sharded", [False, True])
def test_200k_corpus_on_cpu(sharded):
  rng = np.random.default_rng(6)
  queries = _integer_embeddings(rng, (4, 32), bound=4)
  corpus = _integer_embeddings(rng, (200_000, 32), bound=4)
  # Sharded: the corpus is split over the 8 simulated devices (25,000 rows each).
  mesh = jax.make_mesh((8,), ("data",)) if sharded else None
  start = time.perf_counter()
  scores, indices = exact_topk(queries, corpus, 10, corpus_chunk=16_384, mesh=mesh,
                               shard="corpus")
  indices = np.asarray(indices)
  elapsed = time.perf_counter() - start
  ref_scores, order = _reference_order(queries, corpus)
  np.testing.assert_array_equal(indices, order[:, :10])
  np.testing.assert_array_equal(np.asarray(scores),
                                np.take_along_axis(ref_scores, order[:, :10], 1))
  assert elapsed < 30, f"ranking 200k items took {elapsed:.1f}s"


def test_bfloat16_inputs_score_in_float32():
  rng = np.random.default_rng(7)
  queries, corpus = _integer_embeddings(rng, (3, 8)), _integer_embeddings(rng, (30, 8))
  scores, indices = exact_topk(jax.numpy.asarray(queries, jax.numpy.bfloat16),
                               jax.numpy.asarray(corpus, jax.numpy.bfloat16), 4)
  assert scores.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(indices), _reference_order(queries, corpus)[1][:, :4])


def test_errors_say_what_was_expected():
  q, c = np.zeros((2, 4), np.float32), np.zeros((5, 4), np.float32)
  with pytest.raises(ValueError, match="1 <= k <= N=5"):
    exact_topk(q, c, 6)
  with pytest.raises(ValueError, match="same D"):
    exact_topk(q, np.zeros((5, 3), np.float32), 2)
  with pytest.raises(ValueError, match="floating"):
    exact_topk(q.astype(np.int32), c, 2)
  with pytest.raises(ValueError, match=r"exclude int \[Q=2, E\]"):
    exact_topk(q, c, 2, exclude=np.zeros((3, 1), np.int32))
  with pytest.raises(ValueError, match="'data' as its first axis"):
    exact_topk(q, c, 2, mesh=jax.make_mesh((8,), ("batch",)))


def _reference_ranks(queries, corpus, query_labels, corpus_labels):
  _, order = _reference_order(queries, corpus)
  positive = query_labels[:, None] == corpus_labels[order]
  return positive.argmax(axis=1)


@pytest.mark.parametrize("use_mesh", [False, True])
def test_positive_ranks_match_full_sort(use_mesh):
  rng = np.random.default_rng(8)
  queries, corpus = _integer_embeddings(rng, (30, 5)), _integer_embeddings(rng, (90, 5))
  # Several positives per query (three corpus items per label), ties everywhere.
  query_labels, corpus_labels = np.arange(30), np.repeat(np.arange(30), 3)
  mesh = jax.make_mesh((8,), ("data",)) if use_mesh else None
  ranks = positive_ranks(queries, corpus, query_labels, corpus_labels, corpus_chunk=16,
                         query_chunk=2, mesh=mesh)
  expected = _reference_ranks(queries, corpus, query_labels, corpus_labels)
  np.testing.assert_array_equal(np.asarray(ranks), expected)
  assert expected.max() > 0 and (expected == 0).any()
  # Consistent with the top-k lists: rank < k iff a positive is among exact_topk's k items.
  _, indices = exact_topk(queries, corpus, 5, corpus_chunk=16)
  in_top5 = (corpus_labels[np.asarray(indices)] == query_labels[:, None]).any(axis=1)
  np.testing.assert_array_equal(in_top5, expected < 5)


def test_positive_ranks_require_a_positive():
  with pytest.raises(ValueError, match="no positive"):
    positive_ranks(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), np.array([0, 9]),
                   np.arange(4))


@pytest.mark.parametrize("pass_mesh", [False, True])
def test_inputs_already_sharded_on_an_explicit_mesh(pass_mesh):
  # Embeddings from a sharded forward pass arrive laid out over "data" on the caller's mesh.
  rng = np.random.default_rng(9)
  queries, corpus = _integer_embeddings(rng, (16, 8)), _integer_embeddings(rng, (40, 8))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded_q, sharded_c = jax.device_put(queries, sharding), jax.device_put(corpus, sharding)
  _, indices = exact_topk(sharded_q, sharded_c, 5, mesh=mesh if pass_mesh else None)
  np.testing.assert_array_equal(np.asarray(indices), _reference_order(queries, corpus)[1][:, :5])
  ranks = positive_ranks(sharded_q, sharded_c, np.arange(16), np.arange(40),
                         mesh=mesh if pass_mesh else None)
  np.testing.assert_array_equal(
      np.asarray(ranks), _reference_ranks(queries, corpus, np.arange(16), np.arange(40)))


@pytest.mark.parametrize("shard", ["queries", "corpus"])
@pytest.mark.parametrize("axis_types", [(AxisType.Explicit,), (AxisType.Auto,)])
def test_both_shard_modes_match_the_full_sort(shard, axis_types):
  # 101 items over 8 devices: uneven slices, padding rows on the last devices, ties everywhere.
  rng = np.random.default_rng(10)
  queries, corpus = _integer_embeddings(rng, (13, 8)), _integer_embeddings(rng, (101, 8))
  exclude = pad_ragged([[q, q + 1, 100 - q] for q in range(13)])
  mesh = jax.make_mesh((8,), ("data",), axis_types=axis_types)
  scores, indices = exact_topk(queries, corpus, 7, corpus_chunk=4, query_chunk=5, mesh=mesh,
                               exclude=exclude, shard=shard)
  ref_scores, order = _reference_order(queries, corpus, exclude)
  np.testing.assert_array_equal(np.asarray(indices), order[:, :7])
  np.testing.assert_array_equal(np.asarray(scores), np.take_along_axis(ref_scores, order[:, :7], 1))
  labels = np.arange(101) % 20
  ranks = positive_ranks(queries, corpus, np.arange(13), labels, corpus_chunk=4, query_chunk=5,
                         mesh=mesh, shard=shard)
  np.testing.assert_array_equal(np.asarray(ranks),
                                _reference_ranks(queries, corpus, np.arange(13), labels))


def test_corpus_sharding_with_k_beyond_a_device_slice_and_a_model_axis():
  # k = 30 > 50 / 4 rows per device; fewer than k eligible items leave (-inf, -1) slots.
  rng = np.random.default_rng(11)
  queries, corpus = _integer_embeddings(rng, (3, 4)), _integer_embeddings(rng, (50, 4))
  exclude = pad_ragged([list(range(25)), [], list(range(0, 50, 2))])
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
  scores, indices = exact_topk(queries, corpus, 30, corpus_chunk=8, mesh=mesh, exclude=exclude,
                               shard="corpus")
  ref = exact_topk(queries, corpus, 30, corpus_chunk=8, exclude=exclude)
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(ref[1]))
  np.testing.assert_array_equal(np.asarray(scores), np.asarray(ref[0]))
  assert (np.asarray(indices)[0] == -1).sum() == 5


def test_auto_shards_the_larger_side_and_host_corpus_arrives_split():
  from mmcl.eval import topk as topk_lib
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  assert topk_lib._resolve_shard("auto", 10, 1000, mesh, "t") == "corpus"
  assert topk_lib._resolve_shard("auto", 1000, 1000, mesh, "t") == "queries"
  assert topk_lib._resolve_shard("auto", 10, 1000, None, "t") == "queries"
  placed = topk_lib._place_corpus(np.ones((100, 4), np.float32), mesh, "corpus")
  # Padded to a multiple of the 8 devices; each device holds only its slice.
  assert placed.shape == (104, 4)
  assert {s.data.shape for s in placed.addressable_shards} == {(13, 4)}
  with pytest.raises(ValueError, match="shard must be one of"):
    exact_topk(np.ones((2, 4), np.float32), np.ones((5, 4), np.float32), 1, mesh=mesh,
               shard="rows")


@pytest.mark.parametrize("shard", ["queries", "corpus"])
def test_memory_stays_bounded_whatever_the_corpus_size(shard):
  # XLA's own accounting of the compiled ranking: temporaries stay far below one copy of the
  # corpus (no padded copy, no [Q, N] score matrix), and per device the corpus argument is
  # replicated ("queries") or 1/8 of it ("corpus").
  from mmcl.eval import topk as topk_lib
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  num_q, num_c, dim = 64, 400_003, 16
  queries = jax.ShapeDtypeStruct((num_q, dim), np.float32)
  corpus = jax.ShapeDtypeStruct((num_c + (-num_c % 8 if shard == "corpus" else 0), dim),
                                np.float32)
  exclude = jax.ShapeDtypeStruct((num_q, 0), np.int32)
  compiled = topk_lib._exact_topk.lower(
      queries, corpus, exclude, k=10, num_corpus=num_c, corpus_chunk=4096, query_chunk=8,
      mesh=mesh, shard=shard).compile()
  mem = compiled.memory_analysis()
  corpus_bytes = num_c * dim * 4
  assert mem.temp_size_in_bytes < corpus_bytes / 8, mem
  expected_arg = corpus_bytes / 8 if shard == "corpus" else corpus_bytes
  assert mem.argument_size_in_bytes == pytest.approx(expected_arg, rel=0.05)


@pytest.mark.parametrize("k", [1, 9, 40])
def test_faiss_backend_matches_xla_with_ties_nan_and_exclusions(k):
  pytest.importorskip("faiss")
  rng = np.random.default_rng(8)
  # bound=1 in 5 dims: many exact ties, also at the k-th place (recomputed on XLA).
  queries, corpus = _integer_embeddings(rng, (16, 5), bound=1), _integer_embeddings(rng, (40, 5),
                                                                                     bound=1)
  corpus[7] = np.nan
  queries[3] = np.nan
  exclude = pad_ragged([[q, (2 * q) % 40, -1] for q in range(16)])
  ref_scores, ref_indices = exact_topk(queries, corpus, k, exclude=exclude, backend="xla")
  scores, indices = exact_topk(queries, corpus, k, exclude=exclude, backend="faiss")
  np.testing.assert_array_equal(np.asarray(indices), np.asarray(ref_indices))
  np.testing.assert_array_equal(np.asarray(scores), np.asarray(ref_scores))
  assert (np.asarray(indices)[3] == -1).all()  # the NaN query retrieves nothing
  assert not (np.asarray(indices) == 7).any()  # the NaN item is never retrieved


def test_auto_backend_uses_faiss_only_on_an_unsharded_cpu(monkeypatch):
  faiss = pytest.importorskip("faiss")
  calls = []
  knn = faiss.knn
  monkeypatch.setattr(faiss, "knn", lambda *a, **kw: calls.append(1) or knn(*a, **kw))
  rng = np.random.default_rng(9)
  queries, corpus = _integer_embeddings(rng, (5, 8)), _integer_embeddings(rng, (64, 8))
  _, indices = exact_topk(queries, corpus, 5)
  assert len(calls) == 1
  np.testing.assert_array_equal(np.asarray(indices), _reference_order(queries, corpus)[1][:, :5])
  exact_topk(queries, corpus, 5, mesh=jax.make_mesh((8,), ("data",)))  # sharded: XLA
  exact_topk(queries, corpus, 5, backend="xla")
  assert len(calls) == 1
  with pytest.raises(ValueError, match="backend must be one of"):
    exact_topk(queries, corpus, 5, backend="numpy")
