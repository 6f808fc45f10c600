"""LOEV's frozen-feature probes on the CPU: `mmcl.tasks.loev.probes` against the same probes fitted
through scikit-learn's estimators call by call (the reference the probe tests compare with).

  .venv/bin/python experiments/bench/loev_probes.py [--rows 96] [--dim 32] [--repeats 3]

Synthetic standard-normal features, a cyclic target (cos of one feature plus noise). Times, in CPU
seconds of this process (one thread: OPENBLAS_NUM_THREADS=1 is set below), the out-of-fold
predictions `cross_fitted` of the RBF kernel ridge and ridge probes, 5 outer folds × 4 inner CV
folds over every (α, γ), for mmcl's probes and for the reference, and checks that both give the same
predictions bit for bit. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from mmcl.tasks.loev import probes  # noqa: E402


def reference_kernel_ridge_probe(x_train, y_train, x_test, y_test):
  """`probes.kernel_ridge_probe` written with `KernelRidge(kernel="rbf")` fitted per candidate."""
  from sklearn.kernel_ridge import KernelRidge  # pylint: disable=g-import-not-at-top
  x_train, x_test = probes.standardize(np.asarray(x_train, np.float64),
                                       np.asarray(x_test, np.float64))
  y_train, d = np.asarray(y_train, np.float64), x_train.shape[1]

  def fit(tr, te_x, alpha, gamma):
    ym = y_train[tr].mean()
    return KernelRidge(alpha=alpha, kernel="rbf", gamma=gamma).fit(
        x_train[tr], y_train[tr] - ym).predict(te_x) + ym
  best = probes._select_by_cv(  # pylint: disable=protected-access
      [(a, g / d) for g in probes.KERNEL_GAMMAS for a in probes.KERNEL_ALPHAS], len(y_train),
      lambda ag, keep, fold: fit(keep, x_train[fold], *ag), y_train, 4, 0)
  return {"pred": fit(np.arange(len(y_train)), x_test, *best)}


def reference_ridge_probe(x_train, y_train, x_test, y_test):
  """`probes.ridge_probe` with scikit-learn's per-fit input checks on."""
  return probes.ridge_probe.__wrapped__(x_train, y_train, x_test, y_test)


def _cpu(fn, repeats):
  best, out = float("inf"), None
  for _ in range(repeats):
    t0 = time.process_time()
    out = fn()
    best = min(best, time.process_time() - t0)
  return best, out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=96)
  p.add_argument("--dim", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(a.rows, a.dim))
  y = np.cos(2 * x[:, 0]) + 0.1 * rng.normal(size=a.rows)
  out = {"rows": a.rows, "dim": a.dim}
  for name, mine, ref in (("kernel_ridge", probes.kernel_ridge_probe, reference_kernel_ridge_probe),
                          ("ridge", probes.ridge_probe, reference_ridge_probe)):
    t_mine, r_mine = _cpu(lambda: probes.cross_fitted(mine, x, y), a.repeats)  # noqa: B023
    t_ref, r_ref = _cpu(lambda: probes.cross_fitted(ref, x, y), a.repeats)  # noqa: B023
    out[name] = {"mmcl_cpu_s": round(t_mine, 3), "reference_cpu_s": round(t_ref, 3),
                 "speedup": round(t_ref / t_mine, 2),
                 "identical": bool(np.array_equal(r_mine["pred"], r_ref["pred"]))}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
