"""Demure's noise flags: the lowest-contribution (t, m) pairs of a row, or under one global
threshold (the flags that remove modality tokens from the denoised view)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def flag_lowest(scores: jax.Array, valid: jax.Array, fraction: float) -> jax.Array:
  """Per row, flags the lowest `fraction` of its valid entries.

  scores: [B, K] float; valid: [B, K] bool. Returns [B, K] bool (floor(fraction · n_valid) per row).
  """
  s = jnp.where(valid, scores, jnp.inf)
  rank = jnp.argsort(jnp.argsort(s, axis=1), axis=1)
  k = jnp.floor(fraction * valid.sum(1, keepdims=True)).astype(rank.dtype)
  return (rank < k) & valid


def lowest_fraction_threshold(scores: np.ndarray, fraction: float) -> float:
  """The score at or below which the lowest `fraction` of `scores` [K] lies (the "lower"
  quantile, so `scores <= threshold` flags about `fraction` of them, ties included)."""
  return float(np.quantile(np.asarray(scores).reshape(-1), fraction, method="lower"))
