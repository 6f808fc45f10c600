"""Symmetric InfoNCE (the CLIP loss), with pair weights, missing rows and duplicate groups."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmcl.losses import collectives, kernels
from mmcl.losses.common import (DIAGONAL, check_ids, check_mask, check_pair, check_scalar,
                                check_weights, finite_or_zero, safe_ratio)


def infonce(a: jax.Array, b: jax.Array, *, logit_scale: jax.Array | float,
            weights: jax.Array | None = None, a_valid: jax.Array | None = None,
            b_valid: jax.Array | None = None, group_ids: jax.Array | None = None,
            impl: str = "auto", block_size: int | None = None,
            axis_name: collectives.AxisName = None) -> jax.Array:
  r"""Symmetric InfoNCE: the mean of the a→b and b→a cross-entropies, pair i being the positive.

  With logits z_ij = s · <a_i, b_j> (s = `logit_scale`) over the global batch,

    ℓ^{a→b}_i = −z_ii + log Σ_{j ∈ C_i} exp(z_ij),   C_i = {j : b_valid_j, j = i or g_j ≠ g_i}
    ℓ^{b→a}_i = −z_ii + log Σ_{j ∈ R_i} exp(z_ji),   R_i = {j : a_valid_j, j = i or g_j ≠ g_i}
    L = Σ_{i ∈ V} w_i · ½(ℓ^{a→b}_i + ℓ^{b→a}_i) / Σ_{i ∈ V} w_i,   V = {i : a_valid_i ∧ b_valid_i}

  ("g_j ≠ g_i": no duplicate-group id in common, see `group_ids`). With no options this is CLIP's
  loss (open_clip's `ClipLoss`); with `weights` it is GCL's weighted loss (GCL eq. for L). A row
  with a_valid false takes no part at all (neither anchor nor negative); likewise b_valid. When no
  pair is valid the loss is 0 with zero gradients.

  Args:
    a: [B, D] float, e.g. image (or query) embeddings, usually L2-normalised.
    b: [B, D] float, the paired text (or document) embeddings; same shape and dtype.
    logit_scale: [] float, the multiplier s = 1/τ (pass exp(learned log-scale); differentiable).
    weights: [B] float ≥ 0 or None (all 1), per-pair weights.
    a_valid: [B] bool or None (all true), rows of `a` that are present.
    b_valid: [B] bool or None (all true), rows of `b` that are present.
    group_ids: [B] or [B, K] int or None. Pairs i ≠ j sharing an id ≥ 0 (in any of the K columns,
      e.g. K = 2 for query id and document id) are removed from each other's denominators in both
      directions; negative ids match nothing.
    impl: "dense" (the [B, B] logits in memory), "tiled" (memory linear in B, plain XLA), "fused"
      (the same tiles in Pallas kernels, see losses/fused.py: Triton on a GPU, interpret mode
      elsewhere, exact but slow), or "auto" (dense up to common.AUTO_TILED_MIN_LOGITS logits per
      device; above, fused on a GPU and tiled on any other backend).
    block_size: tile edge (None: common.default_block_size() for "tiled", fused.default_tile(D)
      for "fused", which needs a power of two ≥ 16).
    axis_name: when called inside `shard_map`, the mesh axis (or axes) the batch is split over; the
      arguments are then the local shards and the loss uses every device's rows as negatives.
      Gradients are exact whether taken outside the `shard_map` or inside it (tested with the
      default check_vma=True). The result is the global loss, identical on every device.

  Returns:
    [] float32, the loss.
  """
  where = "mmcl.losses.infonce"
  n, _ = check_pair(a, b, where)
  scale = check_scalar(logit_scale, "logit_scale", where)
  weights = check_weights(weights, n, "weights", where)
  a_valid = check_mask(a_valid, n, "a_valid", where)
  b_valid = check_mask(b_valid, n, "b_valid", where)
  groups = None
  if group_ids is not None:
    groups = check_ids(group_ids, n, "group_ids", where, allow_2d=True)
    groups = groups.reshape(n, -1)

  layout = kernels.make_layout(n, valid_rows=a_valid, valid_cols=b_valid, groups=groups, impl=impl,
                               block_size=block_size, axis_name=axis_name, where=where)
  # One logit block [B_l, B_g] gives both directions: its rows are the local a→b softmaxes; its
  # columns hold this device's share of every b→a softmax, merged across devices below. The
  # mask a_valid_i ∧ b_valid_j ∧ (group rule) serves both directions.
  stats = kernels.softmax_stats(layout, a, collectives.gather(b, axis_name), scale, rule=DIAGONAL,
                                want_cols=True)
  col_lse = collectives.merge_partial_lse(stats.col_lse, axis_name)
  col_lse = collectives.local_slice(col_lse, n, axis_name)

  positive = scale * jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=-1)  # z_ii
  pair_ok = a_valid & b_valid
  per_pair = 0.5 * (finite_or_zero(stats.row_lse) + finite_or_zero(col_lse)) - positive
  pair_weights = jnp.where(pair_ok, weights, 0.0)
  num = collectives.global_sum(jnp.sum(jnp.where(pair_ok, pair_weights * per_pair, 0.0)),
                               axis_name)
  den = collectives.global_sum(jnp.sum(pair_weights), axis_name)
  return safe_ratio(num, den)
