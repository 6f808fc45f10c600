"""Artist retrieval's model: one projector per modality into the shared space (with an optional
fixed residual path, a PCA basis of the training rows) and the fused artist embedding."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.models.layers import l2_normalize


def pca_basis(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """x: [N, d] float → (mean [d], basis [d, dim]) float32: the top principal directions (columns
  beyond the rank of the centred data are zero)."""
  x = np.asarray(x, np.float64)
  mean = x.mean(0)
  _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
  basis = np.zeros((x.shape[1], dim))
  k = min(dim, vt.shape[0])
  basis[:, :k] = vt[:k].T
  return mean.astype(np.float32), basis.astype(np.float32)


def fit_skip_paths(train: Mapping[str, np.ndarray], skip: tuple[str, ...], dim: int, where: str
                   ) -> dict[str, dict[str, np.ndarray]]:
  """{m: {"mean": [d_m], "basis": [d_m, dim]}} of the residual paths of the `skip` modalities,
  fitted on the rows of the training split `train` (m [N, d_m], has_m [N]) that have m; `where`
  names the dataset in errors."""
  fits = {}
  for m in skip:
    rows = train[m][train[f"has_{m}"]]
    if rows.shape[0] < 2:
      raise ValueError(f"{where} has {rows.shape[0]} rows with modality {m!r}; "
                       "model.skip_modalities needs at least 2 to fit its principal directions")
    mean, basis = pca_basis(rows, dim)
    fits[m] = {"mean": mean, "basis": basis}
  return fits


@dataclasses.dataclass(frozen=True)
class ArtistProjectors:
  """The projectors g_m of `modalities` (input widths `dims`), those of `skip` with the residual
  path of weight `skip_weight`."""
  projectors: Mapping[str, Any]
  modalities: tuple[str, ...]
  dims: Mapping[str, int]
  skip: tuple[str, ...] = ()
  skip_weight: float = 1.0

  def init(self, rng: jax.Array) -> dict[str, Any]:
    keys = jax.random.split(rng, len(self.modalities))
    return {m: self.projectors[m].init(k, jnp.zeros((1, self.dims[m]), jnp.float32))["params"]
            for m, k in zip(self.modalities, keys)}

  def project(self, params, m: str, x: jax.Array, *, train: bool = False,
              rng: jax.Array | None = None) -> jax.Array:
    """x: [B, d_m] float32 → [B, D] unit-norm float32 in the shared space."""
    rngs = {"dropout": rng} if train else None
    out = self.projectors[m].apply({"params": params["projectors"][m]}, x, train=train, rngs=rngs)
    if m in self.skip:
      sk = jax.tree.map(jax.lax.stop_gradient, params["skip"][m])
      path = l2_normalize((x.astype(jnp.float32) - sk["mean"]) @ sk["basis"])
      out = out + self.skip_weight * np.sqrt(out.shape[-1]) * path
    return l2_normalize(out)

  def fuse(self, params, x: jax.Array) -> jax.Array:
    """x: [B, Σ d_m + M] (the modality vectors in `modalities` order, then M availability flags
    0 / 1) → [B, D] the artist embedding: the mean of the available projections, re-normalised
    (the evaluator's); zero rows when nothing is available."""
    dims = [self.dims[m] for m in self.modalities]
    parts = jnp.split(x, np.cumsum(dims).tolist(), axis=1)
    avail = parts[-1]
    total = sum(self.project(params, m, parts[i]) * avail[:, i:i + 1]
                for i, m in enumerate(self.modalities))
    return total * jax.lax.rsqrt(jnp.maximum(jnp.sum(total * total, -1, keepdims=True), 1e-24))

  def embed_catalogue(self, params, cat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Projected catalogue: modality → [N, D] float32 (rows without the modality are garbage and
    must be masked with has_{m})."""
    fns = {m: jax.jit(lambda p, x, m=m: self.project(p, m, x)) for m in self.modalities}
    return {m: np.asarray(fns[m](params, jnp.asarray(cat[m]))) for m in self.modalities}


def artist_rows(cat: Mapping[str, np.ndarray], modalities: tuple[str, ...]) -> np.ndarray:
  """The fused tower's input rows [N, Σ d_m + M] of a split read by `read_split`: the modality
  vectors (zeros where missing), then the availability flags."""
  return np.concatenate([np.where(cat[f"has_{m}"][:, None], cat[m], 0.0) for m in modalities]
                        + [np.stack([cat[f"has_{m}"] for m in modalities], 1)],
                        axis=1).astype(np.float32)
