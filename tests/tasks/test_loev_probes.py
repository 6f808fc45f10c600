"""Frozen-feature probes: kNN hits per query, bootstrap standard errors, probe predictions."""
import functools

import numpy as np
import pytest

from mmcl.tasks.loev import probes


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


def test_kernel_ridge_probe_reads_a_cyclic_target_that_the_linear_probe_cannot():
  # Features: a point on a circle (cos θ, sin θ) plus noise dimensions; target cos 3θ, a smooth
  # function of the features that is orthogonal to every linear one over the full circle.
  rng = np.random.default_rng(2)
  angle = rng.uniform(-np.pi, np.pi, 300)
  x = np.concatenate([np.cos(angle)[:, None], np.sin(angle)[:, None],
                      0.1 * rng.normal(size=(300, 3))], 1)
  y = np.cos(3 * angle)
  lin = probes.ridge_probe(x[:220], y[:220], x[220:], y[220:])
  rbf = probes.kernel_ridge_probe(x[:220], y[:220], x[220:], y[220:])
  assert rbf["r2"] == probes.r2_score(y[220:], rbf["pred"]) and rbf["pred"].shape == (80,)
  assert rbf["r2"] > 0.9 and lin["r2"] < 0.2, (rbf["r2"], lin["r2"])
  # On a linear target it is about as good as the linear probe.
  y = x[:, 0] * 2 - x[:, 2]
  assert probes.kernel_ridge_probe(x[:220], y[:220], x[220:], y[220:])["r2"] > 0.95


def test_cross_fitted_predicts_every_row_out_of_fold():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(100, 4))
  y = x[:, 1] * 2 + 0.1 * rng.normal(size=100)
  cf = probes.cross_fitted(probes.ridge_probe, x, y, folds=5)
  assert cf["pred"].shape == (100,) and cf["r2"] == probes.r2_score(y, cf["pred"])
  assert cf["r2"] > 0.95
  # Out of fold: a target that is pure noise is not predicted (a probe that saw its own rows
  # would fit some of it).
  noise = rng.normal(size=100)
  assert probes.cross_fitted(probes.ridge_probe, rng.normal(size=(100, 60)), noise)["r2"] < 0.05


def test_out_of_fold_works_for_a_classifier():
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 3, 150)
  x = np.eye(3)[labels] * 3 + rng.normal(size=(150, 3))
  clf = functools.partial(probes.logistic_probe, num_classes=3)
  pred = probes.out_of_fold(clf, x, labels, folds=5)
  assert pred.shape == (150,) and np.issubdtype(pred.dtype, np.integer)
  assert np.mean(pred == labels) > 0.85
  # Labels independent of the features: out-of-fold accuracy stays near chance (1/3).
  shuffled = rng.permutation(labels)
  assert np.mean(probes.out_of_fold(clf, x, shuffled, folds=5) == shuffled) < 0.5


def test_kernel_ridge_probe_equals_scikit_learns_kernel_ridge_bit_for_bit():
  """The probe's cached kernels and direct solve choose and predict exactly as a grid search over
  `sklearn.kernel_ridge.KernelRidge(kernel="rbf")` with the same folds does."""
  from sklearn.kernel_ridge import KernelRidge
  rng = np.random.default_rng(3)
  x = rng.normal(size=(57, 6))
  y = np.cos(2 * x[:, 0]) + 0.3 * x[:, 1] + 0.05 * rng.normal(size=57)
  xtr, xte = probes.standardize(x[:40], x[40:])
  ytr = y[:40]

  def fit(tr, te_x, alpha, gamma):
    ym = ytr[tr].mean()
    return KernelRidge(alpha=alpha, kernel="rbf", gamma=gamma).fit(xtr[tr], ytr[tr] - ym).predict(
        te_x) + ym
  d = x.shape[1]
  best = probes._select_by_cv(  # pylint: disable=protected-access
      [(a, g / d) for g in probes.KERNEL_GAMMAS for a in probes.KERNEL_ALPHAS], 40,
      lambda ag, keep, fold: fit(keep, xtr[fold], *ag), ytr, 4, 0)
  want = fit(np.arange(40), xte, *best)
  got = probes.kernel_ridge_probe(x[:40], ytr, x[40:], y[40:])
  assert (got["alpha"], got["gamma"]) == best
  np.testing.assert_array_equal(got["pred"], want)


def test_probes_refuse_non_finite_features_and_targets():
  x = np.random.default_rng(4).normal(size=(30, 3))
  y = x[:, 0].copy()
  bad = x.copy()
  bad[2, 1] = np.nan
  for probe in (probes.ridge_probe, probes.kernel_ridge_probe):
    with pytest.raises(ValueError, match=r"x_train has 1 non-finite"):
      probe(bad[:20], y[:20], x[20:], y[20:])
    y_bad = y.copy()
    y_bad[25] = np.inf
    with pytest.raises(ValueError, match=r"y_test has 1 non-finite"):
      probe(x[:20], y[:20], x[20:], y_bad[20:])
  with pytest.raises(ValueError, match=r"x_test has 1 non-finite"):
    probes.logistic_probe(x[:20], (y[:20] > 0).astype(int), bad[:10], np.zeros(10, int),
                          num_classes=2)
