"""CLIP's loss: symmetric InfoNCE or SigLIP's sigmoid loss over the global batch, through the
sharded loss core."""

from __future__ import annotations

import jax

from mmcl.losses import sharded as sharded_losses


def clip_loss(embeddings: dict[str, jax.Array], logit_scale: jax.Array, mesh, *, kind: str,
              impl: str, logit_bias: jax.Array | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """embeddings: {"image": [B, D], "text": [B, D]} unit-norm, global batch → (loss,
  {"temperature", "logit_scale"}).

  kind "infonce": L = ½[CE(s·A·Bᵀ, I) + CE(s·B·Aᵀ, I)] (Radford et al. 2021);
  "sigmoid": L = −(1/B) Σ_ij log σ(z_ij (s·a_i·b_j + β)), z_ij = ±1 (Zhai et al. 2023).
  """
  img, txt = embeddings["image"], embeddings["text"]
  if kind == "infonce":
    loss = sharded_losses.infonce_over_mesh(img, txt, mesh, logit_scale=logit_scale, impl=impl)
  else:
    loss = sharded_losses.sigmoid_loss_over_mesh(img, txt, mesh, logit_scale=logit_scale,
                                                 logit_bias=logit_bias, impl=impl)
  return loss, {"temperature": 1.0 / logit_scale, "logit_scale": logit_scale}
