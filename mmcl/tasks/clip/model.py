"""CLIP's towers: a ViT and a Transformer text encoder, each followed by L2 normalisation."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from mmcl.models.layers import l2_normalize


@dataclasses.dataclass(frozen=True)
class ClipTowers:
  """The image tower (`mmcl.models.vit`, normalising uint8 pixels itself) and the text tower
  (`mmcl.models.text_transformer`)."""
  image_tower: Any
  text_tower: Any

  def init(self, rng: jax.Array, image_shape: tuple[int, int, int], max_text_len: int,
           init_temperature: float) -> dict[str, Any]:
    k_img, k_txt = jax.random.split(rng)
    images = jnp.zeros((1, *image_shape), jnp.float32)
    texts = jnp.ones((1, max_text_len), jnp.int32)
    return {
        "image": self.image_tower.init(k_img, images, train=False)["params"],
        "text": self.text_tower.init(k_txt, texts, train=False)["params"],
        "log_logit_scale": jnp.asarray(math.log(1.0 / init_temperature), jnp.float32),
    }

  def embed_images(self, params, images: jax.Array, *, train: bool = False,
                   rng: jax.Array | None = None) -> jax.Array:
    """images: [B, H, W, C] uint8 pixels (or float32, already normalised) → [B, D] unit-norm
    float32."""
    rngs = {"dropout": rng} if train else None
    return l2_normalize(self.image_tower.apply({"params": params["image"]}, images, train=train,
                                                rngs=rngs))

  def embed_texts(self, params, texts: jax.Array, *, train: bool = False,
                  rng: jax.Array | None = None) -> jax.Array:
    """texts: [B, L] int32 → [B, D] unit-norm float32."""
    rngs = {"dropout": rng} if train else None
    return l2_normalize(self.text_tower.apply({"params": params["text"]}, texts, train=train,
                                               rngs=rngs))

  def embed(self, params, batch, rng: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """{"image": [B, D], "text": [B, D]} unit-norm embeddings of the batch."""
    k_img, k_txt = jax.random.split(rng)
    return {"image": self.embed_images(params, batch["image"], train=train, rng=k_img),
            "text": self.embed_texts(params, batch["text"], train=train, rng=k_txt)}
