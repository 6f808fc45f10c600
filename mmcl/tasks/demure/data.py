"""Demure's data: the items' modality features, planted modality noise (the controlled test of
denoising), the users' training rows and the step-counting iterator that `task.flag_after_steps`
reads."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import sequences as seq_lib
from data_pipelines.featurize import load_modality_features


def plant_noise(features: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Replaces the rows of a random `fraction` of items 1..N by Gaussian vectors of equal norm.

  features: [N + 1, D] (row 0 = padding). Returns (features', noisy [N + 1] bool).
  """
  rng = np.random.default_rng(seed)
  n = features.shape[0] - 1
  noisy = np.zeros(n + 1, bool)
  noisy[1 + rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
  out = features.copy()
  g = rng.normal(size=(int(noisy.sum()), features.shape[1])).astype(np.float32)
  norms = np.linalg.norm(features[noisy], axis=1, keepdims=True)
  out[noisy] = g / np.linalg.norm(g, axis=1, keepdims=True) * norms
  return out, noisy


PLANT_NOISE_MODES = ("fixed", "resample", "swap")


def planted_item_side(features: np.ndarray, noisy: np.ndarray, mode: str) -> np.ndarray:
  """The item-side (candidate) features of a planted modality under `mode` (PLANT_NOISE_MODES).

  features: [N + 1, D] clean features (row 0 = padding); noisy: [N + 1] bool planted items.
  "fixed": the caller's table already holds the planted vectors (returned unchanged);
  "resample": a noisy item's input vector is a fresh Gaussian draw at every occurrence, so its
  candidate-side vector is the expectation of that draw, 0;
  "swap": a noisy item's input vector is the clean vector of a uniformly drawn item at every
  occurrence, so its candidate-side vector is the expectation, the mean clean row of items 1..N.
  Returns [N + 1, D] float32.
  """
  if mode not in PLANT_NOISE_MODES:
    raise ValueError(f"config key task.plant_noise_mode = {mode!r}: expected one of "
                     f"{PLANT_NOISE_MODES}")
  out = np.array(features, np.float32, copy=True)
  if mode == "resample":
    out[noisy] = 0.0
  elif mode == "swap":
    out[noisy] = features[1:].mean(0)
  return out


def per_occurrence_noise(key: jax.Array, items: jax.Array, clean: jax.Array, noisy: jax.Array,
                         norms: jax.Array, mode: str) -> jax.Array:
  """Input features of one planted modality with noise drawn at every occurrence.

  Args:
    key: PRNG key of this draw (one per training step / evaluation pass).
    items: [...] int32 item ids (0 = padding).
    clean: [N + 1, D] clean features; noisy: [N + 1] bool planted items; norms: [N + 1] float
      the clean row norms.
    mode: "resample" (a Gaussian vector with the item's clean norm) or "swap" (the clean vector
      of a uniformly drawn item in 1..N).
  Returns:
    [..., D] float32: clean[items] where the item is not planted, the fresh draw where it is.
  """
  x = clean[items]
  if mode == "resample":
    g = jax.random.normal(key, x.shape, x.dtype)
    g = g * (norms[items] * jax.lax.rsqrt(jnp.sum(g * g, -1) + 1e-12))[..., None]
  elif mode == "swap":
    g = clean[jax.random.randint(key, items.shape, 1, clean.shape[0])]
  else:
    raise ValueError(f"per_occurrence_noise: mode {mode!r} is not resample or swap")
  return jnp.where(noisy[items][..., None], g, x)


class StepCountingIterator:
  """Adds the global step, "step": [B] int32, to every batch of a checkpointable iterator.

  The loss reads it for `task.flag_after_steps` (the trainer passes no step to the task). The
  state is the wrapped iterator's plus the count, as JSON bytes (what grain's checkpoint handler
  stores for iterators that are not `grain.DatasetIterator`s), so a resumed run counts on.
  """

  def __init__(self, inner):
    self.inner = inner
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self.inner))
    rows = len(next(iter(batch.values())))
    batch["step"] = np.full((rows,), self.step, np.int32)
    self.step += 1
    return batch

  def get_state(self) -> bytes:
    inner = self.inner.get_state()
    if isinstance(inner, bytes):
      inner = {"bytes": inner.decode()}
    return json.dumps({"inner": inner, "step": self.step}).encode()

  def set_state(self, state: bytes) -> None:
    d = json.loads(state.decode() if isinstance(state, bytes) else state)
    inner = d["inner"]
    self.inner.set_state(inner["bytes"].encode() if set(inner) == {"bytes"} else inner)
    self.step = int(d["step"])


def load_item_features(data_dir: str, num_items: int, t, *, text_features: str, seed: int
                       ) -> tuple[list[np.ndarray], dict[str, np.ndarray],
                                  dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
  """The item features of `t.modalities` (t: the `task` config), with the planted noise of
  `t.plant_noise_modality` applied.

  Returns (features: M arrays [N + 1, D_m] float32, the candidate-side rows; planted: modality
  name → [N + 1] bool planted items; occurrence_noise: modality index → (clean table [N + 1, D_m],
  planted mask [N + 1], clean norms [N + 1]) for noise drawn at every occurrence, i.e.
  task.plant_noise_mode resample / swap).
  """
  feats = load_modality_features(data_dir, num_items, t.modalities, text_features=text_features,
                                 lexical_dim=t.lexical_dim, seed=seed)
  planted, occurrence = {}, {}
  if t.plant_noise_modality:
    j = list(t.modalities).index(t.plant_noise_modality)
    noised, mask = plant_noise(feats[j], t.plant_noise_item_fraction, t.plant_noise_seed)
    planted[t.plant_noise_modality] = mask
    if t.plant_noise_mode == "fixed":
      if t.plant_noise_side != "both":
        raise ValueError("config key task.plant_noise_side = 'input' needs noise drawn at every "
                         "occurrence (task.plant_noise_mode resample or swap), not 'fixed'")
      feats[j] = noised
    else:
      occurrence[j] = (feats[j], mask, np.linalg.norm(feats[j], axis=1))
      if t.plant_noise_side == "both":
        feats[j] = planted_item_side(feats[j], mask, t.plant_noise_mode)
  return feats, planted, occurrence


def training_rows(user_items: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Every user's training row (the history without its valid/test items): (inputs, targets),
  each [U, L] int32 left-padded."""
  pairs = [seq_lib.next_item_example(s, max_len) for s in user_items]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
