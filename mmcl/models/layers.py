"""Building blocks shared by the towers: pre-LayerNorm Transformer encoder and its parts.

Every module here is Flax Linen and pure: parameters come from `init`, dropout randomness from the
`"dropout"` RNG stream passed to `apply(..., rngs={"dropout": key})` when `train=True`.

Dtype convention: `dtype` is the compute dtype (activations, matmul inputs), `param_dtype` the
storage dtype of parameters (float32, so optimizer updates keep full precision). LayerNorm
statistics and the attention softmax are always computed in float32 (Flax LayerNorm and
`jax.nn.dot_product_attention` upcast internally), so bfloat16 compute stays stable.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Initialisers follow ViT / big_vision: Xavier-uniform kernels, zero biases, small normal position
# embeddings (std 0.02, as in ViT and CLIP).
KERNEL_INIT = nn.initializers.xavier_uniform()
POSEMB_INIT = nn.initializers.normal(stddev=0.02)


def normalize_pixels(pixels: jax.Array, mean, std) -> jax.Array:
  """uint8 pixels → float32 model input, (pixel / 255 − mean[c]) / std[c] per channel.

  Computed as float32(pixel) · scale[c] − shift[c] with scale = float32(1 / (255 · std)) and
  shift = float32(mean / std): the arithmetic of the host pipelines' former float32 batches
  (`data_pipelines.image_ops.normalize`), so the model sees the same values within float32
  rounding (one rounding step where XLA fuses the multiply-add).

  Args:
    pixels: [..., C] uint8.
    mean, std: C floats each.

  Returns:
    [..., C] float32.
  """
  if pixels.dtype != jnp.uint8 or pixels.shape[-1] != len(mean) or len(mean) != len(std):
    raise ValueError(f"normalize_pixels: expected uint8 [..., {len(mean)}] pixels and as many "
                     f"std values, got {pixels.dtype} {tuple(pixels.shape)} and {len(std)}")
  scale = jnp.asarray([1.0 / (255.0 * s) for s in std], jnp.float32)
  shift = jnp.asarray([m / s for m, s in zip(mean, std)], jnp.float32)
  return pixels.astype(jnp.float32) * scale - shift


def l2_normalize(x: jax.Array) -> jax.Array:
  """x: [..., D] → rows of unit L2 norm, float32 (ε = 1e-12 under the root: a zero row stays 0)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def check_array(x: jax.Array, *, where: str, name: str, ndim: int, kind: str) -> None:
  """Raises a clear error when `x` does not have `ndim` dims or the dtype kind `kind`.

  Args:
    x: any array.
    where: the module or function doing the check, for the message.
    name: the argument name, for the message.
    ndim: expected number of dimensions.
    kind: "float" (any inexact dtype) or "int" (any integer dtype).
  """
  if x.ndim != ndim:
    raise ValueError(
        f"{where}: expected `{name}` with {ndim} dims, found shape {tuple(x.shape)}.")
  if kind == "float":
    ok = jnp.issubdtype(x.dtype, jnp.floating)
  elif kind == "int":
    ok = jnp.issubdtype(x.dtype, jnp.integer)
  else:
    raise ValueError(f"check_array: unknown kind {kind!r}; expected 'float' or 'int'.")
  if not ok:
    raise TypeError(f"{where}: expected `{name}` of a {kind} dtype, found {x.dtype}.")


# Feed-forward activations (Transformer MLP blocks and the `mmcl.models.mlp.MLP` projector).
# "quick_gelu" is x·σ(1.702x), the GELU approximation of OpenAI's CLIP weights (open_clip's
# `-quickgelu` models); loading those weights needs it to reproduce them.
MLP_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "tanh", "identity")


def mlp_activation(name: str, *, where: str = "MlpBlock") -> Callable[[jax.Array], jax.Array]:
  """The activation called `name` (one of MLP_ACTIVATIONS); `where` names the caller in errors."""
  check_choice(name, MLP_ACTIVATIONS, where=where, name="activation")
  return {
      "gelu": lambda x: nn.gelu(x, approximate=False),
      "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
      "relu": nn.relu,
      "silu": nn.silu,
      "tanh": jnp.tanh,
      "identity": lambda x: x,
  }[name]


def check_choice(value: str, choices: tuple[str, ...], *, where: str, name: str) -> None:
  """Raises a ValueError naming the attribute when `value` is not one of `choices`."""
  if value not in choices:
    raise ValueError(f"{where}: `{name}` must be one of {choices}, found {value!r}.")


