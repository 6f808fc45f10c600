"""The residual (skip) path of the modality projectors: a PCA basis of the training rows."""

from __future__ import annotations

import numpy as np


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
