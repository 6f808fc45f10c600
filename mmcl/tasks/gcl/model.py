"""GCL's towers: the query tower, the document's field towers (a pretrained text tower loaded and
locked, or trained from scratch) and the multi-field document embedding, per-field embeddings
fused with weights, missing fields left out."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mmcl.config import ConfigError
from mmcl.models import layers
from mmcl.models import lock as lock_lib
from mmcl.models.layers import l2_normalize
from mmcl.pretrained import text as pretrained_lib


def fuse_fields(embeddings: jax.Array, present: jax.Array, weights: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Multi-field fusion with missing fields (GCL, arXiv:2404.08535).

  Args:
    embeddings: [F, B, D] float, one embedding per field and row (normalised here).
    present: [F, B] bool, field f of row b exists.
    weights: [F] float ≥ 0, per-field weights.

  Returns:
    fused: [B, D] float32, normalise(Σ_f w_f m_f ê_f / Σ_f w_f m_f); zero rows where no field with
      positive weight is present.
    valid: [B] bool, rows with at least one present field of positive weight.
  """
  if embeddings.ndim != 3 or present.shape != embeddings.shape[:2] or weights.shape != (
      embeddings.shape[0],):
    raise ValueError(f"fuse_fields: expected embeddings [F, B, D], present [F, B], weights [F]; "
                     f"got {embeddings.shape}, {present.shape}, {weights.shape}")
  w = weights.astype(jnp.float32)[:, None] * present.astype(jnp.float32)  # [F, B]
  total = jnp.sum(w, axis=0)  # [B]
  valid = total > 0
  w = w / jnp.where(valid, total, 1.0)[None, :]
  fused = jnp.sum(w[..., None] * l2_normalize(embeddings), axis=0)
  return l2_normalize(fused), valid


