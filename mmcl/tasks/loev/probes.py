"""Probes on frozen features (scikit-learn estimators, scipy's bootstrap): ridge regression, RBF
kernel ridge regression (a nonlinear probe), multinomial logistic regression, R², and kNN retrieval
with transformed labels (LOEV's evaluation, Guinot et al., arXiv:2412.18955).

Regularisation strengths are chosen by k-fold cross-validation on the probe's training rows only,
never on its test rows (our folds: a seeded permutation split into k parts, the same for every
candidate). Features are standardised with the training rows' statistics.

The probes fit thousands of tiny models per evaluation, so scikit-learn's per-call input checks
would cost more than the fits: each probe checks its inputs once (a non-finite feature or target
raises ValueError) and fits inside `sklearn.config_context(assume_finite=True,
skip_parameter_validation=True)`, and the kernel probe computes each RBF kernel matrix once per
(fold, γ) and solves K + αI for every α as `KernelRidge(kernel="precomputed")` does. Both give
the same numbers as the plain estimators, bit for bit.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import scipy.linalg
import scipy.stats
import sklearn
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics.pairwise import rbf_kernel

ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def _checked(fn):
  """Runs probe `fn(x_train, y_train, x_test, y_test, ...)` after checking that its arrays are
  finite (ValueError otherwise), with scikit-learn's own per-fit checks switched off."""
  @functools.wraps(fn)
  def probe(x_train, y_train, x_test, y_test, **kw):
    for name, a in (("x_train", x_train), ("y_train", y_train), ("x_test", x_test),
                    ("y_test", y_test)):
      a = np.asarray(a)
      if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{fn.__name__}: {name} has {int((~np.isfinite(a)).sum())} non-finite "
                         f"value(s) (of {a.size}); a probe on them would score nothing real")
    with sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
      return fn(x_train, y_train, x_test, y_test, **kw)
  return probe


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Centres and scales every array by the mean / std of `train` [N, D] (std floored at 1e-6)."""
  mean = train.mean(0)
  std = np.maximum(train.std(0), 1e-6)
  return [(x - mean) / std for x in (train, *others)]


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
  """Coefficient of determination 1 − SS_res / SS_tot of [N] (or [N, T], pooled) targets."""
  y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
  ss_tot = np.sum((y - y.mean(0)) ** 2)
  return float(1.0 - np.sum((y - pred) ** 2) / max(ss_tot, 1e-12))


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> Ridge:
  """argmin_w,b ||y − xw − b||² + α||w||² (the intercept unpenalised), solved exactly."""
  return Ridge(alpha=alpha, fit_intercept=True, solver="cholesky").fit(x, y)


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
  return np.array_split(np.random.default_rng(seed).permutation(n), k)


def _select_by_cv(candidates: Sequence[Any], n: int, fit_predict, y: np.ndarray, folds: int,
                  seed: int) -> Any:
  """The candidate (in order; the first of equals) with the best mean R² over `folds` folds of
  the n training rows; fit_predict(candidate, keep_rows, held_out_rows) → held-out predictions."""
  scores = {}
  for cand in candidates:
    scores[cand] = []
    for fold in _folds(n, folds, seed):
      keep = np.setdiff1d(np.arange(n), fold)
      scores[cand].append(r2_score(y[fold], fit_predict(cand, keep, fold)))
  return _best_mean(candidates, scores)


def _best_mean(candidates: Sequence[Any], scores: dict[Any, list[float]]) -> Any:
  """The candidate (in order; the first of equals) whose fold scores have the best mean."""
  best, best_c = -np.inf, candidates[0]
  for cand in candidates:
    if np.mean(scores[cand]) > best:
      best, best_c = float(np.mean(scores[cand])), cand
  return best_c


@_checked
def ridge_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                y_test: np.ndarray, *, alphas: Sequence[float] = ALPHAS, folds: int = 4,
                seed: int = 0) -> dict[str, Any]:
  """Ridge regression probe: α by `folds`-fold CV (R²) on the training rows, refit, test R².

  Args:
    x_train: [N, D] float. y_train: [N] float. x_test: [M, D]. y_test: [M].

  Returns:
    {"r2": test R² (float), "alpha": chosen α (float), "pred": test predictions [M] float64}.
  """
  x_train, x_test = standardize(np.asarray(x_train, np.float64), np.asarray(x_test, np.float64))
  y_train = np.asarray(y_train, np.float64)

  def fit_predict(alpha, keep, fold):
    return _ridge(x_train[keep], y_train[keep], alpha).predict(x_train[fold])
  best_alpha = _select_by_cv(list(alphas), len(y_train), fit_predict, y_train, folds, seed)
  pred = _ridge(x_train, y_train, best_alpha).predict(x_test)
  return {"r2": r2_score(y_test, pred), "alpha": float(best_alpha), "pred": pred}


KERNEL_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
KERNEL_GAMMAS = (0.25, 1.0, 4.0)  # RBF width γ = g / D on standardised features


def _kernel_ridge_dual(k: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
  """(K + αI)⁻¹ y for a kernel matrix k [N, N] and targets y [N]: the dual coefficients [N] of
  `KernelRidge(alpha, kernel="precomputed").fit(k, y)`, by the same Cholesky solve (and the same
  least-squares fallback for a singular K + αI), without its per-call checks."""
  k = k.copy()
  k.flat[::len(k) + 1] += alpha
  try:
    dual = scipy.linalg.solve(k, y[:, None], assume_a="pos", overwrite_a=False)
  except np.linalg.LinAlgError:
    warnings.warn("Singular matrix in solving dual problem. Using least-squares solution instead.")
    dual = scipy.linalg.lstsq(k, y[:, None])[0]
  return dual.ravel()


@_checked
def kernel_ridge_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                       y_test: np.ndarray, *, alphas: Sequence[float] = KERNEL_ALPHAS,
                       gammas: Sequence[float] = KERNEL_GAMMAS, folds: int = 4,
                       seed: int = 0) -> dict[str, Any]:
  """RBF kernel ridge regression probe, a nonlinear counterpart of `ridge_probe`: it can read a
  target that the features encode non-linearly (e.g. cyclically). Features standardised with the
  training rows' statistics; (α, γ = g / D) by `folds`-fold CV (R²) on the training rows; refit.

  Args:
    x_train: [N, D] float. y_train: [N] float. x_test: [M, D]. y_test: [M].

  Returns:
    {"r2": test R² (float), "alpha": α, "gamma": γ (floats),
     "pred": test predictions [M] float64}.
  """
  x_train, x_test = standardize(np.asarray(x_train, np.float64), np.asarray(x_test, np.float64))
  y_train = np.asarray(y_train, np.float64)
  d, n = x_train.shape[1], len(y_train)

  def fits(tr, te_x, gamma, alphas_):
    # Kernel ridge has no intercept: it fits the centred targets, K(x, ·)(K + αI)⁻¹(y − ȳ) + ȳ.
    # The kernels are what KernelRidge(kernel="rbf") computes itself, once for every α.
    ym = y_train[tr].mean()
    k_fit, k_pred = rbf_kernel(x_train[tr], gamma=gamma), rbf_kernel(te_x, x_train[tr], gamma=gamma)
    return [np.dot(k_pred, _kernel_ridge_dual(k_fit, y_train[tr] - ym, a)) + ym for a in alphas_]

  # Held-out R² of every (α, γ) on every fold, then `_select_by_cv`'s choice: the best mean, the
  # first of equals in (γ-major, α-minor) order.
  scores = {}
  for fold_i, fold in enumerate(_folds(n, folds, seed)):
    keep = np.setdiff1d(np.arange(n), fold)
    for g in gammas:
      for a, pred in zip(alphas, fits(keep, x_train[fold], g / d, alphas)):
        scores.setdefault((a, g / d), [None] * folds)[fold_i] = r2_score(y_train[fold], pred)
  best_ag = _best_mean([(alpha, g / d) for g in gammas for alpha in alphas], scores)
  (pred,) = fits(np.arange(n), x_test, best_ag[1], [best_ag[0]])
  return {"r2": r2_score(y_test, pred), "alpha": float(best_ag[0]), "gamma": float(best_ag[1]),
          "pred": pred}


def out_of_fold(probe: Callable[..., dict[str, Any]], x: np.ndarray, y: np.ndarray, *,
                folds: int = 5, seed: int = 0) -> np.ndarray:
  """Out-of-fold predictions of a probe for every row: the rows are split into `folds` folds and
  each fold is predicted by `probe` trained (with its own inner cross-validation) on the others.

  Args:
    probe: a function (x_train, y_train, x_test, y_test) → {"pred": [n_test], ...}, e.g.
      `ridge_probe`, `kernel_ridge_probe` or `logistic_probe` (with num_classes bound).
    x: [N, D] float. y: [N] (float targets or int labels).

  Returns:
    [N] predictions, each from the probe that did not see its row (dtype of the probe's "pred").
  """
  y = np.asarray(y)
  pred = None
  for fold in _folds(len(y), folds, seed + 1):
    keep = np.setdiff1d(np.arange(len(y)), fold)
    p = np.asarray(probe(x[keep], y[keep], x[fold], y[fold])["pred"])
    if pred is None:
      pred = np.zeros(len(y), p.dtype)
    pred[fold] = p
  return pred


def cross_fitted(probe: Callable[..., dict[str, Any]], x: np.ndarray, y: np.ndarray, *,
                 folds: int = 5, seed: int = 0) -> dict[str, Any]:
  """R² of out-of-fold predictions (`out_of_fold`) of a regression probe. Every row is a test
  row, so R² and its standard error use all N rows instead of a held-out share.

  Args:
    probe: `ridge_probe`, `kernel_ridge_probe` or a function with their signature.
    x: [N, D] float. y: [N] float.

  Returns:
    {"r2": out-of-fold R² over all rows (float), "pred": [N] float64 out-of-fold predictions}.
  """
  y = np.asarray(y, np.float64)
  pred = out_of_fold(probe, x, y, folds=folds, seed=seed).astype(np.float64)
  return {"r2": r2_score(y, pred), "pred": pred}


def _logistic_fit(x: np.ndarray, y: np.ndarray, l2: float):
  """Multinomial logistic regression minimising mean CE + l2/2 ||W||² (the intercepts
  unpenalised) by L-BFGS: scikit-learn's C·Σ CE + ½||W||² with C = 1 / (l2 · n). Classes absent
  from y are never predicted."""
  if len(np.unique(y)) < 2:  # one class: scikit-learn refuses to fit, the optimum predicts it
    return DummyClassifier(strategy="most_frequent").fit(x, y)
  with warnings.catch_warnings():  # 24 keys over a few dozen clips is a classification all the same
    warnings.filterwarnings("ignore", message="The number of unique classes", category=UserWarning)
    return LogisticRegression(C=1.0 / (l2 * len(y)), solver="lbfgs", max_iter=300).fit(x, y)


@_checked
def logistic_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                   y_test: np.ndarray, *, num_classes: int,
                   l2s: Sequence[float] = (1e-3, 1e-2, 1e-1), folds: int = 3,
                   seed: int = 0) -> dict[str, Any]:
  """Linear classification probe: L2 strength by CV accuracy on the training rows, test accuracy.

  Args:
    x_train: [N, D] float. y_train: [N] int in [0, num_classes). x_test: [M, D]. y_test: [M] int.

  Returns:
    {"accuracy": test accuracy, "l2": chosen strength, "pred": test predictions [M] int}.
  """
  x_train, x_test = standardize(np.asarray(x_train, np.float64), np.asarray(x_test, np.float64))
  y_train, y_test = np.asarray(y_train), np.asarray(y_test)

  if y_train.min(initial=0) < 0 or y_train.max(initial=0) >= num_classes:
    raise ValueError(f"logistic_probe: labels must lie in [0, {num_classes}), got "
                     f"[{y_train.min()}, {y_train.max()}]")
  best, best_l2 = -1.0, l2s[0]
  for l2 in l2s:
    acc = []
    for fold in _folds(len(y_train), folds, seed):
      keep = np.setdiff1d(np.arange(len(y_train)), fold)
      model = _logistic_fit(x_train[keep], y_train[keep], l2)
      acc.append(np.mean(model.predict(x_train[fold]) == y_train[fold]))
    if np.mean(acc) > best:
      best, best_l2 = float(np.mean(acc)), l2
  pred = _logistic_fit(x_train, y_train, best_l2).predict(x_test).astype(np.int64)
  return {"accuracy": float(np.mean(pred == y_test)), "l2": float(best_l2), "pred": pred}


def knn_hit_rate(queries: np.ndarray, corpus: np.ndarray, match: Callable[[np.ndarray], np.ndarray],
                 *, k: int = 10, exclude: np.ndarray | None = None) -> float:
  """Mean share of each query's k nearest corpus rows (cosine) whose labels match the query's.

  Args:
    queries: [Q, D] float. corpus: [N, D] float.
    match: maps the neighbour indices [Q, k] int to a [Q, k] bool "label matches" array.
    exclude: optional [Q] int corpus row to leave out per query (e.g. the query's own clip).

  Returns:
    hit rate in [0, 1] (the mean of `knn_hits`).
  """
  return float(np.mean(knn_hits(queries, corpus, match, k=k, exclude=exclude)))


def bootstrap_se(stat: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000,
                 seed: int = 0) -> float:
  """Standard error of a statistic of n paired test items by the bootstrap
  (`scipy.stats.bootstrap`: the items' indices resampled with replacement, so paired arrays stay
  paired).

  Args:
    stat: maps row indices [n] int (drawn with replacement) to the statistic (float).
    n: number of test items. resamples: bootstrap draws.

  Returns:
    the standard deviation (ddof 1) of the statistic over the resamples.
  """
  res = scipy.stats.bootstrap((np.arange(n),), stat, n_resamples=resamples, vectorized=False,
                              method="percentile", rng=np.random.default_rng(seed))
  return float(res.standard_error)


def knn_hits(queries: np.ndarray, corpus: np.ndarray, match: Callable[[np.ndarray], np.ndarray],
             *, k: int = 10, exclude: np.ndarray | None = None) -> np.ndarray:
  """Per query, the share [Q] float of its k nearest corpus rows (cosine) whose labels match
  (arguments as `knn_hit_rate`)."""
  q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
  c = corpus / np.maximum(np.linalg.norm(corpus, axis=1, keepdims=True), 1e-12)
  scores = q @ c.T
  if exclude is not None:
    scores[np.arange(len(q)), exclude] = -np.inf
  top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.mean(match(top), axis=1)
