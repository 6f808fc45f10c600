"""SASRec's training loss: BCE with one sampled negative per position (Kang & McAuley 2018)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bce_sampled_loss(h: jax.Array, pos_emb: jax.Array, neg_emb: jax.Array,
                     weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  """SASRec's BCE with one negative per position.

  Args:
    h: [B, L, D] sequence outputs; pos_emb, neg_emb: [B, L, D]; weight: [B, L] float (1 = target).
  Returns:
    (loss [], accuracy [] = share of positions scoring the positive above the negative).
  """
  pos = jnp.sum(h * pos_emb, -1)
  neg = jnp.sum(h * neg_emb, -1)
  per = jax.nn.softplus(-pos) + jax.nn.softplus(neg)  # −log σ(pos) − log(1 − σ(neg))
  denom = jnp.maximum(weight.sum(), 1.0)
  return (per * weight).sum() / denom, ((pos > neg) * weight).sum() / denom
