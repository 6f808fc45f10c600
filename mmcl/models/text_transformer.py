"""Transformer text tower (CLIP style, Radford et al. 2021).

ids [B, L] → token embedding + learned position embedding → pre-LN Transformer encoder (padding keys
masked out, optionally causal) → final LayerNorm → pool → linear projection → [B, D].

Padding (id 0) is never attended to and never pooled, so the output does not depend on how much
padding follows the text: `f(ids) == f(concat(ids, zeros))` up to float rounding. This holds for
right padding and for rows with at least one non-pad token.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcl.models.layers import (
    Dtype,
    PositionEmbedding,
    Projection,
    TransformerEncoder,
    check_array,
    check_choice,
)
from mmcl.models.registry import register_model

PAD_ID = 0
POOLS = ("eos", "mean", "first")


def pool_tokens(x: jax.Array, valid: jax.Array, pool: str) -> jax.Array:
  """Pools token features into one vector per row, ignoring padding.

  Args:
    x: [B, L, W] token features.
    valid: [B, L] bool, True for real tokens.
    pool: "eos" (the last valid token of each row, CLIP's end-of-text position for right-padded
      ids), "mean" (mean over valid tokens) or "first" (position 0, e.g. a BOS/CLS token).

  Returns:
    [B, W] in x.dtype. A row with no valid token pools position 0 ("eos") or zeros ("mean").
  """
  if pool == "first":
    return x[:, 0]
  if pool == "eos":
    positions = jnp.arange(x.shape[1], dtype=jnp.int32)
    last = jnp.max(jnp.where(valid, positions[None, :], 0), axis=1)  # [B]
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
  if pool == "mean":
    weights = valid.astype(jnp.float32)[..., None]  # [B, L, 1]
    total = jnp.sum(x.astype(jnp.float32) * weights, axis=1)
    count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return (total / count).astype(x.dtype)
  raise ValueError(f"pool_tokens: unknown pool {pool!r}; expected one of {POOLS}.")


@register_model("text_transformer")
class TextTransformer(nn.Module):
  """Text encoder over token ids (pad id 0).

  Attributes:
    vocab_size: number of token ids.
    max_len: longest sequence accepted (size of the position table).
    width: token width W.
    depth: number of encoder blocks.
    num_heads: attention heads.
    mlp_dim: feed-forward hidden width.
    embed_dim: output embedding width D.
    dropout: dropout rate after the embeddings and in the blocks (train only).
    pool: "eos" | "mean" | "first", see `pool_tokens`.
    causal: causal self-attention (CLIP's text tower); with pool="eos" the pooled token then sees
      the whole text.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    remat: rematerialise each encoder block in the backward pass.
    attention_implementation: None (XLA) or "cudnn" (flash attention on GPU).
  """
  vocab_size: int = 49408
  max_len: int = 77
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_dim: int = 2048
  embed_dim: int = 512
  dropout: float = 0.0
  pool: str = "eos"
  causal: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_implementation: str | None = None

  @nn.compact
  def __call__(self, ids: jax.Array, *, train: bool = False) -> jax.Array:
    """Embeds a batch of right-padded token id sequences.

    Args:
      ids: [B, L] int, L ≤ max_len, 0 = padding.
      train: enables dropout (needs the "dropout" RNG).

    Returns:
      [B, embed_dim] float32, not normalised.
    """
    check_array(ids, where="TextTransformer", name="ids", ndim=2, kind="int")
    check_choice(self.pool, POOLS, where="TextTransformer", name="pool")
    if ids.shape[1] > self.max_len:
      raise ValueError(
          f"TextTransformer: ids have length {ids.shape[1]}, longer than max_len={self.max_len}.")
    valid = ids != PAD_ID
    x = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.initializers.normal(stddev=0.02), name="token_embed")(ids)
    x = PositionEmbedding(self.max_len, param_dtype=self.param_dtype, name="pos_embed")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = TransformerEncoder(
        self.depth, self.num_heads, self.mlp_dim, self.dropout, dtype=self.dtype,
        param_dtype=self.param_dtype, remat=self.remat,
        attention_implementation=self.attention_implementation, name="encoder",
    )(x, key_mask=valid, causal=self.causal, train=train)
    pooled = pool_tokens(x, valid, self.pool)
    return Projection(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="head")(pooled)
