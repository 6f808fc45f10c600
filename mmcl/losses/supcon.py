"""Supervised contrastive loss, "all" form (Khosla et al. 2020, L^sup_out), as LOEV uses it."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmcl.losses import collectives, kernels
from mmcl.losses.common import (SUPCON, check_embeddings, check_ids, check_mask, check_scalar,
                                finite_or_zero, safe_ratio)


def supcon(z: jax.Array, *, logit_scale: jax.Array | float, clip_ids: jax.Array,
           exclude: jax.Array | None = None, valid: jax.Array | None = None,
           impl: str = "auto", block_size: int | None = None,
           axis_name: collectives.AxisName = None) -> jax.Array:
  r"""SupCon over N views: the views of one clip attract, every other view repels.

  With s_ij = s · <z_i, z_j> (s = `logit_scale` = 1/τ) over the global set of views,

    P_ij = [clip_i = clip_j] [i ≠ j] [¬exclude_i] [¬exclude_j]      (positives of anchor i)
    ℓ_i = (1 / max(1, |P_i|)) Σ_j P_ij · −log( exp(s_ij) / Σ_{m ≠ i} exp(s_im) )
    L = mean_i ℓ_i

  (LOEV, arXiv:2412.18955: head k passes exclude = "augmentation k was applied"; head 0, none.)
  An anchor without positives contributes 0 but still counts in the mean. Views with valid = false
  take no part at all (not anchors, not in any denominator, not counted). When no view is valid the
  loss is 0 with zero gradients. `z` is used as given: L2-normalise it first for cosine similarity.

  Args:
    z: [N, D] float, all views (e.g. B clips × 2 views flattened).
    logit_scale: [] float, s (differentiable).
    clip_ids: [N] int, the clip each view comes from.
    exclude: [N] bool or None (all false), views that may not be positives of anything.
    valid: [N] bool or None (all true), views present.
    impl, block_size, axis_name: as in `infonce` (with `axis_name` the negatives and positives are
      gathered from all devices).

  Returns:
    [] float32, the loss.
  """
  where = "mmcl.losses.supcon"
  check_embeddings(z, "z", where)
  n = z.shape[0]
  scale = check_scalar(logit_scale, "logit_scale", where)
  clip_ids = check_ids(clip_ids, n, "clip_ids", where, allow_2d=False)
  exclude = check_mask(exclude, n, "exclude", where) if exclude is not None else None
  label_ok = jnp.ones((n,), jnp.bool_) if exclude is None else ~exclude
  valid = check_mask(valid, n, "valid", where)

  layout = kernels.make_layout(n, valid_rows=valid, valid_cols=valid, labels=clip_ids,
                               label_ok=label_ok, impl=impl, block_size=block_size,
                               axis_name=axis_name, where=where)
  stats = kernels.softmax_stats(layout, z, collectives.gather(z, axis_name), scale, rule=SUPCON,
                                want_pos=True)
  # Σ_j P_ij (lse_i − s_ij) / |P_i| = lse_i − (Σ_j P_ij s_ij) / |P_i|.
  has_pos = stats.pos_count > 0
  per_anchor = jnp.where(
      has_pos,
      finite_or_zero(stats.row_lse) - stats.pos_sum / jnp.maximum(stats.pos_count, 1.0),
      0.0)
  num = collectives.global_sum(jnp.sum(jnp.where(valid, per_anchor, 0.0)), axis_name)
  den = collectives.global_sum(jnp.sum(valid.astype(jnp.float32)), axis_name)
  return safe_ratio(num, den)
