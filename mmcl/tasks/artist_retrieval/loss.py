"""The artist-retrieval loss: multimodal InfoNCE over every modality pair, or multi-positive
InfoNCE over artists that are neighbours in the similarity graph."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmcl.losses import sharded as sharded_losses


def neighbour_matrix(artist: jax.Array, table: jax.Array) -> jax.Array:
  """Which batch rows are ground-truth neighbours of which (symmetrised).

  Args:
    artist: [B] int, global artist number of each row (catalogue index for SAS artists).
    table: [N, K] int32, table[i] = catalogue indices of artist i's neighbours allowed as
      positives (-1 = none); artists ≥ N have none.

  Returns:
    [B, B] bool, true where row j's artist is a listed neighbour of row i's or vice versa.
  """
  n = table.shape[0]
  artist = artist.astype(jnp.int32)
  inside = (artist >= 0) & (artist < n)
  nb = jnp.where(inside[:, None], table[jnp.clip(artist, 0, n - 1)], -1)  # [B, K]
  hit = jnp.any((nb[:, None, :] == artist[None, :, None]) & (nb[:, None, :] >= 0), axis=-1)
  same = artist[:, None] == artist[None, :]
  return (hit | hit.T) & ~same


def multi_positive_infonce(a: jax.Array, b: jax.Array, a_valid: jax.Array, b_valid: jax.Array,
                           artist: jax.Array, neighbours: jax.Array, *,
                           logit_scale: jax.Array | float,
                           neighbour_weight: float) -> tuple[jax.Array, jax.Array]:
  r"""Symmetric InfoNCE with the same artist and its neighbours as (weighted) positives.

  With z_ij = s·<a_i, b_j>, C^{ab}_i = {j : b_valid_j, j = i or artist_j ≠ artist_i} and weights
  w_ij = [j = i ∧ a_valid_i ∧ b_valid_i] + λ·neighbours_ij·[j ∈ C^{ab}_i],

    ℓ^{a→b}_i = −Σ_j w_ij (z_ij − logΣ_{k∈C^{ab}_i} exp z_ik) / Σ_j w_ij,
    anchors A = {i : a_valid_i, Σ_j w_ij > 0}; ℓ^{b→a} the same on zᵀ with the roles of a and b
    swapped (anchors B);
    L = (Σ_{i∈A} ℓ^{a→b}_i + Σ_{j∈B} ℓ^{b→a}_j) / (|A| + |B|).

  With λ = 0 and every row valid in both, this is `mmcl.losses.infonce` with group_ids = artist.

  Args:
    a, b: [B, D] float32, unit-norm embeddings of the two modalities.
    a_valid, b_valid: [B] bool availability.
    artist: [B] int, rows sharing a number are copies (kept out of each other's softmax).
    neighbours: [B, B] bool, `neighbour_matrix`.
    logit_scale: [] s = 1/τ.
    neighbour_weight: λ ≥ 0.

  Returns:
    ([] float32 loss (0 without anchors), [] float32 number of anchors |A| + |B|).
  """
  n = a.shape[0]
  z = logit_scale * (a.astype(jnp.float32) @ b.astype(jnp.float32).T)  # [B, B]
  eye = jnp.eye(n, dtype=bool)
  other = eye | (artist[:, None] != artist[None, :])
  both = a_valid & b_valid

  def direction(logits, q_valid, c_valid):
    cand = c_valid[None, :] & other
    w = (eye & both[:, None]).astype(jnp.float32)
    w = w + neighbour_weight * (neighbours & cand).astype(jnp.float32)
    lse = jax.nn.logsumexp(jnp.where(cand, logits, -1e30), axis=1)
    total_w = jnp.sum(w, axis=1)
    anchor = q_valid & (total_w > 0)
    per = -jnp.sum(w * (logits - lse[:, None]), axis=1) / jnp.maximum(total_w, 1e-12)
    return jnp.sum(jnp.where(anchor, per, 0.0)), jnp.sum(anchor.astype(jnp.float32))

  s_ab, c_ab = direction(z, a_valid, b_valid)
  s_ba, c_ba = direction(z.T, b_valid, a_valid)
  count = c_ab + c_ba
  return jnp.where(count > 0, (s_ab + s_ba) / jnp.maximum(count, 1.0), 0.0), count


def neighbour_loss(emb: dict[str, jax.Array], valid: dict[str, jax.Array], artist: jax.Array,
                   neighbour_table: jax.Array, scale: jax.Array, neighbour_weight: float
                   ) -> tuple[jax.Array, dict[str, tuple[jax.Array, jax.Array]]]:
  """The multi-positive loss over every modality pair: (loss, {"m:n": (L_mn, contributes)}).

  emb: m → [B, D]; valid: m → [B] bool; artist: [B] int32 catalogue numbers; neighbour_table:
  [N, K] int32 (`data.training_neighbours`). A pair contributes when it has ≥ 2 anchors over
  both directions; the loss is the mean over contributing pairs (as `multimodal_infonce`).
  """
  nb = neighbour_matrix(artist, neighbour_table)
  names = sorted(emb)
  total, count, per_pair = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), {}
  for i, m in enumerate(names):
    for n in names[i + 1:]:
      value, anchors = multi_positive_infonce(
          emb[m], emb[n], valid[m], valid[n], artist, nb, logit_scale=scale,
          neighbour_weight=neighbour_weight)
      contributes = anchors >= 2
      total = total + jnp.where(contributes, value, 0.0)
      count = count + contributes.astype(jnp.float32)
      per_pair[f"{m}:{n}"] = (value, contributes)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0), per_pair


def artist_loss(net, params, batch, rng: jax.Array, t, mesh, scale: jax.Array, *, train: bool,
                l2: dict[str, float], neighbour_table=None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The multimodal InfoNCE of one global batch ({m} [B, d_m], has_{m} [B], artist [B]) over
  every modality pair (task.positives = self), or the multi-positive loss (neighbours), plus
  coef·Σ‖kernel‖² of the projectors in `l2` (net: `model.ArtistProjectors`; t: the `task`
  config). Returns (loss, {"temperature", "pair/<m>_<n>", ...})."""
  keys = jax.random.split(rng, len(net.modalities))
  emb = {m: net.project(params, m, batch[m], train=train, rng=k)
         for m, k in zip(net.modalities, keys)}
  valid = {m: batch[f"has_{m}"] for m in net.modalities}
  metrics = {"temperature": 1.0 / scale}
  if t.positives == "self":
    loss, per_pair = sharded_losses.multimodal_infonce_over_mesh(
        emb, valid, mesh, logit_scale=scale, group_ids=batch["artist"], impl=t.loss_impl,
        return_pair_losses=True)
  else:
    loss, per_pair = neighbour_loss(emb, valid, batch["artist"], jnp.asarray(neighbour_table),
                                    scale, t.neighbour_weight)
  for name, (value, _) in per_pair.items():
    metrics[f"pair/{name.replace(':', '_')}"] = value  # 0: < 2 rows in the batch
  if l2:
    penalty = sum(c * sum(jnp.sum(jnp.square(w)) for w in
                          jax.tree.leaves(params["projectors"][m]) if w.ndim >= 2)
                  for m, c in l2.items())
    metrics["l2_penalty"] = penalty
    metrics["contrastive_loss"] = loss
    loss = loss + penalty
  return loss, metrics
