"""The full-ranking protocol, with and without filtering seen items."""
import numpy as np
import pytest

from mmcl.eval import metrics as m
from mmcl.eval.retrieval import full_ranking_metrics
from mmcl.eval.topk import pad_ragged


def _problem(seed=0, num_users=24, num_items=60):
  rng = np.random.default_rng(seed)
  users = rng.normal(size=(num_users, 8)).astype(np.float32)
  items = rng.normal(size=(num_items, 8)).astype(np.float32)
  seen = [rng.choice(num_items, 5, replace=False).tolist() for _ in range(num_users)]
  held_out = [int(rng.choice(np.setdiff1d(np.arange(num_items), s))) for s in seen]
  return users, items, seen, m.Qrels.from_positives(np.array(held_out))


def _numpy_ranking(users, items, exclude_rows=None):
  scores = users.astype(np.float64) @ items.astype(np.float64).T
  if exclude_rows is not None:
    for q, row in enumerate(exclude_rows):
      scores[q, row] = -np.inf
  return np.argsort(-scores, axis=1, kind="stable")


@pytest.mark.parametrize("filter_seen", [False, True])
def test_matches_numpy_ranking(filter_seen):
  users, items, seen, qrels = _problem()
  exclude = pad_ragged(seen) if filter_seen else None
  names = ["recall@10", "ndcg@10", "mrr@20", "map@20", "coverage@5"]
  result = full_ranking_metrics(users, items, qrels, names, exclude=exclude, corpus_chunk=16)
  assert result.ranked.shape == (24, 20)  # K = largest cutoff
  reference = _numpy_ranking(users, items, seen if filter_seen else None)[:, :20]
  np.testing.assert_array_equal(result.ranked, reference)
  expected = m.evaluate(reference, qrels, names, corpus_size=60)
  assert result.metrics == pytest.approx(expected)
  assert result.per_query["ndcg@10"].shape == (24,)
  if filter_seen:
    for row, s in zip(result.ranked, seen):
      assert not set(row.tolist()) & set(s)


def test_filtering_seen_items_never_hurts_a_held_out_positive():
  users, items, seen, qrels = _problem(seed=1)
  plain = full_ranking_metrics(users, items, qrels, ["recall@10", "mrr@60"])
  filtered = full_ranking_metrics(users, items, qrels, ["recall@10", "mrr@60"],
                                  exclude=pad_ragged(seen))
  assert np.all(filtered.per_query["mrr@60"] >= plain.per_query["mrr@60"])
  assert filtered.metrics["mrr@60"] > plain.metrics["mrr@60"]


def test_rbp_depth_defaults_to_negligible_residual():
  users, items, _, qrels = _problem(seed=2, num_items=500)
  result = full_ranking_metrics(users, items, qrels, ["rbp.8"])
  assert result.ranked.shape[1] == 62  # 0.8^62 < 1e-6 <= 0.8^61
  full = full_ranking_metrics(users, items, qrels, ["rbp.8"], k=500)
  assert result.metrics["rbp.8"] == pytest.approx(full.metrics["rbp.8"], abs=1e-6)