class PositionEmbedding(nn.Module):
  """Adds a learned position embedding to a token sequence.

  Attributes:
    max_len: number of positions stored; shorter inputs use the first positions, so appending
      tokens at the end never changes the embedding of the earlier ones.
    param_dtype: storage dtype of the table.
  """
  max_len: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, W] → [B, L, W] in x.dtype, with L ≤ max_len."""
    length, width = x.shape[-2], x.shape[-1]
    if length > self.max_len:
      raise ValueError(
          f"PositionEmbedding: sequence length {length} exceeds max_len={self.max_len}.")
    table = self.param("pos_embedding", POSEMB_INIT, (self.max_len, width), self.param_dtype)
    return x + table[:length].astype(x.dtype)


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense(mlp_dim) → GELU → Dropout → Dense(width) → Dropout.

  Attributes:
    mlp_dim: hidden width.
    dropout: dropout rate on the hidden activations and on the output.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    activation: one of MLP_ACTIVATIONS; exact (erf) GELU by default.
  """
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: [..., W] → [..., W] in `dtype`."""
    width = x.shape[-1]
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=KERNEL_INIT,
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    h = dense(self.mlp_dim, "fc1")(x)
    # Exact (erf) GELU by default, as in ViT and BERT; the tanh approximation differs by <1e-3.
    h = mlp_activation(self.activation)(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = dense(width, "fc2")(h)
    return nn.Dropout(self.dropout)(h, deterministic=not train)


class MultiHeadSelfAttention(nn.Module):
  """Multi-head self-attention with optional key-padding and causal masks.

  The attention itself is `jax.nn.dot_product_attention` (float32 logits and softmax; on GPU
  `implementation="cudnn"` selects flash attention for supported shapes).

  Attributes:
    num_heads: number of heads; the input width must be divisible by it.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    implementation: passed to `jax.nn.dot_product_attention` (None → XLA).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  implementation: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None,
               causal: bool = False) -> jax.Array:
    """Self-attention over the token axis.

    Args:
      x: [B, L, W] activations.
      key_mask: optional [B, L] bool, True where a token may be attended to (not padding). Queries
        at padded positions still get an output (attending to the valid keys); callers ignore it.
      causal: if True, position t attends only to positions ≤ t.

    Returns:
      [B, L, W] in `dtype`.
    """
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(
          f"MultiHeadSelfAttention: width {width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral(
        (3, self.num_heads, head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=KERNEL_INIT, name="qkv")(x)  # [B, L, 3, H, Dh]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    mask = None
    if key_mask is not None:
      if key_mask.shape != x.shape[:2]:
        raise ValueError(
            f"MultiHeadSelfAttention: key_mask shape {tuple(key_mask.shape)} does not match the "
            f"[B, L] of x {tuple(x.shape[:2])}.")
      mask = key_mask.astype(bool)[:, None, None, :]  # [B, 1(heads), 1(queries), L(keys)]
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, implementation=self.implementation)
    return nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=KERNEL_INIT, name="out")(out)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  Attributes:
    num_heads: attention heads.
    mlp_dim: feed-forward hidden width.
    dropout: dropout rate on both residual branches.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    attention_implementation: see `MultiHeadSelfAttention.implementation`.
    layer_norm_eps: LayerNorm epsilon (Flax's 1e-6 by default; open_clip checkpoints use 1e-5).
    activation: feed-forward activation, one of MLP_ACTIVATIONS.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_implementation: str | None = None
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"

  # Arguments are positional so that `nn.remat(..., static_argnums=(3, 4))` can mark `causal` and
  # `train` static (index 0 is the module itself).
  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None, causal: bool,
               train: bool) -> jax.Array:
    """x: [B, L, W], key_mask: [B, L] bool or None → [B, L, W] in `dtype`."""
    norm = lambda name: nn.LayerNorm(  # noqa: E731
        epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    h = norm("ln_attn")(x)
    h = MultiHeadSelfAttention(
        self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        implementation=self.attention_implementation, name="attn")(h, key_mask, causal)
    x = x + nn.Dropout(self.dropout)(h, deterministic=not train)
    h = norm("ln_mlp")(x)
    h = MlpBlock(self.mlp_dim, self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
                 activation=self.activation, name="mlp")(h, train=train)
    return x + h


class TransformerEncoder(nn.Module):
  """A stack of `depth` pre-LN encoder blocks followed by a final LayerNorm.

  Attributes:
    depth: number of blocks.
    num_heads: attention heads per block.
    mlp_dim: feed-forward hidden width.
    dropout: residual-branch dropout rate (active only with `train=True`).
    dtype: compute dtype.
    param_dtype: parameter dtype.
    remat: rematerialise each block in the backward pass (trades ~1/3 more compute for activation
      memory that no longer grows with depth).
    attention_implementation: see `MultiHeadSelfAttention.implementation`.
    layer_norm_eps: epsilon of every LayerNorm (blocks and final).
    activation: feed-forward activation, one of MLP_ACTIVATIONS.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_implementation: str | None = None
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array, *, key_mask: jax.Array | None = None, causal: bool = False,
               train: bool = False) -> jax.Array:
    """Encodes a token sequence.

    Args:
      x: [B, L, W] float token embeddings.
      key_mask: optional [B, L] bool, True for real tokens, False for padding (never attended to).
      causal: if True, the output at position t depends only on inputs at positions ≤ t.
      train: enables dropout (needs the "dropout" RNG).

    Returns:
      [B, L, W] in `dtype`, layer-normalised.
    """
    check_array(x, where="TransformerEncoder", name="x", ndim=3, kind="float")
    block_cls = EncoderBlock
    if self.remat:
      block_cls = nn.remat(EncoderBlock, static_argnums=(3, 4))
    x = x.astype(self.dtype)
    for i in range(self.depth):
      x = block_cls(
          self.num_heads, self.mlp_dim, self.dropout, dtype=self.dtype,
          param_dtype=self.param_dtype, attention_implementation=self.attention_implementation,
          layer_norm_eps=self.layer_norm_eps, activation=self.activation,
          name=f"block_{i}")(x, key_mask, causal, train)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="ln_final")(x)


class Projection(nn.Module):
  """Final linear map of a tower to the shared embedding space, returned in float32.

  No bias (as in CLIP): the embedding is L2-normalised downstream, where a bias would only shift
  every embedding alike. Output is float32 whatever the compute dtype, because the contrastive loss
  (normalisation, logits, logsumexp) must run in float32.

  Attributes:
    embed_dim: output width D.
    dtype: compute dtype of the matmul.
    param_dtype: parameter dtype.
  """
  embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, W] → [B, embed_dim] float32."""
    y = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=KERNEL_INIT, name="proj")(x)
    return y.astype(jnp.float32)
