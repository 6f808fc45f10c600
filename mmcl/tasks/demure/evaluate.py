"""Demure's evaluation: next-item metrics of the original (and denoised) histories, and the
detection of planted noise by the contribution scores (ROC-AUC against the planted labels, flag
precision, scores pooled per (item, modality))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.eval import seqrec
from mmcl.losses.negatives import sample_train_negatives
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks.demure.loss import contributions, flag_lowest


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve of `scores` for binary `labels` (scikit-learn's `roc_auc_score`:
  tied scores count one half); NaN when one class is absent."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=g-import-not-at-top
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
  if labels.all() or not labels.any():
    return float("nan")
  return float(roc_auc_score(labels, scores))


def pool_by_item(scores: np.ndarray, items: np.ndarray, num_items: int) -> np.ndarray:
  """Mean score of every (item, modality) over its occurrences.

  scores: [R, L, M] float per-position scores; items: [R, L] int (0 = padding, ignored).
  Returns [N + 1, M] float32 (0 for items that never occur; row 0 = 0).
  """
  m = scores.shape[-1]
  real = items.reshape(-1) != 0
  flat_items, flat = items.reshape(-1)[real], scores.reshape(-1, m)[real]
  sums = np.zeros((num_items + 1, m), np.float64)
  np.add.at(sums, flat_items, flat)
  counts = np.bincount(flat_items, minlength=num_items + 1)[:, None]
  return (sums / np.maximum(counts, 1)).astype(np.float32)


def user_embeddings(net, params, history: np.ndarray, t, mesh, flags_fn=None) -> np.ndarray:
  """history: [U, L] → [U, d] outputs at the most recent position (net: `DemureNet`; t: the
  `task` config), of the original sequence, or with the modality tokens that flags_fn(history)
  → [U, L, M] bool flags removed (the denoised history, as in training)."""
  key = jax.random.PRNGKey(t.eval_seed)

  def fn(x):
    return net.last_output(params, x, key, None if flags_fn is None else flags_fn(x))
  return mesh_lib.embed_rows(jax.jit(fn, out_shardings=mesh_lib.replicated(mesh)), [history],
                             mesh, t.eval_batch_size)


class PositionScorer:
  """Contribution scores of whole training rows with fixed evaluation draws (negatives, planted
  noise): one compilation per score variant, the parameters an argument."""

  def __init__(self, net, t, mesh):
    self.net, self.t, self.mesh = net, t, mesh
    self._fns = {}  # (mode, normalisation, pooling, path steps) -> jitted scoring

  def __call__(self, params, inputs: np.ndarray, targets: np.ndarray, mode: str | None = None,
               normalisation: str | None = None, pooling: str = "none",
               path_steps: int | None = None) -> np.ndarray:
    """Contributions (`loss.contributions`; pooling over chunks of 256 rows) of the given rows.
    inputs, targets: [R, L] → [R, L, M] float32."""
    t = self.t
    variant = (mode or t.contribution, normalisation or t.score_normalisation, pooling,
               path_steps or t.contribution_path_steps)
    if variant not in self._fns:
      mode_, norm_, pool_, steps_ = variant

      def fn(p, x, y):
        seen = jnp.concatenate([x, y], axis=1)
        negs = sample_train_negatives(jax.random.PRNGKey(t.eval_seed), seen, y.shape,
                                      self.net.model.num_items, t.num_candidate_draws)
        c, _ = contributions(self.net, p, x, y, negs, t, mode_,
                             key=jax.random.PRNGKey(t.eval_seed + 1), normalisation=norm_,
                             pooling=pool_, path_steps=steps_)
        return c.reshape(c.shape[0], -1)
      self._fns[variant] = jax.jit(fn, out_shardings=mesh_lib.replicated(self.mesh))
    score = self._fns[variant]
    c = mesh_lib.embed_rows(lambda x, y: score(params, x, y), [inputs, targets], self.mesh, 256)
    return c.reshape(*inputs.shape, len(t.modalities))


def planted_labels(inputs: np.ndarray, t, planted: dict[str, np.ndarray]
                   ) -> tuple[int, np.ndarray, np.ndarray]:
  """inputs: [R, T] item ids (0 = padding); planted: modality → [N + 1] bool planted items →
  (j, valid, labels): j the planted modality's index; valid [R, T, M] bool the real (position,
  modality) pairs; labels [R, T, M] bool the planted ones."""
  j = list(t.modalities).index(t.plant_noise_modality)
  valid = np.broadcast_to((inputs != 0)[..., None], (*inputs.shape, len(t.modalities)))
  labels = np.zeros(valid.shape, bool)
  labels[..., j] = planted[t.plant_noise_modality][inputs]
  return j, valid, labels


def noise_detection(scorer: PositionScorer, params, inputs: np.ndarray, targets: np.ndarray,
                    planted: dict[str, np.ndarray], table_flags=None) -> dict[str, float]:
  """Detection of the planted noise over the training rows' (inputs, targets: [R, L]) real (t, m)
  pairs: AUC of −c against the planted labels and flag precision (share of flagged pairs that
  are planted), for per-position scores ("abs" and "signed"), for those scores averaged per
  (item, modality) over all occurrences ("_item"), and for the `task.item_scores` table when
  table_flags = (table [N + 1, M], flags [R, L, M] bool, the flags training uses) is given
  ("_table")."""
  t, num_items = scorer.t, scorer.net.model.num_items
  j, valid, labels = planted_labels(inputs, t, planted)
  out = {"noise/planted_share": float(labels[valid].mean())}

  def detection(c, tag, flags=None):
    if flags is None:
      flags = np.asarray(flag_lowest(jnp.asarray(c.reshape(len(c), -1)),
                                     jnp.asarray(valid.reshape(len(c), -1)),
                                     t.noise_fraction)).reshape(c.shape)
    out[f"noise/auc{tag}"] = roc_auc(-c[valid], labels[valid])
    out[f"noise/auc_within_{t.plant_noise_modality}{tag}"] = roc_auc(
        -c[..., j][valid[..., j]], labels[..., j][valid[..., j]])
    out[f"noise/flag_precision{tag}"] = (float(labels[flags].mean()) if flags.any()
                                         else float("nan"))
  for mode in ("abs", "signed"):
    c = scorer(params, inputs, targets, mode)
    tag = "" if mode == t.contribution else f"_{mode}"
    detection(c, tag)
    detection(pool_by_item(c, inputs, num_items)[inputs], f"{tag}_item")
  if table_flags is not None:
    table, flags = table_flags
    detection(table[inputs], "_table", flags)
  return out


def next_item_metrics(net, params, user_items: list[np.ndarray], t, mesh, max_len: int,
                      denoise_flags_fn=None) -> dict[str, float]:
  """Next-item metrics of every split in `task.eval_splits` ("<split>/..."), and with
  denoise_flags_fn (items [U, L] → flags [U, L, M], from the `task.item_scores` table) those of
  the denoised history too ("<split>_denoised/..."; which of the two is used is chosen on the
  validation split)."""
  item_emb = np.asarray(net.item_table(params))
  out = {}
  for split in t.eval_splits:
    users, history, target = seqrec.eval_cases(user_items, split, max_len)
    for flags_fn in (None, denoise_flags_fn) if denoise_flags_fn is not None else (None,):
      q = user_embeddings(net, params, history, t, mesh, flags_fn)
      out.update(seqrec.next_item_metrics(
          q, item_emb, target, [user_items[u] for u in users], ks=t.eval_ks,
          num_negatives=t.eval_num_negatives, max_users=t.eval_max_users, seed=t.eval_seed,
          full_ranking=t.eval_full_ranking, mesh=mesh,
          prefix=split if flags_fn is None else f"{split}_denoised"))
  return out
