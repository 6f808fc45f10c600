"""MMSRec's losses: the combinatorial contrastive pretraining loss, the cloze fine-tuning loss
(full softmax over every item through the loss core) and the validation Recall@10."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.losses import sharded as sharded_losses
from mmcl.models.layers import l2_normalize

CONTRASTED_VIEWS = (("v1", "v2"), ("v1", "t1"), ("t1", "t2"), ("vt1", "vt2"))


def pretrain_loss(net, params, items: jax.Array, rng: jax.Array, mesh, *, temperature: float,
                  train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """items: [B, L] → the mean of symmetric InfoNCE over (v1, v2), (v1, t1), (t1, t2), (vt1, vt2):
  each sequence encoded as first-modality-only ("v"), last-modality-only ("t") and both ("vt"),
  twice each (different dropout), at the most recent position, τ = temperature, negatives the
  global batch. net: `model.MMSRecNet`."""
  m = len(net.features)
  views = {"v": tuple(j == 0 for j in range(m)), "t": tuple(j == m - 1 for j in range(m)),
           "vt": (True,) * m}
  keys = jax.random.split(rng, 6)
  reps, k = {}, 0
  for name, on in views.items():
    for copy in (1, 2):
      h = net.encode_sequences(params, items, None, modality_on=on, train=train, rng=keys[k])
      reps[f"{name}{copy}"] = l2_normalize(h[:, -1])
      k += 1
  valid = items[:, -1] != 0
  terms = [sharded_losses.infonce_over_mesh(reps[a], reps[b], mesh, logit_scale=1.0 / temperature,
                                            a_valid=valid, b_valid=valid)
           for a, b in CONTRASTED_VIEWS]
  loss = sum(terms) / len(terms)
  return loss, {f"cl_{a}_{b}": v for (a, b), v in zip(CONTRASTED_VIEWS, terms)}


def cloze_loss(net, params, labels: jax.Array, items: jax.Array, rng: jax.Array, mesh,
               cold: np.ndarray, t, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cloze: at the masked positions (labels [B, L] > 0, plus always the most recent one) of the
  original items [B, L], cross-entropy of cos(h_t, item_tower(i)) / τ over every item i that is
  neither padding nor held out (cold [N + 1] bool). t: the `task` config (temperature, loss_impl,
  loss_block_size). Returns (loss, {"masked_per_row", "train_recall@10"})."""
  k_seq, k_item = jax.random.split(rng)
  masked = (labels > 0) & (items != 0)
  masked = masked.at[:, -1].set(items[:, -1] != 0)  # always the most recent position
  h = l2_normalize(net.encode_sequences(params, items, masked, train=train, rng=k_seq))
  cand = net.item_tower(params, train=train, rng=k_item)  # [N + 1, d]
  allowed = ~jnp.asarray(cold).at[0].set(True)  # not padding, not held out
  # Full softmax over all items through the loss core: the item table is split over the mesh's
  # data axis, the masked positions' queries are replicated (see mmcl.losses.corpus).
  loss, rank = sharded_losses.corpus_softmax_over_mesh(
      h.reshape(-1, h.shape[-1]), cand, items.reshape(-1), mesh,
      logit_scale=1.0 / t.temperature, valid=masked.reshape(-1), corpus_valid=allowed,
      impl=t.loss_impl, block_size=t.loss_block_size, return_ranks=True)
  w = masked.astype(jnp.float32)
  hit = (rank.reshape(masked.shape) < 10) * w
  return loss, {"masked_per_row": w.sum(1).mean(),
                "train_recall@10": hit.sum() / jnp.maximum(w.sum(), 1.0)}


def validation_recall(net, params, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Full-ranking Recall@10 of the next item of validation rows (history [B, L], target [B],
  valid [B]): (−recall, {"recall@10"})."""
  q = net.query(params, batch["history"])
  scores = q @ net.item_tower(params).T
  scores = scores.at[:, 0].set(-jnp.inf)
  tscore = jnp.take_along_axis(scores, batch["target"][:, None], 1)[:, 0]
  rank = (scores > tscore[:, None]).sum(1)
  w = batch["valid"].astype(jnp.float32)
  recall = ((rank < 10) * w).sum() / jnp.maximum(w.sum(), 1.0)
  return -recall, {"recall@10": recall}
