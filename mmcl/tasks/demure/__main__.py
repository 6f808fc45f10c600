"""`python -m mmcl.tasks.demure item-scores | oracle-scores | score-auc` (see `main`)."""

from __future__ import annotations

import numpy as np

from mmcl.tasks.demure import analysis
from mmcl.tasks.demure.task import DemureTask


def main(argv: list[str] | None = None) -> None:
  """`python -m mmcl.tasks.demure item-scores --workdir W [--step S] --output F.npy` writes the
  per-(item, modality) mean contribution table of a checkpoint (for `task.item_scores`);
  `... score-auc --workdir W [--step S]` prints the noise AUC of every score variant."""
  import argparse  # pylint: disable=g-import-not-at-top
  from mmcl import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(prog="python -m mmcl.tasks.demure")
  sub = ap.add_subparsers(dest="cmd", required=True)
  sc = sub.add_parser("item-scores", help="per-(item, modality) scores of a checkpoint")
  sc.add_argument("--workdir", required=True)
  sc.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  sc.add_argument("--mode", default=None, choices=("abs", "signed"),
                  help="contribution (default: the workdir's task.contribution)")
  sc.add_argument("--path-steps", type=int, default=None,
                  help="K of task.contribution_path_steps (default: the workdir's): 1 = "
                  "gradient×input, K > 1 = integrated gradients over K steps")
  sc.add_argument("--output", required=True, help=".npy path")
  so = sub.add_parser("oracle-scores", help="the planted pairs as a table: -1 where the item's "
                      "modality is planted noise, +1 elsewhere (flags from it are the planted "
                      "pairs first: the ceiling of what denoising can gain)")
  so.add_argument("--workdir", required=True)
  so.add_argument("--output", required=True, help=".npy path")
  sa = sub.add_parser("score-auc", help="noise AUC of every score variant of a checkpoint")
  sa.add_argument("--workdir", required=True)
  sa.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  a = ap.parse_args(argv)
  def demure_only(name: str) -> type[DemureTask]:
    if name != "demure":
      raise ValueError(f"{a.workdir}: task {name!r}, expected demure")
    return DemureTask
  wd = workdir_lib.TrainedWorkdir(a.workdir, resolve_task=demure_only)
  if a.cmd == "oracle-scores":
    table = analysis.oracle_scores(wd.config.task, wd.task.noisy_np, wd.task.num_items)
    np.save(a.output, table)
    print(f"wrote {a.output}: {table.shape}, {int((table < 0).sum())} planted (item, modality) "
          "pairs")
    return
  _, params = wd.restore_usable_params(a.step)
  if a.cmd == "score-auc":
    if not wd.config.task.plant_noise_modality:
      raise ValueError(f"{a.workdir}: task.plant_noise_modality is empty, nothing to detect")
    res = analysis.score_variant_detection(wd.task.scorer, params, *wd.task.training_rows(),
                                           wd.task.noisy_np)
    for k, v in res.items():
      print(f"{k:40s} {v:.4f}")
    return
  table = wd.task.item_scores(params, a.mode, a.path_steps)
  np.save(a.output, table)
  print(f"wrote {a.output}: {table.shape}")


if __name__ == "__main__":
  main()
