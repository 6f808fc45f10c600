"""GCL's loss: per-pair weights from the graded relevance scores (score-to-weight) and the
weighted, duplicate-masked InfoNCE over the mesh."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from mmcl.losses import sharded as sharded_losses

SCORE_TO_WEIGHT = ("score_linear", "score_reciprocal", "no_score")


def score_weights(batch: Mapping[str, jax.Array], score_to_weight: str, *,
                  normalize: bool = True) -> jax.Array:
  """Per-pair loss weights w = STW(score): [B] float32 (mean 1 over the batch when `normalize`).

  score_linear / score_reciprocal: the batch's column of that name; no_score: ones.
  """
  if score_to_weight not in SCORE_TO_WEIGHT:
    raise ValueError(f"config key 'task.score_to_weight' must be one of {SCORE_TO_WEIGHT}, got "
                     f"{score_to_weight!r}")
  n = batch["query"].shape[0]
  if score_to_weight == "no_score":
    return jnp.ones((n,), jnp.float32)
  w = batch[score_to_weight].astype(jnp.float32)
  if normalize:
    w = w / jnp.maximum(jnp.mean(w), 1e-12)
  return w


def gcl_loss(towers, params, batch: Mapping[str, jax.Array], rng: jax.Array, t, mesh,
             logit_scale: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted GCL loss of one global batch (towers: `model.GCLTowers`; t: the `task` config).

  L = ½[−Σ_i w_i log softmax_j(S)_ii − Σ_i w_i log softmax_j(Sᵀ)_ii] / Σ_i w_i, S = s·e_q e_dᵀ
  [B, B], over the mesh; duplicates (same query_gid or doc_gid [B]) are not each other's
  negatives when `task.mask_duplicates`.
  Returns (loss, {"temperature", "logit_scale", "mean_weight_top10"}).
  """
  k_q, k_d = jax.random.split(rng)
  q = towers.embed_queries(params, batch["query"], train=train, rng=k_q)
  d, d_valid = towers.embed_documents(params, batch, train=train, rng=k_d)
  w = score_weights(batch, t.score_to_weight, normalize=t.normalize_weights)
  groups = None
  if t.mask_duplicates:
    groups = jnp.stack([batch["query_gid"], batch["doc_gid"]], axis=1).astype(jnp.int32)
  loss = sharded_losses.infonce_over_mesh(q, d, mesh, logit_scale=logit_scale, weights=w,
                                          b_valid=d_valid, group_ids=groups, impl=t.loss_impl)
  return loss, {"temperature": 1.0 / logit_scale, "logit_scale": logit_scale,
                "mean_weight_top10": jnp.sum(jnp.where(batch["position"] <= 10, w, 0.0))
                / jnp.maximum(jnp.sum(w), 1e-12)}
