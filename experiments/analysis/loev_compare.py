"""Paired comparisons of LOEV / LOEV++ / SimCLR evaluations: the three LOEV claims, with standard errors.

  .venv/bin/python experiments/analysis/loev_compare.py --loev W1 --plusplus W2 --simclr W3 [--step S]
      [--simclr-plusplus W4]

The baseline is W3 for both methods unless `--simclr-plusplus` gives LOEV++ its own (a baseline
at LOEV++'s trunk when the two methods are compared at different trunks).

Reads `<workdir>/eval/<step>/loev_eval_items.npz` (written by `mmcl eval`; every run is evaluated
on the same held-out clips in the same order, so differences are paired) and prints, as one JSON
object, each LOEV claim's difference and its bootstrap standard error (1,000 resamples of the
test clips / queries, the same resamples for both terms of a difference):
  * head k vs invariant head on the equivariance probe (R², per tracked augmentation; linear, and
    where the evaluation has them, "claim1_cf" / "claim1_rbf_cf": the linear and RBF kernel ridge
    probes cross-fitted over all clips), for LOEV and
    LOEV++ (its branches and, where evaluated, its heads' projections of them), and head k vs
    the SimCLR baseline's (invariant) head;
  * key accuracy and tempo R² of the whole embedding against the baseline's (and, where the
    evaluation has them, "claim2_cf": the same probes cross-fitted over all clips);
  * LOEV++ tempo kNN hit@10 of the stretch branch against the whole embedding.
Also, as a diagnosis, the invariant head's own-clip top-1 retrieval of transformed views against
head k's. With `--curve`, the equivariance R² and own-clip top-1 of every subspace at each
evaluated step.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from mmcl.tasks.loev import probes  # noqa: E402


def _items(workdir: str, step: int | None) -> tuple[int, dict[str, np.ndarray]]:
  root = pathlib.Path(workdir) / "eval"
  steps = sorted(int(p.name) for p in root.iterdir() if (p / "loev_eval_items.npz").is_file())
  if not steps:
    raise FileNotFoundError(f"{root}: no evaluated step with loev_eval_items.npz (run mmcl eval)")
  s = step if step is not None else steps[-1]
  with np.load(root / str(s) / "loev_eval_items.npz") as f:
    return s, {k: f[k] for k in f.files}


def _diff(a, b, n: int) -> dict[str, float]:
  """a, b: maps row indices → statistic; the paired difference a − b and its bootstrap SE."""
  full = np.arange(n)
  return {"a": round(a(full), 4), "b": round(b(full), 4), "diff": round(a(full) - b(full), 4),
          "se": round(probes.bootstrap_se(lambda i: a(i) - b(i), n), 4)}


def _r2(items, aug, space, probe="equivariance"):
  """probe: "equivariance" (linear ridge, 70/30 split), "equivariance_cf" (linear, cross-fitted
  over all clips) or "equivariance_rbf_cf" (RBF kernel ridge, cross-fitted)."""
  target = "equivariance" if probe == "equivariance" else "equivariance_cf"
  y, p = items[f"{target}/{aug}/target"], items[f"{probe}/{aug}/{space}/pred"]
  return lambda i: probes.r2_score(y[i], p[i])


def compare(loev: str, plusplus: str, simclr: str, step: int | None,
            simclr_plusplus: str | None = None) -> dict:
  runs = {"loev": _items(loev, step), "loev++": _items(plusplus, step),
          "simclr": _items(simclr, step)}
  if simclr_plusplus is not None:
    runs["simclr (loev++)"] = _items(simclr_plusplus, step)
  out = {"steps": {k: v[0] for k, v in runs.items()}}
  it = {k: v[1] for k, v in runs.items()}
  # The baseline each method is compared with.
  base = {"loev": it["simclr"], "loev++": it.get("simclr (loev++)", it["simclr"])}
  # Evaluations from before the nonlinear probe existed hold only the linear one.
  probe_names = ["equivariance"] + (
      ["equivariance_cf", "equivariance_rbf_cf"]
      if all("equivariance_rbf_cf/pitch/sub/invariant/pred" in x for x in it.values()) else [])
  for probe in probe_names:
    tag = {"equivariance": "claim1", "equivariance_cf": "claim1_cf",
           "equivariance_rbf_cf": "claim1_rbf_cf"}[probe]
    n_eq = len(it["simclr"]["probe/key_correct"] if probe == "equivariance"
               else it["simclr"]["equivariance_cf/pitch/target"])
    for aug in ("pitch", "stretch"):
      for run in ("loev", "loev++"):
        out[f"{tag}/{run}/{aug}: sub/{aug} - sub/invariant"] = _diff(
            _r2(it[run], aug, f"sub/{aug}", probe), _r2(it[run], aug, "sub/invariant", probe),
            n_eq)
        out[f"{tag}/{run}/{aug}: sub/{aug} - simclr sub/invariant"] = _diff(
            _r2(it[run], aug, f"sub/{aug}", probe), _r2(base[run], aug, "sub/invariant", probe),
            n_eq)
      # loev++ evaluations also hold each head's projection of its branch (head/<name>).
      if f"{probe}/{aug}/head/{aug}/pred" in it["loev++"]:
        out[f"{tag}/loev++/{aug}: head/{aug} - head/invariant"] = _diff(
            _r2(it["loev++"], aug, f"head/{aug}", probe),
            _r2(it["loev++"], aug, "head/invariant", probe), n_eq)
  # claim2: the 70/30 split's probes; claim2_cf: cross-fitted over all clips (evaluations that
  # have the cross-fitted probes), about half the standard error.
  probe_keys = {"claim2": ("probe/key_correct", "probe/tempo_target", "probe/tempo_pred"),
                "claim2_cf": ("probe_cf/key/whole/correct", "probe_cf/tempo/target",
                              "probe_cf/tempo/whole/pred")}
  for run in ("loev", "loev++"):
    a, b = it[run], base[run]
    for tag, (correct, target, pred) in probe_keys.items():
      if correct not in a or correct not in b:
        continue
      out[f"{tag}/{run}: key accuracy - simclr"] = _diff(
          lambda i, x=a[correct]: float(np.mean(x[i])),
          lambda i, x=b[correct]: float(np.mean(x[i])), len(b[correct]))
      out[f"{tag}/{run}: tempo R2 - simclr"] = _diff(
          lambda i, y=a[target], p=a[pred]: probes.r2_score(y[i], p[i]),
          lambda i, y=b[target], p=b[pred]: probes.r2_score(y[i], p[i]), len(b[target]))
  # Diagnosis of claim 1: is the invariant head invariant? Own-clip top-1 retrieval of transformed
  # views (1 = invariant), invariant head − head k.
  for aug in ("pitch", "stretch"):
    for run in ("loev", "loev++"):
      inv = it[run].get(f"invariance/{aug}/sub/invariant/own_top1")
      head = it[run].get(f"invariance/{aug}/sub/{aug}/own_top1")
      if inv is not None:
        out[f"diag/{run}/{aug}: own_top1 sub/invariant - sub/{aug}"] = _diff(
            lambda i, x=inv: float(np.mean(x[i])), lambda i, x=head: float(np.mean(x[i])),
            len(inv))
  pp = it["loev++"]
  key = [k for k in pp if k.startswith("knn/tempo/sub/stretch/hit@")][0]
  whole = key.replace("sub/stretch", "whole")
  q = len(pp[key])
  out["claim3/loev++: tempo kNN sub/stretch - whole"] = _diff(
      lambda i: float(np.mean(pp[key][i])), lambda i: float(np.mean(pp[whole][i])), q)
  return out


def curve(workdir: str) -> dict:
  root = pathlib.Path(workdir) / "eval"
  rows = {}
  for p in sorted(root.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1):
    f = p / "loev_eval.json"
    if f.is_file():
      m = json.loads(f.read_text())
      rows[p.name] = {k: round(v, 3) for k, v in m.items()
                      if (k.startswith("equivariance") and k.endswith("/r2"))
                      or (k.startswith("invariance/") and k.endswith("/own_top1"))}
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--loev", required=True)
  p.add_argument("--plusplus", required=True)
  p.add_argument("--simclr", required=True)
  p.add_argument("--simclr-plusplus", default=None,
                 help="the baseline for LOEV++ (default: --simclr)")
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--curve", action="store_true")
  args = p.parse_args()
  print(json.dumps(compare(args.loev, args.plusplus, args.simclr, args.step,
                           args.simclr_plusplus), indent=1))
  if args.curve:
    runs = [args.loev, args.plusplus, args.simclr] + (
        [args.simclr_plusplus] if args.simclr_plusplus else [])
    print(json.dumps({w: curve(w) for w in runs}, indent=1))


if __name__ == "__main__":
  main()
