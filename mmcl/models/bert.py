"""BERT-family text tower (Devlin et al. 2019), Flax Linen, laid out to load Hugging Face weights.

ids [B, L] (+ token types [B, L]) → word + absolute position + token-type embeddings → LayerNorm
→ `depth` post-LN blocks (x = LN(x + Attn(x)); x = LN(x + MLP(x))) → pool over the valid tokens
("mean" | "cls" | "max" | "mean_sqrt_len", as sentence-transformers' Pooling) → optional linear
projection → optional L2 normalisation → [B, D] float32.

This is the architecture of `BertModel` (`model_type: "bert"` in a Hugging Face config.json: BERT,
MiniLM, all-MiniLM-*, BGE, E5, GTE, ...), and with two attributes also of `DistilBertModel`
(`type_vocab_size=0`: no token types) and `RobertaModel` / `XLMRobertaModel` (`position_offset =
pad_token_id + 1`). `mmcl.pretrained.text` converts such a folder's weights
into this module's parameters. The self-attention is `mmcl.models.layers.MultiHeadSelfAttention`
(the same fused-qkv layout as the other towers, so the same sharding rules apply); HF's pooler
(dense + tanh on [CLS]) is not part of it: sentence embeddings do not use it.

Differences from the PyTorch model, none of which changes inference outputs: no dropout on the
attention probabilities (dropout acts on the embeddings and on both residual branches), and the
attention mask is a boolean key mask (HF adds the dtype's minimum to masked logits: the same
softmax).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcl.models import flops as flops_lib
from mmcl.models.layers import (
    KERNEL_INIT,
    MLP_ACTIVATIONS,
    Dtype,
    MultiHeadSelfAttention,
    Projection,
    check_array,
    check_choice,
    mlp_activation,
)
from mmcl.models.registry import register_model

POOLS = ("mean", "cls", "max", "mean_sqrt_len")
# BERT's initialiser: N(0, 0.02) for embeddings (initializer_range in HF configs).
EMBED_INIT = nn.initializers.normal(stddev=0.02)


def masked_pool(x: jax.Array, valid: jax.Array, pool: str) -> jax.Array:
  """Pools token features over the valid tokens (sentence-transformers' `Pooling` modes).

  Args:
    x: [B, L, W] token features.
    valid: [B, L] bool, True for real tokens (attention mask).
    pool: "mean" (mean of valid tokens), "cls" (position 0, the [CLS] token), "max" (elementwise
      max over valid tokens) or "mean_sqrt_len" (sum of valid tokens / sqrt(count)).

  Returns:
    [B, W] float32. A row without valid tokens gives zeros ("mean", "mean_sqrt_len") or a very
    negative vector ("max"), as in sentence-transformers.
  """
  x = x.astype(jnp.float32)
  if pool == "cls":
    return x[:, 0]
  weights = valid.astype(jnp.float32)[..., None]  # [B, L, 1]
  if pool == "max":
    # sentence-transformers fills padding with -1e9 before the max.
    return jnp.max(jnp.where(weights > 0, x, -1e9), axis=1)
  total = jnp.sum(x * weights, axis=1)
  # sentence-transformers clamps the count at 1e-9; every tokenised row has ≥ 2 tokens anyway.
  count = jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
  if pool == "mean":
    return total / count
  if pool == "mean_sqrt_len":
    return total / jnp.sqrt(count)
  raise ValueError(f"masked_pool: unknown pool {pool!r}; expected one of {POOLS}.")


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout.

  Attributes:
    vocab_size: number of token ids.
    width: embedding width W.
    max_position: size of the absolute position table (HF `max_position_embeddings`).
    type_vocab_size: number of token types (segments); 0 = no token-type table (DistilBERT).
    position_offset: the position id of the first token (RoBERTa / XLM-R: pad_token_id + 1).
    layer_norm_eps: LayerNorm epsilon (HF `layer_norm_eps`, 1e-12 for BERT).
    dropout: dropout rate on the output (train only).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  vocab_size: int
  width: int
  max_position: int
  type_vocab_size: int
  layer_norm_eps: float = 1e-12
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  position_offset: int = 0

  @nn.compact
  def __call__(self, ids: jax.Array, token_types: jax.Array, *, train: bool = False) -> jax.Array:
    """ids, token_types: [B, L] int → [B, L, W] in `dtype`."""
    length = ids.shape[1]
    embed = lambda n, name: nn.Embed(  # noqa: E731
        n, self.width, dtype=self.dtype, param_dtype=self.param_dtype, embedding_init=EMBED_INIT,
        name=name)
    x = embed(self.vocab_size, "word")(ids)
    # RoBERTa numbers the positions of real tokens from pad_token_id + 1; padding keys are masked,
    # so giving padding the following positions (instead of pad_token_id) changes no output.
    positions = self.position_offset + jnp.arange(length, dtype=jnp.int32)
    x = x + embed(self.max_position, "position")(positions)[None]
    if self.type_vocab_size:
      x = x + embed(self.type_vocab_size, "token_type")(token_types)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="ln")(x)
    return nn.Dropout(self.dropout)(x, deterministic=not train)


class BertBlock(nn.Module):
  """Post-LayerNorm Transformer block: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

  Attributes:
    num_heads: attention heads.
    mlp_dim: feed-forward hidden width (HF `intermediate_size`).
    activation: feed-forward activation, one of `mmcl.models.layers.MLP_ACTIVATIONS`.
    layer_norm_eps: LayerNorm epsilon.
    dropout: dropout rate on both residual branches (train only).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    attention_implementation: see `MultiHeadSelfAttention.implementation`.
  """
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str | None = None

  # Positional arguments so that `nn.remat(..., static_argnums=(3,))` can mark `train` static.
  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array, train: bool) -> jax.Array:
    """x: [B, L, W], key_mask: [B, L] bool → [B, L, W] in `dtype`."""
    width = x.shape[-1]
    norm = lambda name: nn.LayerNorm(  # noqa: E731
        epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=KERNEL_INIT, name=name)
    h = MultiHeadSelfAttention(
        self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        implementation=self.attention_implementation, name="attn")(x, key_mask)
    x = norm("ln_attn")(x + nn.Dropout(self.dropout)(h, deterministic=not train))
    h = mlp_activation(self.activation)(dense(self.mlp_dim, "fc1")(x))
    h = dense(width, "fc2")(h)
    return norm("ln_mlp")(x + nn.Dropout(self.dropout)(h, deterministic=not train))


@register_model("bert")
class BertTower(nn.Module):
  """BERT-family text encoder over WordPiece ids, pooled to one vector per text.

  Parameter tree: `embeddings/{word,position,token_type,ln}`, `encoder/block_{i}/{attn/{qkv,out},
  ln_attn,fc1,fc2,ln_mlp}` and, when `embed_dim` is set, `head/proj`. Blocks are named like the
  other towers' (`block_{i}`), so `mmcl.models.lock` unlocks the top N of any of them alike.

  Attributes:
    vocab_size: number of token ids (HF `vocab_size`).
    max_position: longest sequence accepted (HF `max_position_embeddings`).
    type_vocab_size: token types (HF `type_vocab_size`); 0 = none (DistilBERT).
    position_offset: position id of the first token: 0 for BERT / DistilBERT, pad_id + 1 for
      RoBERTa / XLM-R (HF `create_position_ids_from_input_ids`).
    width: hidden width W (HF `hidden_size`).
    depth: number of blocks (HF `num_hidden_layers`).
    num_heads: attention heads (HF `num_attention_heads`).
    mlp_dim: feed-forward width (HF `intermediate_size`).
    activation: feed-forward activation; HF "gelu" is "gelu", "gelu_new" is "gelu_tanh".
    layer_norm_eps: LayerNorm epsilon (HF `layer_norm_eps`).
    pad_id: padding id; `ids != pad_id` is the attention mask when none is given.
    pool: how token features become one vector, see `masked_pool`.
    embed_dim: if set, a linear projection (no bias) to this width after pooling, e.g. a new head
      for contrastive fine-tuning; None keeps the pooled width W.
    normalize: L2-normalise the output (sentence-transformers' Normalize module).
    dropout: dropout rate on the embeddings and both residual branches (train only).
    dtype: compute dtype, e.g. jnp.bfloat16; parameters stay `param_dtype`.
    param_dtype: parameter dtype.
    remat: rematerialise each block in the backward pass.
    attention_implementation: None (XLA) or "cudnn" (flash attention on GPU).
  """
  vocab_size: int = 30522
  max_position: int = 512
  type_vocab_size: int = 2
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  activation: str = "gelu"
  layer_norm_eps: float = 1e-12
  pad_id: int = 0
  pool: str = "mean"
  embed_dim: int | None = None
  normalize: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_implementation: str | None = None
  position_offset: int = 0

  def setup(self):
    self.embeddings = BertEmbeddings(
        self.vocab_size, self.width, self.max_position, self.type_vocab_size,
        self.layer_norm_eps, self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
        position_offset=self.position_offset)
    block_cls = nn.remat(BertBlock, static_argnums=(3,)) if self.remat else BertBlock
    self.encoder = _BertEncoder(
        block_cls=block_cls, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        activation=self.activation, layer_norm_eps=self.layer_norm_eps, dropout=self.dropout,
        dtype=self.dtype, param_dtype=self.param_dtype,
        attention_implementation=self.attention_implementation)
    if self.embed_dim is not None:
      self.head = Projection(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype)

  def _check(self, ids: jax.Array) -> None:
    check_array(ids, where="BertTower", name="ids", ndim=2, kind="int")
    check_choice(self.pool, POOLS, where="BertTower", name="pool")
    check_choice(self.activation, MLP_ACTIVATIONS, where="BertTower", name="activation")
    if ids.shape[1] + self.position_offset > self.max_position:
      raise ValueError(
          f"BertTower: ids have length {ids.shape[1]}, longer than max_position="
          f"{self.max_position} - position_offset={self.position_offset}; truncate when "
          "tokenising.")

  def token_features(self, ids: jax.Array, *, mask: jax.Array | None = None,
                     token_types: jax.Array | None = None, train: bool = False) -> jax.Array:
    """Per-token features of the last block (HF `last_hidden_state`).

    Args:
      ids: [B, L] int token ids, L ≤ max_position.
      mask: optional [B, L] bool, True for real tokens; default `ids != pad_id`.
      token_types: optional [B, L] int segment ids; default zeros.
      train: enables dropout (needs the "dropout" RNG).

    Returns:
      [B, L, W] in `dtype`.
    """
    self._check(ids)
    valid = ids != self.pad_id if mask is None else mask.astype(bool)
    if valid.shape != ids.shape:
      raise ValueError(f"BertTower: mask shape {tuple(valid.shape)} differs from ids shape "
                       f"{tuple(ids.shape)}.")
    if token_types is None:
      token_types = jnp.zeros_like(ids)
    elif token_types.shape != ids.shape:
      raise ValueError(f"BertTower: token_types shape {tuple(token_types.shape)} differs from ids "
                       f"shape {tuple(ids.shape)}.")
    x = self.embeddings(ids, token_types, train=train)
    return self.encoder(x, valid, train)

  def __call__(self, ids: jax.Array, *, mask: jax.Array | None = None,
               token_types: jax.Array | None = None, train: bool = False) -> jax.Array:
    """Embeds a batch of right-padded WordPiece id sequences ([CLS] ... [SEP] then padding).

    Args:
      ids: [B, L] int token ids, L ≤ max_position.
      mask: optional [B, L] bool, True for real tokens; default `ids != pad_id`.
      token_types: optional [B, L] int segment ids; default zeros.
      train: enables dropout (needs the "dropout" RNG).

    Returns:
      [B, D] float32 with D = embed_dim or width; unit norm when `normalize`.
    """
    valid = ids != self.pad_id if mask is None else mask.astype(bool)
    x = self.token_features(ids, mask=valid, token_types=token_types, train=train)
    pooled = masked_pool(x, valid, self.pool)
    if self.embed_dim is not None:
      pooled = self.head(pooled.astype(self.dtype))
    if self.normalize:
      # As torch.nn.functional.normalize (sentence-transformers' Normalize): x / max(‖x‖, 1e-12).
      norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
      pooled = pooled / jnp.maximum(norm, 1e-12)
    return pooled.astype(jnp.float32)


class _BertEncoder(nn.Module):
  """The stack of `depth` BertBlocks (no final LayerNorm: each block ends with one)."""
  block_cls: type[nn.Module]
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str
  layer_norm_eps: float
  dropout: float
  dtype: Dtype
  param_dtype: Dtype
  attention_implementation: str | None

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array, train: bool) -> jax.Array:
    """x: [B, L, W], valid: [B, L] bool → [B, L, W]."""
    for i in range(self.depth):
      x = self.block_cls(
          self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps, self.dropout,
          dtype=self.dtype, param_dtype=self.param_dtype,
          attention_implementation=self.attention_implementation, name=f"block_{i}")(
              x, valid, train)
    return x


def bert_flops(model: BertTower, seq_len: int) -> int:
  """Forward FLOPs of `model` for one sequence of `seq_len` ids (see `mmcl.models.flops`)."""
  out = model.embed_dim or 0
  return (flops_lib.encoder_flops(seq_len, model.width, model.depth, model.mlp_dim)
          + flops_lib.dense_flops(1, model.width, out))
