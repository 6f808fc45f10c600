"""Contrastive losses: dense references, tiled kernels with memory linear in the batch, sharding.

  infonce(a, b, *, logit_scale, ...)                    symmetric CLIP / GCL loss
  sigmoid_loss(a, b, *, logit_scale, logit_bias, ...)   SigLIP
  multimodal_infonce(embeddings, valid, *, ...)         InfoNCE over modality pairs
  supcon(z, *, logit_scale, clip_ids, exclude, ...)     SupCon "all" form (LOEV)
  corpus_softmax(q, corpus, targets, *, logit_scale, ...)  softmax over a whole corpus (MMSRec)

Every loss takes impl in {"auto", "dense", "tiled", "fused"} ("fused": Pallas kernels, Triton on a
GPU, see fused.py; corpus_softmax has no fused kernel) and, inside `shard_map`, `axis_name` to use
every device's rows as negatives. `mmcl.losses.sharded` wraps them for arrays sharded over a mesh
(`infonce_over_mesh`, ..., `corpus_softmax_over_mesh` with the corpus split over the devices).
"""
from mmcl.losses.common import AUTO_TILED_MIN_LOGITS
from mmcl.losses.corpus import corpus_softmax
from mmcl.losses.infonce import infonce
from mmcl.losses.multimodal import multimodal_infonce
from mmcl.losses.sigmoid import sigmoid_loss
from mmcl.losses.supcon import supcon
from mmcl.losses import sharded  # noqa: E402,I001 (after the losses it wraps)

__all__ = ["AUTO_TILED_MIN_LOGITS", "corpus_softmax", "infonce", "multimodal_infonce", "sharded",
           "sigmoid_loss", "supcon"]
