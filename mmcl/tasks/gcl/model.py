"""GCL's multi-field document embedding: per-field embeddings fused with weights, missing fields
left out."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmcl.models.layers import l2_normalize


def fuse_fields(embeddings: jax.Array, present: jax.Array, weights: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Multi-field fusion with missing fields (GCL, arXiv:2404.08535).

  Args:
    embeddings: [F, B, D] float, one embedding per field and row (normalised here).
    present: [F, B] bool, field f of row b exists.
    weights: [F] float ≥ 0, per-field weights.

  Returns:
    fused: [B, D] float32, normalise(Σ_f w_f m_f ê_f / Σ_f w_f m_f); zero rows where no field with
      positive weight is present.
    valid: [B] bool, rows with at least one present field of positive weight.
  """
  if embeddings.ndim != 3 or present.shape != embeddings.shape[:2] or weights.shape != (
      embeddings.shape[0],):
    raise ValueError(f"fuse_fields: expected embeddings [F, B, D], present [F, B], weights [F]; "
                     f"got {embeddings.shape}, {present.shape}, {weights.shape}")
  w = weights.astype(jnp.float32)[:, None] * present.astype(jnp.float32)  # [F, B]
  total = jnp.sum(w, axis=0)  # [B]
  valid = total > 0
  w = w / jnp.where(valid, total, 1.0)[None, :]
  fused = jnp.sum(w[..., None] * l2_normalize(embeddings), axis=0)
  return l2_normalize(fused), valid
