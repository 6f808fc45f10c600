"""InfoNCE over every pair of modalities with missing modalities (cross-modal artist retrieval)."""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from mmcl.losses import collectives
from mmcl.losses.common import check_mask, check_pair
from mmcl.losses.infonce import infonce


def multimodal_infonce(embeddings: Mapping[str, jax.Array],
                       valid: Mapping[str, jax.Array] | None = None, *,
                       logit_scale: jax.Array | float,
                       pairs: Sequence[tuple[str, str]] | None = None,
                       weights: jax.Array | None = None, group_ids: jax.Array | None = None,
                       impl: str = "auto", block_size: int | None = None,
                       axis_name: collectives.AxisName = None,
                       return_pair_losses: bool = False):
  r"""Mean symmetric InfoNCE over modality pairs, each on the rows where both modalities exist.

  For each pair (m, n) with V_mn = {i : valid^m_i ∧ valid^n_i},

    L_mn = infonce(e^m, e^n, a_valid = b_valid = V_mn)        (rows outside V_mn take no part)
    c_mn = [|V_mn| ≥ 2]                                        (|V_mn| over the global batch)
    L = Σ_mn c_mn L_mn / Σ_mn c_mn                              (0 when no pair contributes)

  (Ferraro et al. 2023, arXiv:2308.06556: an absent modality is never zero-filled into the loss.)

  Args:
    embeddings: modality name → [B, D] float, all of one shape and dtype (projected, normalised).
    valid: modality name → [B] bool availability, the same keys as `embeddings`; None: all present.
    logit_scale: [] float, s = 1/τ (differentiable).
    pairs: the (m, n) pairs to use; None: every unordered pair, in sorted name order.
    weights, group_ids, impl, block_size, axis_name: passed to `infonce` for every pair.
    return_pair_losses: also return {"m:n": (L_mn, c_mn)} for logging.

  Returns:
    [] float32, the loss; with `return_pair_losses`, (loss, {"m:n": (loss_mn, contributes_mn)}).
  """
  where = "mmcl.losses.multimodal_infonce"
  if not isinstance(embeddings, Mapping) or len(embeddings) < 2:
    found = sorted(embeddings) if isinstance(embeddings, Mapping) else type(embeddings).__name__
    raise ValueError(f"{where}: `embeddings` must be a dict of at least 2 modalities, got {found}")
  names = sorted(embeddings)
  first = embeddings[names[0]]
  for name in names[1:]:
    check_pair(first, embeddings[name], where, names=(f"embeddings[{names[0]!r}]",
                                                     f"embeddings[{name!r}]"))
  n = first.shape[0]
  if valid is None:
    valid = {name: None for name in names}
  if set(valid) != set(names):
    raise ValueError(f"{where}: `valid` must have the keys of `embeddings` {names}, got "
                     f"{sorted(valid)}")
  valid = {name: check_mask(valid[name], n, f"valid[{name!r}]", where) for name in names}
  if pairs is None:
    pairs = list(itertools.combinations(names, 2))
  if not pairs:
    raise ValueError(f"{where}: `pairs` is empty")
  for pair in pairs:
    if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(names):
      raise ValueError(f"{where}: each entry of `pairs` must be two different modality names among "
                       f"{names}, got {pair!r}")

  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  per_pair = {}
  for m, k in pairs:
    both = valid[m] & valid[k]
    contributes = collectives.global_sum(jnp.sum(both.astype(jnp.int32)), axis_name) >= 2
    loss_mk = infonce(embeddings[m], embeddings[k], logit_scale=logit_scale, weights=weights,
                      a_valid=both, b_valid=both, group_ids=group_ids, impl=impl,
                      block_size=block_size, axis_name=axis_name)
    total = total + jnp.where(contributes, loss_mk, 0.0)
    count = count + contributes.astype(jnp.float32)
    per_pair[f"{m}:{k}"] = (loss_mk, contributes)
  loss = jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
  if return_pair_losses:
    return loss, per_pair
  return loss
