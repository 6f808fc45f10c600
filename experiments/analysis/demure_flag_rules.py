"""How precise Demure's flags would be under other rules for the same item-score table.

  .venv/bin/python experiments/analysis/demure_flag_rules.py --workdir workdirs/dm_base_sm \
      --table workdirs/dm_base_sm/item_scores_350.npy [--fractions 0.05 0.1 0.2]

Reads the run's config (planted items, data) and a per-(item, modality) table written by
`python -m mmcl.tasks.demure item-scores`, and prints, as one JSON object, the precision (share of
the flagged (position, modality) pairs of the training rows that are planted noise) and recall (share
of the planted pairs that are flagged) of three rules at each fraction ρ:
  sequence   the lowest ρ of each training row's real (t, m) pairs (the paper's rule; what the
             Demure runs use);
  global     one threshold over all the training rows' pairs: the lowest ρ of all of them, so a
             row without noise loses nothing;
  planted_modality_only  the global rule restricted to the planted modality (an oracle on the
             modality, not on the items: it shows what the table ranks within the noisy modality).
No training: the rules only differ in which pairs they mask, so their precision bounds what the
denoised view can gain (see docs/results/demure.md for the oracle-flag runs).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from mmcl import workdir as workdir_lib  # noqa: E402
from mmcl.tasks.demure.evaluate import planted_labels  # noqa: E402
from mmcl.tasks import get_task_class  # noqa: E402
from mmcl.tasks.demure.loss import flag_lowest, lowest_fraction_threshold  # noqa: E402


def lowest_global(scores: np.ndarray, valid: np.ndarray, fraction: float) -> np.ndarray:
  """The lowest `fraction` of all valid entries, by one threshold as `task.flag_scope=global`
  (ties at the threshold included). scores, valid: [...] float / bool. Returns [...] bool."""
  return (scores <= lowest_fraction_threshold(scores[valid], fraction)) & valid


def rules(table: np.ndarray, inputs: np.ndarray, valid: np.ndarray, labels: np.ndarray, j: int,
          fractions: list[float]) -> dict:
  """table [N + 1, M]; inputs [R, L]; valid, labels [R, L, M] bool; j the planted modality."""
  c = table[inputs]  # [R, L, M]
  r, length, m = c.shape
  out = {"planted_share": round(float(labels[valid].mean()), 4)}

  def score(flags):
    return {"precision": round(float(labels[flags].mean()), 4) if flags.any() else None,
            "recall": round(float(flags[labels].mean()), 4),
            "flagged_share": round(float(flags[valid].mean()), 4)}
  for rho in fractions:
    seq = np.asarray(flag_lowest(jnp.asarray(c.reshape(r, length * m)),
                                        jnp.asarray(valid.reshape(r, length * m)),
                                        rho)).reshape(c.shape)
    only = np.zeros_like(valid)
    only[..., j] = True
    out[f"rho={rho}"] = {"sequence": score(seq), "global": score(lowest_global(c, valid, rho)),
                         "planted_modality_only": score(lowest_global(c, valid & only, rho))}
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="the Demure run whose config plants the noise")
  p.add_argument("--table", required=True, help="[N + 1, M] .npy of item scores")
  p.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2])
  a = p.parse_args()
  wd = workdir_lib.TrainedWorkdir(a.workdir, resolve_task=get_task_class)
  if not wd.config.task.plant_noise_modality:
    raise ValueError(f"{a.workdir}: task.plant_noise_modality is empty, nothing to detect")
  table = np.load(a.table)
  inputs, _ = wd.task.training_rows()
  j, valid, labels = planted_labels(inputs, wd.config.task, wd.task.noisy_np)
  if table.shape != (wd.task.num_items + 1, valid.shape[-1]):
    raise ValueError(f"--table {a.table}: shape {table.shape}, expected "
                     f"{(wd.task.num_items + 1, valid.shape[-1])}")
  print(json.dumps(rules(table, inputs, valid, labels, j, a.fractions), indent=1))


if __name__ == "__main__":
  main()
