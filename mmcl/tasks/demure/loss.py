"""Demure's loss: L_rec, the gradient×input contribution scores, the noise flags (the
lowest-contribution (t, m) pairs of a row, or under one global threshold) that remove modality
tokens from the denoised view, and the denoised/noisy InfoNCE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.losses import sharded as sharded_losses
from mmcl.losses.negatives import sample_train_negatives
from mmcl.models.layers import l2_normalize


def flag_lowest(scores: jax.Array, valid: jax.Array, fraction: float) -> jax.Array:
  """Per row, flags the lowest `fraction` of its valid entries.

  scores: [B, K] float; valid: [B, K] bool. Returns [B, K] bool (floor(fraction · n_valid) per row).
  """
  s = jnp.where(valid, scores, jnp.inf)
  rank = jnp.argsort(jnp.argsort(s, axis=1), axis=1)
  k = jnp.floor(fraction * valid.sum(1, keepdims=True)).astype(rank.dtype)
  return (rank < k) & valid


def lowest_fraction_threshold(scores: np.ndarray, fraction: float) -> float:
  """The score at or below which the lowest `fraction` of `scores` [K] lies (the "lower"
  quantile, so `scores <= threshold` flags about `fraction` of them, ties included)."""
  return float(np.quantile(np.asarray(scores).reshape(-1), fraction, method="lower"))


def rec_loss(h: jax.Array, table: jax.Array, targets: jax.Array, negs: jax.Array,
             kind: str) -> tuple[jax.Array, jax.Array]:
  """L_rec of the outputs h [B, L, d] against the item table [N + 1, d] → (mean, sum) over the
  positions with a target (targets, negs: [B, L] int32).

  kind "bce": −log σ(h·e_target) − log(1 − σ(h·e_neg)) per position (SASRec);
  "softmax": −log softmax_i(h·e_i)[target] over the N real items (negs unused).
  """
  weight = (targets != 0).astype(jnp.float32)
  if kind == "softmax":
    logits = jnp.einsum("bld,nd->bln", h, table[1:])
    pos = jnp.take_along_axis(logits, jnp.maximum(targets - 1, 0)[..., None], -1)[..., 0]
    per = (jax.nn.logsumexp(logits, -1) - pos) * weight
  else:
    pos, neg = jnp.sum(h * table[targets], -1), jnp.sum(h * table[negs], -1)
    per = (jax.nn.softplus(-pos) + jax.nn.softplus(neg)) * weight
  return per.sum() / jnp.maximum(weight.sum(), 1.0), per.sum()


def normalise_scores(c: jax.Array, valid: jax.Array, normalisation: str) -> jax.Array:
  """c: [B, L, M] scores, valid: [B, L, M] bool → [B, L, M]: "sequence" divides per (sequence,
  modality) by the mean |c| over its real positions; "position" divides c_{t,m} by
  Σ_m' |c_{t,m'}|; "none" keeps c."""
  if normalisation == "sequence":
    return c / (jnp.sum(jnp.abs(c) * valid, 1, keepdims=True)
                / jnp.maximum(valid.sum(1, keepdims=True), 1) + 1e-12)
  if normalisation == "position":
    return c / (jnp.sum(jnp.abs(c), -1, keepdims=True) + 1e-12)
  if normalisation != "none":
    raise ValueError(f"config key task.score_normalisation = {normalisation!r}: expected "
                     "sequence, position or none")
  return c


def pool_batch_items(c: jax.Array, valid: jax.Array, inputs: jax.Array,
                     num_items: int) -> jax.Array:
  """c: [B, L, M] → [B, L, M], each score replaced by the mean over the batch's occurrences of the
  same item (inputs [B, L]) in the same modality (valid [B, L, M] the real pairs)."""
  m = c.shape[-1]
  flat_items = inputs.reshape(-1)
  w = valid.reshape(-1, m).astype(c.dtype)
  sums = jnp.zeros((num_items + 1, m), c.dtype).at[flat_items].add(c.reshape(-1, m) * w)
  counts = jnp.zeros((num_items + 1, m), c.dtype).at[flat_items].add(w)
  return (sums / jnp.maximum(counts, 1.0))[inputs]


def contributions(net, params, inputs, targets, negs, t, mode: str | None = None,
                  key: jax.Array | None = None, normalisation: str | None = None,
                  pooling: str | None = None, path_steps: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Normalised gradient×input scores of the original sequence (net: `DemureNet`; t: the `task`
  config, whose keys give the defaults).

  mode (default `task.contribution`): "abs" c = |⟨g, x̃⟩| (the paper's magnitude); "signed"
  c = −⟨g, x̃⟩, the first-order increase of L_rec when the token is removed (x̃ → 0), so a token
  that hurts the prediction scores below one that is merely unused.
  path_steps (default `task.contribution_path_steps`) K: g = ∂L/∂x̃ at the input when K = 1;
  else the mean of ∂L/∂x̃ at α·x̃ (all modality tokens of the row scaled together) over the
  midpoints α = (k − ½)/K, k = 1..K (integrated gradients from the empty sequence).
  normalisation (default `task.score_normalisation`): see `normalise_scores`.
  pooling (default `task.score_pooling`): "none" keeps per-position scores (the paper);
  "batch_item" replaces each score by the mean over the batch's occurrences of the same item
  in the same modality (a stateless smoothing over occurrences).
  inputs, targets, negs: [B, L] int32; key: the draw of per-occurrence planted noise (the same
  key as the views', so the scores are those of the tokens the model sees).
  Returns (c [B, L, M] float32, valid [B, L, M] bool = real positions).
  """
  mode = mode or t.contribution
  normalisation = normalisation or t.score_normalisation
  pooling = pooling or t.score_pooling
  steps = path_steps or t.contribution_path_steps
  if steps < 1:
    raise ValueError(f"config key task.contribution_path_steps = {steps}: expected ≥ 1")
  params = jax.lax.stop_gradient(params)
  table = net.item_table(params)
  xt, ids = net.input_tokens(params, inputs, key)  # [B, L, M, d], [B, L, d]

  def total(xt):
    h = net.encode(params, xt.sum(-2) + ids, inputs)
    return rec_loss(h, table, targets, negs, t.rec_loss)[1]
  if steps == 1:
    g = jax.grad(total)(xt)
  else:
    g = jax.lax.fori_loop(
        0, steps, lambda k, acc: acc + jax.grad(total)((k + 0.5) / steps * xt),
        jnp.zeros_like(xt)) / steps
  c = -jnp.sum(g * xt, -1)
  if mode == "abs":
    c = jnp.abs(c)
  valid = jnp.broadcast_to((inputs != 0)[..., None], c.shape)
  c = normalise_scores(c, valid, normalisation)
  if pooling == "batch_item":
    c = pool_batch_items(c, valid, inputs, net.model.num_items)
  elif pooling != "none":
    raise ValueError(f"config key task.score_pooling = {pooling!r}: expected none or batch_item")
  return jax.lax.stop_gradient(c), valid


