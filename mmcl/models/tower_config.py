"""Config keys of the trained towers, declared once, and the towers built from them.

A task that trains a ViT and/or a Transformer text tower declares their keys with
`declare_vit(section, **defaults)` / `declare_text_transformer(section, **defaults)` and builds them
with `vit_from_config` / `text_transformer_from_config`, so every recipe spells and documents the
same knobs the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from mmcl.config import Config
from mmcl.models.registry import get_model
from mmcl.models.text_transformer import TextTransformer
from mmcl.models.vit import ViT


def declare_vit(s: Config, *, patch_size: int = 4, width: int = 128, depth: int = 3,
                num_heads: int = 4, mlp_dim: int = 256, pool: str = "gap",
                dropout: float = 0.0) -> None:
  """Declares the ViT keys on section `s` with the given defaults."""
  s.define("patch_size", patch_size, "patch side in pixels")
  s.define("width", width, "token width")
  s.define("depth", depth, "Transformer blocks")
  s.define("num_heads", num_heads, "attention heads")
  s.define("mlp_dim", mlp_dim, "hidden units of each block's MLP")
  s.define("pool", pool, "how patch tokens become one vector", choices=("gap", "cls"))
  s.define("dropout", dropout, "dropout rate")


def declare_text_transformer(s: Config, *, width: int = 128, depth: int = 3, num_heads: int = 4,
                             mlp_dim: int = 256, causal: bool = False, pool: str = "eos",
                             dropout: float = 0.0) -> None:
  """Declares the Transformer text tower keys on section `s` with the given defaults."""
  s.define("width", width, "token width")
  s.define("depth", depth, "Transformer blocks")
  s.define("num_heads", num_heads, "attention heads")
  s.define("mlp_dim", mlp_dim, "hidden units of each block's MLP")
  s.define("causal", causal, "causal self-attention (CLIP) instead of bidirectional")
  s.define("pool", pool, "how tokens become one vector", choices=("eos", "mean", "first"))
  s.define("dropout", dropout, "dropout rate")


def compute_dtype(config: Config) -> Any:
  """The towers' activation dtype from `train.compute_dtype`."""
  return jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32


def vit_from_config(s: Config, *, embed_dim: int, dtype: Any,
                    pixel_mean: Sequence[float] | None = None,
                    pixel_std: Sequence[float] | None = None) -> ViT:
  """The registry's "vit" with the keys of `s`; `pixel_mean`/`pixel_std` (the dataset's image
  normalisation) let it take uint8 batches and normalise them on the device."""
  return get_model("vit", patch_size=s.patch_size, width=s.width, depth=s.depth, num_heads=s.num_heads,
             mlp_dim=s.mlp_dim, embed_dim=embed_dim, dropout=s.dropout, pool=s.pool, dtype=dtype,
             pixel_mean=None if pixel_mean is None else tuple(float(m) for m in pixel_mean),
             pixel_std=None if pixel_std is None else tuple(float(x) for x in pixel_std))


def text_transformer_from_config(s: Config, *, vocab_size: int, max_len: int, embed_dim: int,
                                 dtype: Any) -> TextTransformer:
  """The registry's "text_transformer" with the keys of `s`."""
  return get_model("text_transformer", vocab_size=vocab_size, max_len=max_len, width=s.width, depth=s.depth,
                         num_heads=s.num_heads, mlp_dim=s.mlp_dim, embed_dim=embed_dim,
                         causal=s.causal, pool=s.pool, dropout=s.dropout, dtype=dtype)
