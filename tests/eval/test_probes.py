"""Frozen-feature probes: kNN hits per query, bootstrap standard errors, probe predictions."""
import numpy as np

from mmcl.eval import probes


def test_knn_hits_per_query_and_their_mean():
  corpus = np.eye(4)
  queries = np.array([[1.0, 0.1, 0, 0], [0, 0, 1.0, 0.2]])
  labels = np.array([0, 0, 1, 1])
  q_labels = np.array([0, 0])
  hits = probes.knn_hits(queries, corpus, lambda top: labels[top] == q_labels[:, None], k=2)
  # Query 0's two nearest rows are 0 and 1 (both label 0); query 1's are 2 and 3 (label 1).
  np.testing.assert_array_equal(hits, [1.0, 0.0])
  assert probes.knn_hit_rate(queries, corpus, lambda top: labels[top] == q_labels[:, None],
                             k=2) == 0.5
  hits = probes.knn_hits(queries, corpus, lambda top: labels[top] == q_labels[:, None], k=2,
                         exclude=np.array([0, 3]))
  # Query 0 without row 0: rows 1, 2; query 1 without row 3: row 2, then row 0 (a tie, stable).
  np.testing.assert_array_equal(hits, [0.5, 0.5])


def test_bootstrap_se_of_a_mean_matches_the_formula():
  x = np.random.default_rng(0).normal(size=400)
  se = probes.bootstrap_se(lambda i: float(np.mean(x[i])), len(x), resamples=2000)
  assert abs(se - x.std(ddof=1) / np.sqrt(len(x))) < 0.1 * se


def test_probes_return_their_test_predictions():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(120, 5))
  y = (x[:, 0] > 0).astype(int) + 2 * (x[:, 1] > 0).astype(int)
  out = probes.logistic_probe(x[:90], y[:90], x[90:], y[90:], num_classes=4)
  assert out["pred"].shape == (30,) and out["accuracy"] == np.mean(out["pred"] == y[90:])
  assert out["accuracy"] > 0.7
  r = probes.ridge_probe(x[:90], x[:90, 2] * 3, x[90:], x[90:, 2] * 3)
  assert r["r2"] == probes.r2_score(x[90:, 2] * 3, r["pred"]) and r["r2"] > 0.99
