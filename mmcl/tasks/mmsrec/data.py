"""MMSRec's data: the items held out of training for the cold-start evaluation, and the original
sequences rebuilt from masked rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def cold_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
  """[N + 1] bool: a random `fraction` of items 1..N held out of training (row 0 False)."""
  cold = np.zeros(num_items + 1, bool)
  if fraction > 0:
    rng = np.random.default_rng(seed)
    cold[1 + rng.choice(num_items, size=int(round(fraction * num_items)), replace=False)] = True
  return cold


def original_items(batch, cold: np.ndarray) -> jax.Array:
  """The original sequences [B, L] of a `masked` batch (inputs [B, L] with mask id N + 1 where
  masked, labels [B, L] the original item there), with the held-out (cold [N + 1] bool) items
  removed, so they never appear in training."""
  inputs, labels = batch["inputs"], batch["labels"]
  orig = jnp.where(labels > 0, labels, inputs)
  orig = jnp.where(orig > cold.shape[0] - 1, 0, orig)
  return jnp.where(jnp.asarray(cold)[orig], 0, orig)
