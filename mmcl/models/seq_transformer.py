"""The SASRec sequence backbone (Kang & McAuley, ICDM 2018), shared by the recommendation recipes.

The encoder takes token vectors (item embeddings for SASRec, fused modality features for Demure),
so it knows nothing of item ids. It follows the authors' TensorFlow code (`kang205/SASRec`,
`model.py` / `modules.py`) rather than a textbook Transformer, because those details move the
published numbers:

  x = dropout(tokens + P)                    (learned positions; tokens are scaled by the caller)
  x = x · m                                  (m: [B, L] 1 for real positions, 0 for padding)
  repeat num_blocks times:
    q = LN(x)
    x = q + Dropout(Attn(Q = q W_q, K = x W_k, V = x W_v))    residual on the *normalised* queries;
                                                              keys/values are not normalised; no
                                                              output projection; causal + key mask
    x = LN(x);  x = x + Dropout(W_2 Dropout(ReLU(W_1 x)))      point-wise feed-forward (width d)
    x = x · m
  out = LN(x)

LayerNorm epsilon is 1e-8 as in the reference. A padding query attends to itself only (it would
otherwise see no key); its output is zeroed by the mask and never read.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcl.models.layers import check_array

Dtype = Any
_EPS = 1e-8
XAVIER = nn.initializers.xavier_uniform()


class SASRecAttention(nn.Module):
  """Causal multi-head attention with SASRec's residual on the normalised queries.

  Attributes:
    num_heads: heads; the width must be divisible by it.
    dropout: dropout on the attention weights.
    causal: position t attends only to positions <= t (SASRec); False for bidirectional use.
    dtype: compute dtype.
  """
  num_heads: int = 1
  dropout: float = 0.0
  causal: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, keys: jax.Array, key_mask: jax.Array, *,
               train: bool) -> jax.Array:
    """queries, keys: [B, L, W]; key_mask: [B, L] bool (True = real) → [B, L, W] (incl. residual)."""
    b, length, width = queries.shape
    if width % self.num_heads:
      raise ValueError(f"SASRecAttention: width {width} not divisible by num_heads={self.num_heads}")
    dh = width // self.num_heads
    dense = lambda name: nn.Dense(width, dtype=self.dtype, kernel_init=XAVIER, name=name)  # noqa: E731
    split = lambda x: x.reshape(b, length, self.num_heads, dh)  # noqa: E731
    q, k, v = split(dense("query")(queries)), split(dense("key")(keys)), split(dense("value")(keys))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(float(dh))
    allowed = jnp.broadcast_to(key_mask[:, None, None, :], logits.shape)
    # Masks from position comparisons, not tril / eye of booleans: the same values, and ONNX
    # Runtime has no boolean EyeLike kernel for exported towers.
    pos = jnp.arange(length)
    if self.causal:
      allowed = allowed & (pos[None, :] <= pos[:, None])[None, None]
    # Always allow the diagonal so that a padding query has a key (its row is masked out later).
    allowed = allowed | (pos[None, :] == pos[:, None])[None, None]
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout)(weights, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, width)
    return queries + out


class SASRecBlock(nn.Module):
  """One SASRec block (see the module docstring). Attributes as in `SequenceEncoder`."""
  num_heads: int = 1
  dropout: float = 0.0
  causal: bool = True
  ffn_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    """x: [B, L, W]; mask: [B, L] bool → [B, L, W] (padding rows zeroed)."""
    width = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name=name)  # noqa: E731
    q = norm("ln_attn")(x)
    x = SASRecAttention(self.num_heads, self.dropout, self.causal, self.dtype, name="attn")(
        q, x, mask, train=train)
    x = norm("ln_ffn")(x)
    h = nn.Dense(self.ffn_dim or width, dtype=self.dtype, kernel_init=XAVIER, name="fc1")(x)
    h = nn.Dropout(self.dropout)(nn.relu(h), deterministic=not train)
    h = nn.Dense(width, dtype=self.dtype, kernel_init=XAVIER, name="fc2")(h)
    x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
    return x * mask[..., None].astype(x.dtype)


class SequenceEncoder(nn.Module):
  """SASRec's self-attentive sequence encoder over precomputed token vectors.

  Attributes:
    max_len: L, number of learned positions (sequences are left-padded to exactly L).
    num_blocks: stacked blocks (SASRec: 2).
    num_heads: attention heads (SASRec: 1).
    dropout: rate on the input, the attention weights and the feed-forward (SASRec: 0.2 / 0.5).
    causal: causal attention (next-item prediction); False for bidirectional (cloze) use.
    ffn_dim: feed-forward hidden width (None = the token width, as in SASRec).
    dtype: compute dtype.
  """
  max_len: int
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2
  causal: bool = True
  ffn_dim: int | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
    """Encodes a left-padded sequence.

    Args:
      tokens: [B, L, W] float token vectors (already scaled; padding rows may hold anything).
      mask: [B, L] bool, True at real positions.
      train: enables dropout (needs the "dropout" RNG).

    Returns:
      [B, L, W] float32; row t summarises positions <= t (causal) or all real positions.
    """
    check_array(tokens, where="SequenceEncoder", name="tokens", ndim=3, kind="float")
    b, length, width = tokens.shape
    if length != self.max_len:
      raise ValueError(f"SequenceEncoder: sequence length {length} != max_len {self.max_len} "
                       f"(config key data.max_len): pad sequences to exactly max_len")
    if mask.shape != (b, length):
      raise ValueError(f"SequenceEncoder: mask shape {tuple(mask.shape)} != [B, L] {(b, length)}")
    mask = mask.astype(bool)
    pos = self.param("pos_embedding", XAVIER, (self.max_len, width), jnp.float32)
    x = tokens.astype(self.dtype) + pos[None].astype(self.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = x * mask[..., None].astype(x.dtype)
    for i in range(self.num_blocks):
      x = SASRecBlock(self.num_heads, self.dropout, self.causal, self.ffn_dim, self.dtype,
                      name=f"block_{i}")(x, mask, train=train)
    return nn.LayerNorm(epsilon=_EPS, dtype=self.dtype, name="ln_final")(x).astype(jnp.float32)


def seq_encoder_flops(max_len: int, width: int, num_blocks: int, ffn_dim: int | None = None
                      ) -> float:
  """Forward FLOPs of `SequenceEncoder` for one sequence (matmuls only: 2·m·n·k each)."""
  f = ffn_dim or width
  per_block = 2 * max_len * width * width * 3 + 2 * 2 * max_len * max_len * width \
      + 2 * max_len * width * f * 2
  return float(num_blocks * per_block)
