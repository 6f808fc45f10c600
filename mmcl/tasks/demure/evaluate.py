"""Demure's noise-detection statistics: ROC-AUC of the contribution scores against the planted
labels, and scores pooled per (item, modality)."""

from __future__ import annotations

import numpy as np


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve of `scores` for binary `labels` (ties get average ranks)."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  # Average ranks over ties.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = first + (counts - 1) / 2.0 + 1.0
  ranks[order] = np.repeat(avg, counts)
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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
