"""LOEV's loss: per head, SupCon over the views with the views that received the head's
augmentation excluded from the positives; the mean over heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmcl.losses import sharded as sharded_losses
from mmcl.models.layers import l2_normalize


def loev_loss(net, params, batch, mesh, *, temperature: float, loss_impl: str
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """audio [B, V, S], applied [B, V, K] bool → (mean over heads of SupCon, {"loss/<head>"}).

  Head 0: the views of a clip are positives. Head k: only if neither view received augmentation
  k (P^k_ij = P^0_ij [a_i^k = 0][a_j^k = 0]). net: `model.LOEVNet`.
  """
  audio = batch["audio"]
  b, v = audio.shape[0], audio.shape[1]
  feats = net.features(params, audio.reshape(b * v, -1))
  clip_ids = jnp.repeat(jnp.arange(b, dtype=jnp.int32), v)
  applied = batch["applied"].reshape(b * v, -1)
  losses, metrics = [], {}
  for h, z in enumerate(net.head_outputs(params, feats)):
    exclude = None if h == 0 else applied[:, h - 1]
    lh = sharded_losses.supcon_over_mesh(l2_normalize(z), mesh, logit_scale=1.0 / temperature,
                                         clip_ids=clip_ids, exclude=exclude, impl=loss_impl)
    metrics[f"loss/{net.head_names[h]}"] = lh
    losses.append(lh)
  return jnp.mean(jnp.stack(losses)), metrics
