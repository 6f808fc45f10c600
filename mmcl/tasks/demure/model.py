"""Demure's model: modality projections W_m, an optional item-ID table and SASRec's causal encoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcl.models import seq_transformer


class DemureModel(nn.Module):
  """Modality projections W_m, optional ID table and the SASRec encoder."""
  num_modalities: int
  num_items: int
  hidden: int
  max_len: int
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2
  use_id_embedding: bool = False

  def setup(self):
    self.proj = [nn.Dense(self.hidden, use_bias=False, kernel_init=seq_transformer.XAVIER,
                          name=f"proj_{m}") for m in range(self.num_modalities)]
    if self.use_id_embedding:
      self.id_embedding = self.param("id_embedding", seq_transformer.XAVIER,
                                     (self.num_items + 1, self.hidden))
    self.encoder = seq_transformer.SequenceEncoder(
        max_len=self.max_len, num_blocks=self.num_blocks, num_heads=self.num_heads,
        dropout=self.dropout, causal=True)

  def modality_tokens(self, feats: tuple[jax.Array, ...]) -> jax.Array:
    """feats: M arrays [..., D_m] → [..., M, d] projected modality tokens x̃^m."""
    return jnp.stack([p(f) for p, f in zip(self.proj, feats)], axis=-2)

  def id_tokens(self, items: jax.Array) -> jax.Array:
    """items: [...] int → [..., d] (zeros without the ID table; row 0 is always zero)."""
    if not self.use_id_embedding:
      return jnp.zeros((*items.shape, self.hidden), jnp.float32)
    return self.id_embedding[items] * (items != 0)[..., None]

  def encode(self, tokens: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    """tokens: [B, L, d], mask: [B, L] bool → [B, L, d]."""
    return self.encoder(tokens, mask, train=train)

  def __call__(self, feats, items, mask):
    tok = self.modality_tokens(feats).sum(-2) + self.id_tokens(items)
    return self.encode(tok, mask, False)
