"""Artist retrieval's training neighbours: the ground-truth similar artists usable as positives."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def training_neighbours(metadata: Mapping[str, Any]) -> np.ndarray:
  """[N, K] int32: catalogue artist i's ground-truth neighbours usable as positives (-1 = none).

  Only pairs of two role-`train` artists: a test or validation query, or a neighbour of one
  (role `blocked`), never appears, on either side.
  """
  info = metadata["catalogue"]
  gold = np.asarray(info["gold"], np.int64)
  is_train = np.asarray(info["role"]) == "train"
  ok = (gold >= 0) & is_train[:, None] & is_train[np.maximum(gold, 0)]
  return np.where(ok, gold, -1).astype(np.int32)