def noise_flags(net, params, inputs, t, *, item_score_table=None, flag_threshold=None,
                targets=None, negs=None, key=None) -> tuple[jax.Array, jax.Array]:
  """The weak noise labels (2): per row, the lowest `task.noise_fraction` of its real (t, m)
  pairs by score — the `task.item_scores` table [N + 1, M] when given (then targets / negs are not
  needed), else the per-position contributions of this batch; with a `flag_threshold`
  (task.flag_scope = global), the pairs whose table score is at or below it instead.

  inputs, targets, negs: [B, L] int32; key: the planted-noise draw of the batch.
  Returns (flags [B, L, M] bool, valid [B, L, M] bool).
  """
  if item_score_table is not None:
    c = jnp.asarray(item_score_table)[inputs]
    valid = jnp.broadcast_to((inputs != 0)[..., None], c.shape)
  else:
    c, valid = contributions(net, params, inputs, targets, negs, t, key=key)
  if flag_threshold is not None:
    return (c <= flag_threshold) & valid, valid
  b, length, m = c.shape
  flags = flag_lowest(c.reshape(b, length * m), valid.reshape(b, length * m),
                      t.noise_fraction).reshape(b, length, m)
  return flags, valid


def demure_loss(net, params, batch, rng, t, mesh, *, train: bool, item_score_table=None,
                flag_threshold=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L = L_rec(denoised) + λ·InfoNCE(h_denoised, h_noisy; τ) of one batch (inputs, targets:
  [B, L] int32, optional step: [B] int32), or L_rec(original) with `task.denoise` off.

  net: `DemureNet`; t: the `task` config; mesh: the device mesh of the in-batch InfoNCE.
  Returns (loss, {"rec_loss", "flagged_fraction", "cl_loss"}).
  """
  inputs, targets = batch["inputs"], batch["targets"]
  k_neg, k_d, k_n, k_noise = jax.random.split(rng, 4)
  seen = jnp.concatenate([inputs, targets], axis=1)
  negs = sample_train_negatives(k_neg, seen, targets.shape, net.model.num_items,
                                t.num_candidate_draws)
  table = net.item_table(params)
  xt, ids = net.input_tokens(params, inputs, k_noise)  # [B, L, M, d], [B, L, d]
  noisy_tokens = xt.sum(-2) + ids

  def rec(tokens):
    h = net.encode(params, tokens, inputs, train=train, rng=k_d)
    return rec_loss(h, table, targets, negs, t.rec_loss)[0], h
  if not t.denoise:
    loss, _ = rec(noisy_tokens)
    return loss, {"rec_loss": loss}
  flags, valid = noise_flags(net, params, inputs, t, item_score_table=item_score_table,
                             flag_threshold=flag_threshold, targets=targets, negs=negs,
                             key=k_noise)
  cl_weight = jnp.asarray(t.cl_weight, jnp.float32)
  if t.flag_after_steps:
    if "step" not in batch:
      raise ValueError("config key task.flag_after_steps > 0 needs the batch's 'step' (added by "
                       "DemureTask.train_iterator); this batch has none")
    on = batch["step"][0] >= t.flag_after_steps
    flags = flags & on
    cl_weight = cl_weight * on
  rec_d, h_d = rec((xt * (~flags)[..., None]).sum(-2) + ids)
  metrics = {"rec_loss": rec_d, "flagged_fraction": flags.sum() / jnp.maximum(valid.sum(), 1)}
  if t.cl_weight == 0:
    # λ = 0 (the denoised-input ablation): the noisy view would only feed a term of weight 0,
    # so it is not encoded (a third of the step's cost).
    return rec_d, metrics
  h_n = net.encode(params, noisy_tokens, inputs, train=train, rng=k_n)
  if t.cl_stop_gradient:
    h_d = jax.lax.stop_gradient(h_d)
  if t.cl_positions == "all":
    window = t.cl_window or inputs.shape[1]
    h_d, h_n = h_d[:, -window:], h_n[:, -window:]  # rows are left-padded: the newest last
    b, length, d = h_d.shape
    real = (inputs[:, -window:] != 0).reshape(b * length)
    cl = sharded_losses.infonce_over_mesh(
        l2_normalize(h_d.reshape(b * length, d)), l2_normalize(h_n.reshape(b * length, d)), mesh,
        logit_scale=1.0 / t.cl_temperature, a_valid=real, b_valid=real,
        group_ids=jnp.repeat(jnp.arange(b, dtype=jnp.int32), length), impl=t.loss_impl)
  else:
    row_ok = inputs[:, -1] != 0
    cl = sharded_losses.infonce_over_mesh(
        l2_normalize(h_d[:, -1]), l2_normalize(h_n[:, -1]), mesh,
        logit_scale=1.0 / t.cl_temperature, a_valid=row_ok, b_valid=row_ok, impl=t.loss_impl)
  metrics["cl_loss"] = cl
  return rec_d + cl_weight * cl, metrics
