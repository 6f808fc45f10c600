"""Ranking metrics against hand-computed values and their defining invariants."""
import math

import numpy as np
import pytest

from mmcl.eval import metrics as m

# Query 0: graded judgments {1: 2, 2: 1, 5: 3}, R = 3; its run hits item 1 (grade 2) at rank 2
# and item 2 (grade 1) at rank 4; rank 5 is padding. Query 1 has no judgments (undefined).
# Query 2: one relevant item, retrieved first.
RANKED = np.array([[3, 1, 7, 2, -1],
                   [4, 0, 9, 8, 6],
                   [0, 2, 4, 6, 8]])
QRELS = m.Qrels.from_dict({0: {1: 2, 2: 1, 5: 3}, 2: {0: 1, 9: 0}}, num_queries=3)


def _check(values, expected):
  np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)


def test_ranked_and_ideal_grades():
  np.testing.assert_array_equal(m.ranked_grades(RANKED, QRELS),
                                [[0, 2, 0, 1, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(m.ideal_grades(QRELS, 4),
                                [[3, 2, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(QRELS.num_relevant, [3, 0, 1])


def test_recall_hit_rate_precision():
  _check(m.recall_at_k(RANKED, QRELS, 2), [1 / 3, np.nan, 1])
  _check(m.recall_at_k(RANKED, QRELS, 5), [2 / 3, np.nan, 1])
  _check(m.hit_rate_at_k(RANKED, QRELS, 1), [0, np.nan, 1])
  _check(m.hit_rate_at_k(RANKED, QRELS, 2), [1, np.nan, 1])
  _check(m.precision_at_k(RANKED, QRELS, 2), [1 / 2, np.nan, 1 / 2])
  _check(m.precision_at_k(RANKED, QRELS, 5), [2 / 5, np.nan, 1 / 5])


def test_mrr_and_map():
  _check(m.mrr_at_k(RANKED, QRELS, 1), [0, np.nan, 1])
  _check(m.mrr_at_k(RANKED, QRELS, 5), [1 / 2, np.nan, 1])
  # AP@5 of query 0 = (P@2 + P@4) / R = (1/2 + 2/4) / 3.
  _check(m.map_at_k(RANKED, QRELS, 5), [1 / 3, np.nan, 1])
  _check(m.map_at_k(RANKED, QRELS, 3), [(1 / 2) / 3, np.nan, 1])


def test_ndcg_exponential_gain_log2_discount():
  dcg3 = (2**2 - 1) / math.log2(3)
  idcg3 = (2**3 - 1) / 1 + (2**2 - 1) / math.log2(3) + (2**1 - 1) / 2
  _check(m.ndcg_at_k(RANKED, QRELS, 3), [dcg3 / idcg3, np.nan, 1])
  dcg5 = dcg3 + 1 / math.log2(5)
  _check(m.ndcg_at_k(RANKED, QRELS, 5), [dcg5 / idcg3, np.nan, 1])
  _check(m.dcg_at_k(RANKED, QRELS, 5), [dcg5, 0, 1])


def test_err_cascade():
  # max_rel = 3: stop probabilities (2^g - 1) / 8 -> rank 2: 3/8, rank 4: 1/8.
  expected0 = (1 / 2) * (3 / 8) + (1 / 4) * (1 / 8) * (1 - 3 / 8)
  _check(m.err_at_k(RANKED, QRELS, 5), [expected0, np.nan, 1 / 8])
  # Binary grades: R = 1/2 for a relevant item, so a hit at rank r alone gives 1 / (2 r).
  binary = m.Qrels.from_positives(np.array([1, 0, 0]))
  _check(m.err_at_k(RANKED, binary, 5), [1 / 4, 1 / 4, 1 / 2])
  _check(m.err_at_k(RANKED, QRELS, 1), [0, np.nan, 1 / 8])
  with pytest.raises(ValueError, match="exceeds max_rel"):
    m.err_at_k(RANKED, QRELS, 5, max_rel=1)


def test_rbp():
  _check(m.rbp(RANKED, QRELS, 0.5), [0.5 * (0.5**1 + 0.5**3), np.nan, 0.5])
  _check(m.rbp(RANKED, QRELS, 0.5, k=3), [0.5 * 0.5, np.nan, 0.5])
  with pytest.raises(ValueError, match="0 < p < 1"):
    m.rbp(RANKED, QRELS, 1.0)


def test_coverage():
  assert m.coverage_at_k(RANKED, 2, corpus_size=10) == 0.5  # {3, 1, 4, 0, 2}
  assert m.coverage_at_k(RANKED, 5, corpus_size=10) == 0.9  # all but 5
  with pytest.raises(ValueError, match="outside corpus"):
    m.coverage_at_k(RANKED, 5, corpus_size=9)


def test_evaluate_averages_over_judged_queries():
  out = m.evaluate(RANKED, QRELS, ["recall@2", "ndcg@5", "rbp.5", "coverage@2", "err@5"],
                   corpus_size=10)
  assert out["recall@2"] == pytest.approx((1 / 3 + 1) / 2)
  assert out["rbp.5"] == pytest.approx((0.3125 + 0.5) / 2)
  assert out["coverage@2"] == 0.5
  assert out["ndcg@5"] == pytest.approx(np.nanmean(m.ndcg_at_k(RANKED, QRELS, 5)))
  with pytest.raises(ValueError, match="unknown metric"):
    m.evaluate(RANKED, QRELS, ["recal@2"])
  with pytest.raises(ValueError, match="cutoff"):
    m.evaluate(RANKED, QRELS, ["ndcg"])
  with pytest.raises(ValueError, match="corpus_size"):
    m.evaluate(RANKED, QRELS, ["coverage@3"])
  with pytest.raises(ValueError, match="1 <= k <= K=5"):
    m.evaluate(RANKED, QRELS, ["recall@6"])


def test_metrics_are_perfect_for_the_ideal_ranking():
  rng = np.random.default_rng(0)
  grades = rng.integers(0, 4, (12, 30)) * (rng.random((12, 30)) < 0.3)
  grades[:, 0] = np.maximum(grades[:, 0], 1)  # every query has a relevant item
  qrels = m.Qrels.from_dense(grades)
  ideal = np.argsort(-grades, axis=1, kind="stable")
  _check(m.ndcg_at_k(ideal, qrels, 10), np.ones(12))
  _check(m.map_at_k(ideal, qrels, 30), np.ones(12))
  _check(m.mrr_at_k(ideal, qrels, 1), np.ones(12))
  _check(m.recall_at_k(ideal, qrels, 30), np.ones(12))
  # ERR of the ideal order beats every shuffled order.
  shuffled = rng.permuted(ideal, axis=1)
  assert np.all(m.err_at_k(ideal, qrels, 30) >= m.err_at_k(shuffled, qrels, 30) - 1e-12)


def test_qrels_constructors_agree():
  dense = np.array([[0, 2, 1, 0], [0, 0, 0, 0], [1, 0, 0, 3]])
  from_dense = m.Qrels.from_dense(dense)
  assert from_dense.to_dict() == [{1: 2.0, 2: 1.0}, {}, {0: 1.0, 3: 3.0}]
  assert m.Qrels.from_dict(from_dense.to_dict()).to_dict() == from_dense.to_dict()
  pos = m.Qrels.from_positives(np.array([[2, -1], [0, 3]]))
  assert pos.to_dict() == [{2: 1.0}, {0: 1.0, 3: 1.0}]
  assert m.Qrels.from_positives(np.array([4, 1])).to_dict() == [{4: 1.0}, {1: 1.0}]
  labels = m.Qrels.from_labels(np.array([1, 0]), np.array([0, 1, 0, 1, 2]))
  assert labels.to_dict() == [{1: 1.0, 3: 1.0}, {0: 1.0, 2: 1.0}]


def test_qrels_validation():
  with pytest.raises(ValueError, match="grades >= 0"):
    m.Qrels.from_dict([{1: -1}])
  with pytest.raises(ValueError, match="judged twice"):
    m.Qrels(np.array([0, 2]), np.array([3, 3]), np.array([1.0, 1.0]))
  with pytest.raises(ValueError, match="outside"):
    m.Qrels.from_dict({5: {1: 1}}, num_queries=3)
  with pytest.raises(ValueError, match="2 queries"):
    m.recall_at_k(RANKED[:2], QRELS, 1)


def test_by_bucket_and_quantiles():
  per_query = m.per_query_metrics(RANKED, QRELS, ["recall@2", "mrr@5"])
  out = m.by_bucket(per_query, ["image->text", "text->image", "image->text"])
  assert list(out) == ["image->text", "text->image"]
  assert out["image->text"]["recall@2"] == pytest.approx((1 / 3 + 1) / 2)
  assert out["image->text"]["num_queries"] == 2
  assert math.isnan(out["text->image"]["mrr@5"])
  np.testing.assert_array_equal(m.quantile_buckets(np.arange(10), 5),
                                [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
  np.testing.assert_array_equal(m.quantile_buckets(np.array([5, 1, 9, 3]), 2), [1, 0, 1, 0])
  with pytest.raises(ValueError, match="expected \\[2\\]"):
    m.by_bucket(per_query, ["a", "b"])


def test_rank_metrics():
  out = m.rank_metrics(np.array([0, 2, 10]), ks=(1, 5))
  assert out["recall@1"] == pytest.approx(1 / 3)
  assert out["recall@5"] == out["hit_rate@5"] == pytest.approx(2 / 3)
  assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
  assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)
  assert out["median_rank"] == 3 and out["mean_rank"] == pytest.approx(15 / 3)


def test_rank_metrics_agree_with_list_metrics_for_one_positive():
  rng = np.random.default_rng(1)
  ranked = np.stack([rng.permutation(50) for _ in range(20)])
  positives = rng.integers(0, 50, 20)
  ranks = (ranked == positives[:, None]).argmax(1)
  qrels = m.Qrels.from_positives(positives)
  from_ranks = m.rank_metrics(ranks, ks=(1, 10))
  from_lists = m.evaluate(ranked, qrels, ["recall@1", "recall@10", "ndcg@10", "hit_rate@10",
                                          "mrr@50"])
  for name in ("recall@1", "recall@10", "ndcg@10", "hit_rate@10"):
    assert from_ranks[name] == pytest.approx(from_lists[name])
  assert from_ranks["mrr"] == pytest.approx(from_lists["mrr@50"])


def test_sample_negatives_excludes_seen_items():
  seen = [[0, 1, 2], [5], list(range(10, 30)), [3, 3, 4]]
  users, negatives = m.sample_negatives(np.random.default_rng(0), 40, seen, 15)
  np.testing.assert_array_equal(users, [0, 1, 2, 3])
  assert negatives.shape == (4, 15)
  for row, user in zip(negatives, users):
    assert len(set(row.tolist())) == 15
    assert not set(row.tolist()) & set(seen[user])
    assert row.min() >= 0 and row.max() < 40
  again = m.sample_negatives(np.random.default_rng(0), 40, seen, 15)
  np.testing.assert_array_equal(again[1], negatives)
  users, negatives = m.sample_negatives(np.random.default_rng(1), 40, seen, 5, max_users=2)
  assert users.shape == (2,) and negatives.shape == (2, 5) and np.all(np.diff(users) > 0)
  with pytest.raises(ValueError, match="fewer than 25 unseen"):
    m.sample_negatives(np.random.default_rng(0), 40, seen, 25)


def test_sampled_ranks_and_metrics():
  pos = np.array([1.0, 0.5, 0.0])
  neg = np.array([[0.0, 0.2, 1.0], [0.9, 0.8, 0.1], [0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(m.sampled_ranks(pos, neg), [1, 2, 3])
  np.testing.assert_array_equal(m.sampled_ranks(pos, neg, ties="optimistic"), [0, 2, 0])
  # One-dimensional embeddings: the score is the product of the two numbers.
  query = np.array([[1.0], [2.0]])
  items = np.array([[0.1], [0.5], [0.3], [0.9]])
  out = m.sampled_negative_metrics(query, items, positives=np.array([1, 0]),
                                   negatives=np.array([[0, 2], [1, 3]]), ks=(1, 2))
  # User 0: positive 0.5 beats 0.1 and 0.3 -> rank 0; user 1: 0.2 loses to 1.0, 1.8 -> rank 2.
  assert out["hit_rate@1"] == 0.5 and out["hit_rate@2"] == 0.5
  assert out["mrr"] == pytest.approx((1 + 1 / 3) / 2)
