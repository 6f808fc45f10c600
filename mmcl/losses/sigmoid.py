"""The pairwise sigmoid loss of SigLIP (Zhai et al. 2023), with the same options as InfoNCE."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmcl.losses import collectives, kernels
from mmcl.losses.common import (DIAGONAL, check_ids, check_mask, check_pair, check_scalar,
                                check_weights, safe_ratio)


def sigmoid_loss(a: jax.Array, b: jax.Array, *, logit_scale: jax.Array | float,
                 logit_bias: jax.Array | float, weights: jax.Array | None = None,
                 a_valid: jax.Array | None = None, b_valid: jax.Array | None = None,
                 group_ids: jax.Array | None = None, impl: str = "auto",
                 block_size: int | None = None,
                 axis_name: collectives.AxisName = None) -> jax.Array:
  r"""SigLIP: every pair is an independent binary classification, pair i the only positive of row i.

  With z_ij = s · <a_i, b_j> + c over the global batch and y_ij = +1 if i = j else −1,

    L = Σ_i w_i [a_valid_i] Σ_{j ∈ A_i} −log σ(y_ij z_ij)  /  Σ_i w_i [a_valid_i],
    A_i = {j : b_valid_j, j = i or g_j ≠ g_i}

  (SigLIP's eq. 1: the sum over all pairs divided by the batch size when nothing is masked; this is
  open_clip's `SigLipLoss`). A row i with a_valid_i but not b_valid_i still contributes its
  negatives. `weights` scale every term of row i (design choice: the GCL weight of the pair whose
  a-side is the anchor). Duplicate groups remove pairs i ≠ j altogether. When no row is valid the
  loss is 0 with zero gradients.

  Args:
    a: [B, D] float; b: [B, D] float, same shape and dtype.
    logit_scale: [] float, s (pass exp(learned log-scale); differentiable).
    logit_bias: [] float, c (SigLIP initialises it at −10; differentiable).
    weights: [B] float ≥ 0 or None (all 1), per-row weights.
    a_valid, b_valid: [B] bool or None (all true), rows present on each side.
    group_ids: [B] or [B, K] int or None, duplicate groups as in `infonce`.
    impl, block_size, axis_name: as in `infonce`.

  Returns:
    [] float32, the loss.
  """
  where = "mmcl.losses.sigmoid_loss"
  n, _ = check_pair(a, b, where)
  scale = check_scalar(logit_scale, "logit_scale", where)
  bias = check_scalar(logit_bias, "logit_bias", where)
  weights = check_weights(weights, n, "weights", where)
  a_valid = check_mask(a_valid, n, "a_valid", where)
  b_valid = check_mask(b_valid, n, "b_valid", where)
  groups = None
  if group_ids is not None:
    groups = check_ids(group_ids, n, "group_ids", where, allow_2d=True).reshape(n, -1)

  layout = kernels.make_layout(n, valid_rows=a_valid, valid_cols=b_valid, groups=groups, impl=impl,
                               block_size=block_size, axis_name=axis_name, where=where)
  row_sums = kernels.sigmoid_row_sums(layout, a, collectives.gather(b, axis_name), scale, bias,
                                      rule=DIAGONAL)
  row_weights = jnp.where(a_valid, weights, 0.0)
  num = collectives.global_sum(jnp.sum(row_weights * row_sums), axis_name)
  den = collectives.global_sum(jnp.sum(row_weights), axis_name)
  return safe_ratio(num, den)