@dataclasses.dataclass(frozen=True)
class GCLTowers:
  """The query tower and the document's field towers with their fusion.

  Attributes:
    image_tower: the ViT of the "image" field (Flax module).
    text_tower: the text tower of queries, titles and descriptions (Flax module).
    doc_fields: the fused document fields, a subset of ("image", "title", "description").
    doc_field_weights: w_f of each of doc_fields.
    share_text_tower: one text tower (parameters "text") for queries and documents; else the
      queries have their own ("query_text").
  """
  image_tower: Any
  text_tower: Any
  doc_fields: tuple[str, ...]
  doc_field_weights: tuple[float, ...]
  share_text_tower: bool = True

  def text_keys(self) -> tuple[str, str]:
    """(parameter key of the query tower, of the document text tower)."""
    return ("text", "text") if self.share_text_tower else ("query_text", "text")

  def text(self, params, key: str, ids: jax.Array, train: bool = False, rng=None) -> jax.Array:
    """ids: [B, L] int32 → [B, D] unnormalised text embeddings of tower `key`."""
    rngs = {"dropout": rng} if train else None
    return self.text_tower.apply({"params": params[key]}, ids, train=train, rngs=rngs)

  def image(self, params, images: jax.Array, train: bool = False, rng=None) -> jax.Array:
    """images: [B, S, S, 3] → [B, D] unnormalised image embeddings."""
    rngs = {"dropout": rng} if train else None
    return self.image_tower.apply({"params": params["image"]}, images, train=train, rngs=rngs)

  def embed_queries(self, params, query: jax.Array, *, train: bool = False,
                    rng: jax.Array | None = None) -> jax.Array:
    """query: [B, L] int32 → [B, D] unit-norm float32."""
    return l2_normalize(self.text(params, self.text_keys()[0], query, train, rng))

  def embed_documents(self, params, batch: Mapping[str, jax.Array], *, train: bool = False,
                      rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Fused document embeddings: ([B, D] unit-norm float32, valid [B] bool); see `fuse_fields`.

    batch: image [B, S, S, 3] float32, title / description [B, L] int32, has_* [B] bool.
    """
    keys = jax.random.split(rng if rng is not None else jax.random.PRNGKey(0),
                            len(self.doc_fields))
    embs, present = [], []
    for field, key in zip(self.doc_fields, keys):
      if field == "image":
        e = self.image(params, batch["image"], train, key)
      else:
        e = self.text(params, self.text_keys()[1], batch[field], train, key)
      embs.append(e.astype(jnp.float32))
      present.append(batch[f"has_{field}"])
    return fuse_fields(jnp.stack(embs), jnp.stack(present),
                       jnp.asarray(self.doc_field_weights, jnp.float32))


class PretrainedText(NamedTuple):
  """A pretrained text tower loaded for GCL (`load_pretrained_text`)."""
  tower: Any  # the BERT-family tower with a new head of width embed_dim
  tokenizer: Any
  pad_id: int
  params: dict[str, Any]  # its converted weights (without the new head)
  frozen: Callable[[str], bool]  # the parameters that do not train


def load_pretrained_text(p, *, embed_dim: int, max_text_len: int, text_keys: Sequence[str],
                         dtype, folder: pathlib.Path) -> PretrainedText:
  """Loads the `model.pretrained_text` section p: the tower (+ a projection head to embed_dim),
  tokenizer, weights and the lock of the towers under `text_keys`."""
  try:
    loaded = pretrained_lib.load_text_tower(folder, max_length=max_text_len,
                                            pool=p.pool or None, normalize=False, dtype=dtype)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"config key 'model.pretrained_text.folder' = {str(folder)!r}: {e}"
                      ) from None
  # RoBERTa / XLM-R number positions from pad_id + 1: fewer usable positions than the table.
  usable = loaded.tower.max_position - loaded.tower.position_offset
  if max_text_len > usable:
    raise ConfigError(f"config key 'data.max_text_len' ({max_text_len}) exceeds the "
                      f"pretrained tower's usable positions ({usable} = "
                      f"max_position_embeddings {loaded.tower.max_position} − position offset "
                      f"{loaded.tower.position_offset})")
  if p.lock == "top" and not 0 <= p.unlocked_blocks <= loaded.tower.depth:
    raise ConfigError(f"config key 'model.pretrained_text.unlocked_blocks' must lie in [0, "
                      f"{loaded.tower.depth}] (the tower's depth), got {p.unlocked_blocks}")
  # "locked" = mode "top" with no block unlocked: the encoder is frozen, the new head trains.
  mode, unlocked = {"locked": ("top", 0), "top": ("top", p.unlocked_blocks),
                    "tuned": ("tuned", 0)}[p.lock]
  frozen = lock_lib.frozen_filter(*[
      lock_lib.TowerLock(key, mode, depth=loaded.tower.depth, unlocked_blocks=unlocked)
      for key in sorted(set(text_keys))])
  return PretrainedText(loaded.tower.clone(embed_dim=embed_dim), loaded.tokenizer,
                        loaded.tower.pad_id, loaded.params, frozen)


def init_text(text_tower, pretrained_params, rng: jax.Array, max_text_len: int
              ) -> dict[str, Any]:
  """One text tower's parameters: fresh, or the pretrained weights under a fresh head."""
  texts = jnp.ones((1, max_text_len), jnp.int32)
  if pretrained_params is None:
    return text_tower.init(rng, texts, train=False)["params"]
  # Only the new head is drawn (a full init would draw the 20M+ pretrained weights only to
  # overwrite them): the `Projection` that BertTower builds as `head`, initialised alone;
  # `check_params_match` confirms that the assembled tree is exactly the tower's.
  head = layers.Projection(text_tower.embed_dim, dtype=text_tower.dtype,
                           param_dtype=text_tower.param_dtype)
  params = {**pretrained_params,
            "head": head.init(rng, jnp.zeros((1, text_tower.width), jnp.float32))["params"]}
  pretrained_lib.check_params_match(text_tower, params, texts, where="model.pretrained_text")
  return params
