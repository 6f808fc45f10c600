"""Demure's noise-detection statistics: ROC-AUC of the contribution scores against the planted
labels, and scores pooled per (item, modality)."""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve of `scores` for binary `labels` (scikit-learn's `roc_auc_score`:
  tied scores count one half); NaN when one class is absent."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
  if labels.all() or not labels.any():
    return float("nan")
  return float(roc_auc_score(labels, scores))


def pool_by_item(scores: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
  """Mean score of every (item, modality) over its occurrences.

  scores: [R, L, M] float per-position scores; items: [R, L] int (0 = padding, ignored).
  Returns [N + 1, M] float32 (0 for items that never occur; row 0 = 0).
  """
  m = scores.shape[-1]
  real = items.reshape(-1) != 0
  flat_items, flat = items.reshape(-1)[real], scores.reshape(-1, m)[real]
  sums = np.zeros((num_items + 1, m), np.float64)
  np.add.at(sums, flat_items, flat)
  counts = np.bincount(flat_items, minlength=num_items + 1)[:, None]
  return (sums / np.maximum(counts, 1)).astype(np.float32)
