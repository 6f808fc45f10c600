"""Demure's contribution tables and diagnostics: the per-(item, modality) score table that
`task.item_scores` reads, the oracle table of the planted pairs, and the noise AUC of every score
variant (`python -m mmcl.tasks.demure item-scores | oracle-scores | score-auc`)."""

from __future__ import annotations

import numpy as np

from mmcl.tasks.demure.evaluate import PositionScorer, planted_labels, pool_by_item, roc_auc


def item_scores(scorer: PositionScorer, params, inputs: np.ndarray, targets: np.ndarray,
                mode: str | None = None, path_steps: int | None = None) -> np.ndarray:
  """[N + 1, M] mean contribution of every (item, modality) over the training rows (inputs,
  targets: [R, L]): the table that `task.item_scores` reads."""
  return pool_by_item(scorer(params, inputs, targets, mode, path_steps=path_steps), inputs,
                      scorer.net.model.num_items)


def oracle_scores(t, planted: dict[str, np.ndarray], num_items: int) -> np.ndarray:
  """[N + 1, M] float32 table (the `task.item_scores` format; t: the `task` config, planted:
  modality → [N + 1] bool): −1 for every planted (item, modality), +1 elsewhere, so that flags
  from it take the planted pairs first (oracle flags: the ceiling of what the denoised view can
  gain)."""
  if not t.plant_noise_modality:
    raise ValueError("oracle scores need planted noise: config key task.plant_noise_modality "
                     "is empty")
  table = np.ones((num_items + 1, len(t.modalities)), np.float32)
  table[planted[t.plant_noise_modality], list(t.modalities).index(t.plant_noise_modality)] = -1.0
  return table


def score_variant_detection(scorer: PositionScorer, params, inputs: np.ndarray,
                            targets: np.ndarray, planted: dict[str, np.ndarray]
                            ) -> dict[str, float]:
  """Noise AUC (over all real (t, m) pairs, and within the planted modality) of every score
  variant over the training rows (inputs, targets: [R, L]): mode × normalisation with
  per-position scores, plus batch pooling and the average over all occurrences of the
  sequence-normalised scores."""
  j, valid, labels = planted_labels(inputs, scorer.t, planted)
  out = {}
  for mode in ("abs", "signed"):
    for norm, pool in (("none", "none"), ("sequence", "none"), ("position", "none"),
                       ("sequence", "batch_item"), ("sequence", "all_items")):
      c = scorer(params, inputs, targets, mode, norm, "none" if pool == "all_items" else pool)
      if pool == "all_items":
        c = pool_by_item(c, inputs, scorer.net.model.num_items)[inputs]
      name = f"{mode}/{norm}/{pool}"
      out[f"{name}/auc"] = roc_auc(-c[valid], labels[valid])
      within = valid[..., j]
      out[f"{name}/auc_within"] = roc_auc(-c[..., j][within], labels[..., j][within])
  return out
