"""Literal, loop-per-anchor references of the losses, written straight from their equations.

They share no code with mmcl.losses: the candidate sets are built with Python loops over (i, j) from
the definitions in the docstrings, then each anchor's term is a separate jnp expression, so JAX can
differentiate them (small batches only). Also: loading open_clip's loss module without importing
open_clip itself, and the relative-error assertion used by the tests.
"""
from __future__ import annotations

import importlib.util
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np


def _duplicate(groups, i, j) -> bool:
  """Pairs i != j sharing a non-negative id in any column of groups [B, K]."""
  if groups is None:
    return False
  return any(groups[i, k] == groups[j, k] and groups[i, k] >= 0 for k in range(groups.shape[1]))


def _masked_lse(z, mask):
  """Row-wise log Σ_{mask} exp(z) for rows with at least one true entry."""
  return jax.nn.logsumexp(jnp.where(mask, z, -jnp.inf), axis=1)


def infonce_reference(a, b, s, weights=None, a_valid=None, b_valid=None, groups=None):
  """½ Σ_{i∈V} w_i (ℓ^{a→b}_i + ℓ^{b→a}_i) / Σ_{i∈V} w_i (see mmcl.losses.infonce)."""
  n = a.shape[0]
  w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
  av = np.ones(n, bool) if a_valid is None else np.asarray(a_valid)
  bv = np.ones(n, bool) if b_valid is None else np.asarray(b_valid)
  groups = None if groups is None else np.asarray(groups).reshape(n, -1)
  anchors = [i for i in range(n) if av[i] and bv[i]]
  if not anchors:
    return jnp.zeros(())
  # cand_ab[i, j]: b_j in the a→b denominator of anchor i; cand_ba[i, j]: a_j in b_i's.
  cand_ab = np.array([[bv[j] and (j == i or not _duplicate(groups, i, j)) for j in range(n)]
                      for i in anchors])
  cand_ba = np.array([[av[j] and (j == i or not _duplicate(groups, i, j)) for j in range(n)]
                      for i in anchors])
  idx = np.array(anchors)
  z = s * (a.astype(jnp.float32) @ b.astype(jnp.float32).T)
  positive = z[idx, idx]
  a_to_b = _masked_lse(z[idx], cand_ab) - positive
  b_to_a = _masked_lse(z.T[idx], cand_ba) - positive
  return jnp.sum(w[idx] * 0.5 * (a_to_b + b_to_a)) / np.sum(w[idx])


def sigmoid_reference(a, b, s, c, weights=None, a_valid=None, b_valid=None, groups=None):
  """Σ_i w_i [a_valid_i] Σ_{j∈A_i} −log σ(y_ij z_ij) / Σ_i w_i [a_valid_i]."""
  n = a.shape[0]
  w = np.ones(n) if weights is None else np.asarray(weights)
  av = np.ones(n, bool) if a_valid is None else np.asarray(a_valid)
  bv = np.ones(n, bool) if b_valid is None else np.asarray(b_valid)
  groups = None if groups is None else np.asarray(groups).reshape(n, -1)
  included = np.zeros((n, n), bool)  # pair (i, j) in the sum
  signs = -np.ones((n, n))
  for i in range(n):
    for j in range(n):
      included[i, j] = av[i] and bv[j] and (j == i or not _duplicate(groups, i, j))
      signs[i, j] = 1.0 if i == j else -1.0
  z = s * (a @ b.T) + c
  rows = jnp.sum(jnp.where(included, -jax.nn.log_sigmoid(signs * z), 0.0), axis=1)
  den = float(np.sum(w * av))
  return jnp.sum(w * av * rows) / den if den > 0 else jnp.zeros(())


def supcon_reference(z, s, clip_ids, exclude=None, valid=None):
  """mean_{i valid} (1/max(1,|P_i|)) Σ_{j∈P_i} −log(exp(s_ij) / Σ_{m≠i, valid} exp(s_im))."""
  n = z.shape[0]
  clip_ids = np.asarray(clip_ids)
  ex = np.zeros(n, bool) if exclude is None else np.asarray(exclude)
  va = np.ones(n, bool) if valid is None else np.asarray(valid)
  anchors = [i for i in range(n) if va[i]]
  if not anchors:
    return jnp.zeros(())
  positives = np.array([[j != i and va[j] and clip_ids[j] == clip_ids[i] and not ex[i]
                         and not ex[j] for j in range(n)] for i in anchors])
  others = np.array([[m != i and va[m] for m in range(n)] for i in anchors])
  idx = np.array(anchors)
  sim = s * (z @ z.T)
  log_prob = sim[idx] - _masked_lse(sim[idx], others)[:, None]
  count = positives.sum(axis=1)
  per_anchor = -jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1) / np.maximum(count, 1)
  return jnp.sum(per_anchor) / len(anchors)


def multimodal_reference(embeddings, valid, s, pairs=None):
  """Mean over modality pairs with ≥ 2 rows present in both of InfoNCE on those rows only."""
  names = sorted(embeddings)
  pairs = list(itertools.combinations(names, 2)) if pairs is None else pairs
  losses = []
  for m, k in pairs:
    both = np.asarray(valid[m]) & np.asarray(valid[k])
    if both.sum() < 2:
      continue
    idx = np.flatnonzero(both)
    # Dropping the absent rows outright is the plain meaning of "only rows with both".
    losses.append(infonce_reference(embeddings[m][idx], embeddings[k][idx], s))
  return sum(losses) / len(losses) if losses else jnp.zeros(())


def load_open_clip_loss():
  """open_clip's loss.py as a module (needs only torch), or (None, reason)."""
  try:
    import torch  # noqa: F401
  except ImportError as e:
    return None, f"torch is not installed ({e}); `pip install torch==2.13.0`"
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    return None, "open_clip_torch is not installed; `pip install --no-deps open_clip_torch`"
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "loss.py"
  if not path.is_file():
    return None, f"open_clip's loss module not found at {path}"
  module_spec = importlib.util.spec_from_file_location("open_clip_loss_reference", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, ""


def assert_close(actual, expected, rtol=1e-5, what=""):
  """Relative error ‖actual − expected‖ / ‖expected‖ ≤ rtol (absolute for an all-zero expected),
  and elementwise |actual − expected| ≤ rtol · (|expected| + max|expected|)."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values {actual}"
  scale = np.linalg.norm(expected)
  err = np.linalg.norm(actual - expected)
  assert err <= rtol * max(scale, 1e-30) or (scale == 0 and err <= rtol), (
      f"{what}: relative error {err / max(scale, 1e-30):.3g} > {rtol}")
  bound = rtol * (np.abs(expected) + np.abs(expected).max(initial=0.0)) + 1e-12
  worst = np.max(np.abs(actual - expected) - bound, initial=-1.0)
  assert worst <= 0, f"{what}: elementwise error above {rtol} (worst excess {worst:.3g})"


def random_embeddings(seed, n, d, count=2, normalise=True):
  """`count` arrays [n, d] float32 of unit rows (so that logits are in CLIP's range).

  Drawn with numpy: eager JAX ops would each compile a small program, which adds up in a suite.
  """
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    x = rng.standard_normal((n, d))
    if normalise:
      x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.append(jnp.asarray(x, jnp.float32))
  return out
