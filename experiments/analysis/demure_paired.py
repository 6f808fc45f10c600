"""Paired comparison of Demure arms against their backbone on the same users.

  .venv/bin/python experiments/analysis/demure_paired.py --base workdirs/dm_sci_base \
      workdirs/dm_sci_oracle workdirs/dm_sci_cl0:denoised [--splits valid test] [--boot 2000]

Each run is WORKDIR (original history) or WORKDIR:denoised (the history with the run's
`task.item_scores` flags removed, as `mmcl eval` reports under "<split>_denoised/"); the newest
checkpoint of each workdir is read. For every leave-one-out case the target's full-ranking rank is
computed by the evaluator's own `mmcl.eval.seqrec.full_ranking_ranks` (all items ranked, padding
excluded), so the per-run means equal `mmcl eval`'s full Recall@10 / NDCG@10. The
difference to the base is paired: the same users, the same targets, so its standard error is that
of the per-user differences (analytic, and a bootstrap over users with a fixed seed as a check).
Prints a Markdown table: per split and run, Recall@10 / NDCG@10, the difference to the base and its
standard errors.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from mmcl import workdir as workdir_lib  # noqa: E402
from mmcl.eval import metrics as metrics_lib  # noqa: E402
from mmcl.eval import seqrec  # noqa: E402
from mmcl.tasks import get_task_class  # noqa: E402


def per_case_metrics(ranks: np.ndarray, k: int = 10) -> dict[str, np.ndarray]:
  """ranks: [U] 0-based full-ranking ranks → per-case recall@k and ndcg@k, each [U] float64
  (`metrics.rank_gains`, whose means are the evaluator's)."""
  hit, ndcg = metrics_lib.rank_gains(ranks, k)
  return {f"recall@{k}": hit.astype(np.float64), f"ndcg@{k}": ndcg}


def paired_difference(a: np.ndarray, b: np.ndarray, *, boot: int, seed: int = 0
                      ) -> dict[str, float]:
  """Mean of a − b [U] with its analytic SE and a bootstrap SE over cases."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  out = {"diff": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(len(d)))}
  if boot:
    rng = np.random.default_rng(seed)
    means = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(boot)]
    out["se_boot"] = float(np.std(means, ddof=1))
  return out


def run_ranks(spec: str, splits: list[str]) -> dict[str, np.ndarray]:
  """WORKDIR[:denoised] → {split: [U] ranks} at the newest checkpoint."""
  path, _, mode = spec.partition(":")
  if mode not in ("", "denoised"):
    raise ValueError(f"{spec}: expected WORKDIR or WORKDIR:denoised")
  wd = workdir_lib.TrainedWorkdir(path, resolve_task=get_task_class)
  task = wd.task
  if mode and task.item_score_table is None:
    raise ValueError(f"{spec}: the run has no task.item_scores, so no denoised history")
  params = wd.restore_params(wd.resolve_step(None))
  user_items, _ = seqrec.load_interactions(wd.config.data.dir)
  item_emb = np.asarray(task.item_table(params), np.float32)
  out = {}
  for split in splits:
    _, history, target = seqrec.eval_cases(user_items, split, wd.config.data.max_len)
    q = np.asarray(task.user_embeddings(params, history, denoised=bool(mode)), np.float32)
    out[split] = seqrec.full_ranking_ranks(q, item_emb, target, task.mesh)
  return out


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--base", required=True, help="the backbone's workdir")
  ap.add_argument("runs", nargs="+", help="WORKDIR or WORKDIR:denoised")
  ap.add_argument("--splits", nargs="+", default=["valid", "test"])
  ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples (0 = none)")
  a = ap.parse_args(argv)
  base = {s: per_case_metrics(r) for s, r in run_ranks(a.base, a.splits).items()}
  print("| split | run | Recall@10 | − base (paired SE, bootstrap SE) | NDCG@10 | − base (paired SE, "
        "bootstrap SE) |\n|---|---|---:|---:|---:|---:|")
  for split in a.splits:
    b = base[split]
    print(f"| {split} | {a.base} (base) | {b['recall@10'].mean():.4f} | – | "
          f"{b['ndcg@10'].mean():.4f} | – |")
  for spec in a.runs:
    for split, ranks in run_ranks(spec, a.splits).items():
      cells = []
      for m, v in per_case_metrics(ranks).items():
        d = paired_difference(v, base[split][m], boot=a.boot)
        boot = f", {d['se_boot']:.4f}" if "se_boot" in d else ""
        cells += [f"{v.mean():.4f}", f"{d['diff']:+.4f} ({d['se']:.4f}{boot})"]
      print(f"| {split} | {spec} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
