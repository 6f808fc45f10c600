"""CLIP's evaluation: image→text and text→image Recall@k over the held-out pairs (pair i is the
positive), with TREC run and qrels files."""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np

from mmcl.eval import finite as finite_lib
from mmcl.eval import image_text as eval_lib
from mmcl.eval import trec as trec_lib
from mmcl.parallel import mesh as mesh_lib


def embed_pairs(towers, params, batches: Iterable[dict], mesh
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Embeds the valid rows of evaluation batches (image [b, H, W, C], text [b, L], index [b],
  valid [b] bool; b a multiple of the mesh's data axis) → (image_emb [N, D], text_emb [N, D],
  record index [N] int64) numpy."""
  sharding = mesh_lib.batch_sharding(mesh)
  rep = mesh_lib.replicated(mesh)
  embed_img = jax.jit(lambda p, x: towers.embed_images(p, x), out_shardings=rep)
  embed_txt = jax.jit(lambda p, x: towers.embed_texts(p, x), out_shardings=rep)
  imgs, txts, indices = [], [], []
  for batch in batches:
    valid = np.asarray(batch["valid"])
    x = jax.device_put(np.asarray(batch["image"]), sharding)
    y = jax.device_put(np.asarray(batch["text"]), sharding)
    imgs.append(np.asarray(embed_img(params, x))[valid])
    txts.append(np.asarray(embed_txt(params, y))[valid])
    indices.append(np.asarray(batch["index"])[valid])
  return np.concatenate(imgs), np.concatenate(txts), np.concatenate(indices)


def retrieval_metrics(img: np.ndarray, txt: np.ndarray, split: str, ks, mesh,
                      out_dir: str) -> dict[str, float]:
  """img, txt: [N, D] unit-norm embeddings of the N pairs of `split` → Recall@k in both
  directions, num_pairs, chance_recall@1; TREC run + qrels files (top-100 per query) into
  out_dir, for external tools."""
  finite_lib.require_scorable({f"image tower ({split} split)": img,
                               f"text tower ({split} split)": txt})
  metrics = eval_lib.image_text_retrieval_metrics(img, txt, ks=tuple(ks), mesh=mesh)
  metrics["num_pairs"] = float(img.shape[0])
  metrics["chance_recall@1"] = 1.0 / img.shape[0]
  rankings = eval_lib.image_text_rankings(img, txt, 100, mesh=mesh)
  for direction, r in rankings.items():
    trec_lib.write_run_and_qrels(out_dir, direction, r.indices, r.scores, r.qrels)
  return metrics
