"""GCL's score-to-weight: per-pair loss weights from the graded relevance scores."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

SCORE_TO_WEIGHT = ("score_linear", "score_reciprocal", "no_score")


def score_weights(batch: Mapping[str, jax.Array], score_to_weight: str, *,
                  normalize: bool = True) -> jax.Array:
  """Per-pair loss weights w = STW(score): [B] float32 (mean 1 over the batch when `normalize`).

  score_linear / score_reciprocal: the batch's column of that name; no_score: ones.
  """
  if score_to_weight not in SCORE_TO_WEIGHT:
    raise ValueError(f"config key 'task.score_to_weight' must be one of {SCORE_TO_WEIGHT}, got "
                     f"{score_to_weight!r}")
  n = batch["query"].shape[0]
  if score_to_weight == "no_score":
    return jnp.ones((n,), jnp.float32)
  w = batch[score_to_weight].astype(jnp.float32)
  if normalize:
    w = w / jnp.maximum(jnp.mean(w), 1e-12)
  return w
