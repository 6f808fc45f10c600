"""MMSRec's model: one fusion encoder (`mmcl.models.fusion.FusionEncoder`) over the items' frozen
content features encodes sequences and, as length-1 sequences, items (ID-free)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.models.layers import l2_normalize


@dataclasses.dataclass(frozen=True)
class MMSRecNet:
  """The fusion encoder bound to the item features (M arrays [N + 1, D_m], row 0 = padding)."""
  encoder: Any
  features: tuple[np.ndarray, ...]

  @property
  def num_items(self) -> int:
    return self.features[0].shape[0] - 1

  def init(self, rng: jax.Array, max_len: int):
    feats = tuple(jnp.zeros((1, max_len, f.shape[1])) for f in self.features)
    avail = jnp.ones((1, max_len, len(feats)), bool)
    return self.encoder.init(rng, feats, avail, jnp.zeros((1, max_len), bool))["params"]

  def encode_sequences(self, params, items, masked=None, *, modality_on=None, train=False,
                       rng=None) -> jax.Array:
    """items: [B, L] int (0 = padding); masked: [B, L] bool or None; modality_on: M bools (None:
    all) → [B, L, d]."""
    on = jnp.asarray(modality_on if modality_on is not None else (True,) * len(self.features))
    available = (items != 0)[..., None] & on  # [B, L, M]: real position, modality switched on
    return self.encoder.apply({"params": params},
                              tuple(jnp.asarray(f)[items] for f in self.features), available,
                              masked, train=train, rngs={"dropout": rng} if train else None)

  def item_tower(self, params, items: jax.Array | None = None, *, train=False, rng=None
                 ) -> jax.Array:
    """[K] item indices (default all 0..N) → [K, d] unit-norm embeddings (row of item 0 unused)."""
    if items is None:
      items = jnp.arange(self.num_items + 1)
    h = self.encode_sequences(params, jnp.maximum(items, 1)[:, None], None, train=train, rng=rng)
    return l2_normalize(h[:, 0])

  def item_from_features(self, params, x: jax.Array) -> jax.Array:
    """x: [B, Σ D_m] an item's modality vectors concatenated → [B, d] unit-norm embedding (the
    item tower on a length-1 sequence of these features, all modalities on)."""
    dims = [int(f.shape[1]) for f in self.features]
    feats = tuple(f[:, None] for f in jnp.split(x, np.cumsum(dims)[:-1].tolist(), axis=1))
    avail = jnp.ones((x.shape[0], 1, len(dims)), bool)
    return l2_normalize(self.encoder.apply({"params": params}, feats, avail, None,
                                           train=False)[:, 0])

  def query(self, params, history: jax.Array) -> jax.Array:
    """history: [B, L] left-padded → [B, d]: the output at an appended [MASK] slot."""
    seq = jnp.concatenate([history[:, 1:], jnp.ones_like(history[:, :1])], axis=1)
    masked = jnp.zeros(seq.shape, bool).at[:, -1].set(True)
    return l2_normalize(self.encode_sequences(params, seq, masked)[:, -1])
