"""Negatives drawn for sampled losses (SASRec's BCE, Demure's contribution passes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_train_negatives(rng: jax.Array, seen: jax.Array, shape: tuple[int, ...],
                           num_items: int, tries: int = 4) -> jax.Array:
  """Uniform items in 1..N that are not in the row's `seen` items (SASRec's `random_neq`).

  Draws `tries` candidates per position and keeps the first unseen one (the chance that all are
  seen is (|seen|/N)^tries, negligible for sparse data; then the last candidate is kept).

  Args:
    rng: PRNG key.
    seen: [B, S] int32, the row's items (0 = padding, never drawn anyway).
    shape: (B, L) output shape.
    num_items: N.
  Returns:
    [B, L] int32 in 1..N.
  """
  b = seen.shape[0]
  if shape[0] != b:
    raise ValueError(f"sample_train_negatives: shape {shape} and seen {seen.shape} disagree on B")
  cand = jax.random.randint(rng, (*shape, tries), 1, num_items + 1, dtype=jnp.int32)
  hit = (cand[..., None] == seen.reshape(b, *([1] * (len(shape) - 1)), 1, -1)).any(-1)
  first_ok = jnp.argmax(~hit, axis=-1)
  first_ok = jnp.where((~hit).any(-1), first_ok, tries - 1)
  return jnp.take_along_axis(cand, first_ok[..., None], axis=-1)[..., 0]
