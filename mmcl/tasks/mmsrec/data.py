"""MMSRec's data: the items held out of training for the cold-start evaluation."""

from __future__ import annotations

import numpy as np


def cold_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
  """[N + 1] bool: a random `fraction` of items 1..N held out of training (row 0 False)."""
  cold = np.zeros(num_items + 1, bool)
  if fraction > 0:
    rng = np.random.default_rng(seed)
    cold[1 + rng.choice(num_items, size=int(round(fraction * num_items)), replace=False)] = True
  return cold
