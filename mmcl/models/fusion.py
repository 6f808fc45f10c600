"""MMSRec's fusion encoder (Song et al., arXiv:2304.13277), shared by the sequence
tower and the item tower.

For a sequence of L positions with M modalities each:
  token_{t,m} = LN_m(Linear_m(x_{t,m}))  (or a learned per-modality [MASK] vector at masked positions)
              + P_t (position, shared by an item's M tokens) + T_m (modality type)
  z = Dropout(LN(token)),  Transformer over the L·M tokens (bidirectional, key-padding mask over
      padding positions and missing modalities; `mmcl.models.layers.TransformerEncoder`)
  out_{t,m} = LN'_m(Linear'_m(z_{t,m}));  out_t = max over the available m of out_{t,m}.
The item tower runs each item as a length-1 sequence (position 0) through the same weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcl.models import layers


class FusionEncoder(nn.Module):
  """Attributes:
    num_modalities: M.
    width: d (MMSRec: 512).
    depth, num_heads, mlp_dim: Transformer (MMSRec: 2 layers, 8 heads, FFN 1024).
    max_len: positions stored.
    dropout: rate after the input LayerNorm and in the Transformer's residual branches.
  """
  num_modalities: int
  width: int = 512
  depth: int = 2
  num_heads: int = 8
  mlp_dim: int = 1024
  max_len: int = 50
  dropout: float = 0.1

  @nn.compact
  def __call__(self, feats: tuple[jax.Array, ...], available: jax.Array,
               masked: jax.Array | None = None, *, train: bool = False) -> jax.Array:
    """Encodes sequences of multi-modal items.

    Args:
      feats: M arrays [B, L, D_m] float, frozen modality features.
      available: [B, L, M] bool, modality m of position t is present (False for padding).
      masked: optional [B, L] bool, positions whose content is replaced by [MASK] (cloze); a masked
        position counts as having every modality.
      train: dropout on.

    Returns:
      [B, L, d] float32 fused outputs (zeros at positions with no available modality).
    """
    m = self.num_modalities
    if len(feats) != m:
      raise ValueError(f"FusionEncoder: expected {m} modality arrays, got {len(feats)}")
    b, length = feats[0].shape[:2]
    if available.shape != (b, length, m):
      raise ValueError(f"FusionEncoder: available shape {tuple(available.shape)} != [B, L, M] "
                       f"{(b, length, m)}")
    if length > self.max_len:
      raise ValueError(f"FusionEncoder: length {length} > max_len {self.max_len}")
    tokens = jnp.stack([nn.LayerNorm(name=f"in_norm_{j}")(nn.Dense(self.width, name=f"in_{j}")(f))
                        for j, f in enumerate(feats)], axis=2)  # [B, L, M, d]
    available = available.astype(bool)
    if masked is not None:
      mask_tok = self.param("mask_token", nn.initializers.normal(0.02), (m, self.width))
      tokens = jnp.where(masked[..., None, None], mask_tok[None, None], tokens)
      available = available | masked[..., None]
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.width))
    typ = self.param("type_embedding", nn.initializers.normal(0.02), (m, self.width))
    tokens = tokens + pos[None, :length, None] + typ[None, None]
    tokens = nn.LayerNorm(name="emb_norm")(tokens)
    tokens = nn.Dropout(self.dropout)(tokens, deterministic=not train)
    flat_avail = available.reshape(b, length * m)
    # A row with no available token at all (an all-padding sequence) still needs one key.
    flat_avail = flat_avail.at[:, -1].set(flat_avail[:, -1] | ~flat_avail.any(1))
    z = layers.TransformerEncoder(self.depth, self.num_heads, self.mlp_dim, self.dropout,
                                  name="transformer")(
        tokens.reshape(b, length * m, self.width), key_mask=flat_avail, train=train)
    z = z.reshape(b, length, m, self.width)
    outs = jnp.stack([nn.LayerNorm(name=f"out_norm_{j}")(nn.Dense(self.width, name=f"out_{j}")(
        z[:, :, j])) for j in range(m)], axis=2)
    pooled = jnp.max(jnp.where(available[..., None], outs, -jnp.inf), axis=2)
    return jnp.where(available.any(-1)[..., None], pooled, 0.0).astype(jnp.float32)


def fusion_flops(length: int, num_modalities: int, width: int, depth: int, mlp_dim: int,
                 feature_dims: tuple[int, ...]) -> float:
  """Forward matmul FLOPs of `FusionEncoder` for one sequence of `length` positions."""
  n = length * num_modalities
  per_layer = 2 * n * width * width * 4 + 2 * 2 * n * n * width + 2 * 2 * n * width * mlp_dim
  io = sum(2 * length * d * width for d in feature_dims) + 2 * n * width * width
  return float(depth * per_layer + io)
