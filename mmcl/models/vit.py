"""Vision Transformer image tower (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

images [B, H, W, C] → patches (Conv, stride = patch) → + learned position embedding (and a CLS token
when pool="cls") → [LayerNorm when pre_norm, as in CLIP] → pre-LN Transformer encoder → final
LayerNorm → pool → linear projection → [B, D].
The output is not normalised: the task L2-normalises it where the loss needs it.
Pretrained open_clip / timm weights load into this module with `mmcl.pretrained.vit`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcl.models.layers import (
    KERNEL_INIT,
    Dtype,
    PositionEmbedding,
    Projection,
    TransformerEncoder,
    check_array,
    check_choice,
    normalize_pixels,
)
from mmcl.models.registry import register_model

POOLS = ("cls", "gap")


def num_patches(image_hw: tuple[int, int], patch_size: int) -> int:
  """Number of patch tokens for an image of size `image_hw` (raises if it does not tile)."""
  h, w = image_hw
  if h % patch_size or w % patch_size:
    raise ValueError(
        f"ViT: image size {h}x{w} is not divisible by patch_size={patch_size}.")
  return (h // patch_size) * (w // patch_size)


@register_model("vit")
class ViT(nn.Module):
  """ViT image encoder.

  Attributes:
    patch_size: side of the square patches (and the stride of the patch Conv).
    width: token width W.
    depth: number of encoder blocks.
    num_heads: attention heads.
    mlp_dim: feed-forward hidden width.
    embed_dim: output embedding width D.
    dropout: dropout rate after the position embedding and in the blocks (train only).
    pool: "cls" (a learned CLS token prepended; its output is the image representation) or "gap"
      (mean over patch tokens).
    dtype: compute dtype, e.g. jnp.bfloat16.
    param_dtype: parameter dtype.
    remat: rematerialise each encoder block in the backward pass.
    attention_implementation: None (XLA) or "cudnn" (flash attention on GPU).
    pre_norm: a LayerNorm ("ln_pre") on the tokens before the encoder, as in CLIP / open_clip.
    layer_norm_eps: epsilon of every LayerNorm (open_clip checkpoints use 1e-5, timm 1e-6).
    activation: feed-forward activation (`mmcl.models.layers.MLP_ACTIVATIONS`); "quick_gelu" for
      OpenAI CLIP weights.
    pixel_mean, pixel_std: per-channel normalisation of uint8 inputs (`layers.normalize_pixels`),
      applied first thing inside the tower, so input pipelines can ship uint8 batches (a quarter of
      float32's bytes) and every caller — train step, evaluator, exported tower — normalises the
      same way on the device. None: the tower accepts only float (already normalised) images.
  """
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  embed_dim: int = 512
  dropout: float = 0.0
  pool: str = "cls"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  attention_implementation: str | None = None
  pre_norm: bool = False
  layer_norm_eps: float = 1e-6
  activation: str = "gelu"
  pixel_mean: tuple[float, ...] | None = None
  pixel_std: tuple[float, ...] | None = None

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Embeds a batch of images.

    Args:
      images: [B, H, W, C] float (normalised), or uint8 pixels when `pixel_mean`/`pixel_std` are
        set; H and W multiples of `patch_size`.
      train: enables dropout (needs the "dropout" RNG).

    Returns:
      [B, embed_dim] float32, not normalised.
    """
    if images.dtype == jnp.uint8:
      if self.pixel_mean is None or self.pixel_std is None:
        raise TypeError("ViT: got uint8 images but no pixel_mean/pixel_std to normalise them "
                        "with; pass normalised float images or set both attributes")
      check_array(images, where="ViT", name="images", ndim=4, kind="int")
      images = normalize_pixels(images, self.pixel_mean, self.pixel_std)
    check_array(images, where="ViT", name="images", ndim=4, kind="float")
    check_choice(self.pool, POOLS, where="ViT", name="pool")
    batch = images.shape[0]
    n = num_patches(images.shape[1:3], self.patch_size)
    x = nn.Conv(
        self.width, (self.patch_size, self.patch_size), strides=(self.patch_size,) * 2,
        padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=KERNEL_INIT,
        name="patch_embed")(images)
    x = x.reshape(batch, n, self.width)
    if self.pool == "cls":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.width)), x], 1)
    # The table size follows the token count at init: a model is tied to its image size.
    x = PositionEmbedding(x.shape[1], param_dtype=self.param_dtype, name="pos_embed")(x)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="ln_pre")(x)
    x = TransformerEncoder(
        self.depth, self.num_heads, self.mlp_dim, self.dropout, dtype=self.dtype,
        param_dtype=self.param_dtype, remat=self.remat,
        attention_implementation=self.attention_implementation,
        layer_norm_eps=self.layer_norm_eps, activation=self.activation,
        name="encoder")(x, train=train)
    pooled = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
    return Projection(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="head")(pooled)
