"""Demure's model: modality projections W_m, an optional item-ID table and SASRec's causal encoder,
bound to the frozen item features (`DemureNet`)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmcl.models import seq_transformer
from mmcl.tasks.demure.data import per_occurrence_noise


class DemureModel(nn.Module):
  """Modality projections W_m, optional ID table and the SASRec encoder."""
  num_modalities: int
  num_items: int
  hidden: int
  max_len: int
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2
  use_id_embedding: bool = False

  def setup(self):
    self.proj = [nn.Dense(self.hidden, use_bias=False, kernel_init=seq_transformer.XAVIER,
                          name=f"proj_{m}") for m in range(self.num_modalities)]
    if self.use_id_embedding:
      self.id_embedding = self.param("id_embedding", seq_transformer.XAVIER,
                                     (self.num_items + 1, self.hidden))
    self.encoder = seq_transformer.SequenceEncoder(
        max_len=self.max_len, num_blocks=self.num_blocks, num_heads=self.num_heads,
        dropout=self.dropout, causal=True)

  def modality_tokens(self, feats: tuple[jax.Array, ...]) -> jax.Array:
    """feats: M arrays [..., D_m] → [..., M, d] projected modality tokens x̃^m."""
    return jnp.stack([p(f) for p, f in zip(self.proj, feats)], axis=-2)

  def id_tokens(self, items: jax.Array) -> jax.Array:
    """items: [...] int → [..., d] (zeros without the ID table; row 0 is always zero)."""
    if not self.use_id_embedding:
      return jnp.zeros((*items.shape, self.hidden), jnp.float32)
    return self.id_embedding[items] * (items != 0)[..., None]

  def encode(self, tokens: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    """tokens: [B, L, d], mask: [B, L] bool → [B, L, d]."""
    return self.encoder(tokens, mask, train=train)

  def __call__(self, feats, items, mask):
    tok = self.modality_tokens(feats).sum(-2) + self.id_tokens(items)
    return self.encode(tok, mask, False)


@dataclasses.dataclass(frozen=True)
class ItemFeatures:
  """The frozen modality features of every item, as the two sides of the model see them.

  Attributes:
    tables: M arrays [N + 1, D_m] float32, the candidate-side (item-table) rows; row 0 = padding.
    occurrence_noise: modality index → (clean [N + 1, D_m], planted [N + 1] bool, clean row
      norms [N + 1]) for a planted modality whose input-side vector is drawn again at every
      occurrence (`task.plant_noise_mode` resample / swap); empty otherwise.
    plant_noise_mode: resample or swap (the draw of `occurrence_noise`).
  """
  tables: tuple[np.ndarray, ...]
  occurrence_noise: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]
  plant_noise_mode: str = "fixed"

  def candidates(self, items: jax.Array) -> tuple[jax.Array, ...]:
    """items: [...] int32 → M arrays [..., D_m] (the item table's rows)."""
    return tuple(jnp.asarray(f)[items] for f in self.tables)

  def inputs(self, items: jax.Array, key: jax.Array | None) -> tuple[jax.Array, ...]:
    """Input-sequence features: as `candidates`, except that a per-occurrence planted modality
    gets a fresh draw for every (row, position) from `key`. items: [B, L] int32 → M arrays
    [B, L, D_m]."""
    feats = list(self.candidates(items))
    for j, (clean, mask, norms) in self.occurrence_noise.items():
      k = jax.random.fold_in(jax.random.PRNGKey(0) if key is None else key, j)
      feats[j] = per_occurrence_noise(k, items, jnp.asarray(clean), jnp.asarray(mask),
                                      jnp.asarray(norms, jnp.float32), self.plant_noise_mode)
    return tuple(feats)


@dataclasses.dataclass(frozen=True)
class DemureNet:
  """`DemureModel` bound to the item features: the functions the loss, the evaluator and the
  export call with the parameters."""
  model: DemureModel
  features: ItemFeatures

  def apply(self, params, method, *args, train=False, rng=None):
    return self.model.apply({"params": params}, *args, method=method,
                            rngs={"dropout": rng} if train else None)

  def init(self, rng: jax.Array):
    length = self.model.max_len
    feats = tuple(jnp.zeros((1, length, f.shape[1])) for f in self.features.tables)
    return self.model.init(rng, feats, jnp.zeros((1, length), jnp.int32),
                           jnp.ones((1, length), bool))["params"]

  def item_table(self, params) -> jax.Array:
    """[N + 1, d] item representations e_i = Σ_m W_m x_i^m (+ ID); row 0 = padding."""
    items = jnp.arange(self.model.num_items + 1)
    tok = self.apply(params, DemureModel.modality_tokens, self.features.candidates(items)).sum(-2)
    return (tok + self.apply(params, DemureModel.id_tokens, items)).at[0].set(0.0)

  def input_tokens(self, params, items: jax.Array, key: jax.Array | None
                   ) -> tuple[jax.Array, jax.Array]:
    """items: [B, L] int32 → (modality tokens x̃ [B, L, M, d], ID tokens [B, L, d])."""
    xt = self.apply(params, DemureModel.modality_tokens, self.features.inputs(items, key))
    return xt, self.apply(params, DemureModel.id_tokens, items)

  def encode(self, params, tokens: jax.Array, items: jax.Array, *, train: bool = False,
             rng=None) -> jax.Array:
    """tokens: [B, L, d] summed tokens of `items` [B, L] → outputs [B, L, d]."""
    return self.apply(params, DemureModel.encode, tokens, items != 0, train, train=train, rng=rng)

  def last_output(self, params, items: jax.Array, key: jax.Array,
                  flags: jax.Array | None = None) -> jax.Array:
    """items: [B, L] → [B, d] output at the most recent position, with the modality tokens that
    `flags` [B, L, M] bool marks removed (None: the original sequence)."""
    xt, ids = self.input_tokens(params, items, key)
    if flags is not None:
      xt = xt * (~flags)[..., None]
    return self.encode(params, xt.sum(-2) + ids, items)[:, -1]
