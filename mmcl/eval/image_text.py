"""Image <-> text retrieval metrics from embeddings (the CLIP-style zero-shot retrieval eval).

Directions: "i2t" ranks all texts for each image, "t2i" ranks all images for each text. With
paired data (text i describes image i) the positive of query i is item i; with several captions
per image (COCO, Flickr30k: 5), `text_to_image[t]` names the image of text t, an image query's
positives are all its captions, and Recall@k asks whether *any* of them is in the top k (the
convention of the CLIP and ALIGN papers).

Scores are inner products; pass L2-normalised embeddings for cosine similarity.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from mmcl.eval import metrics as metrics_lib
from mmcl.eval import topk

DIRECTIONS = ("i2t", "t2i")


def _labels(num_images: int, num_texts: int, text_to_image: np.ndarray | None
            ) -> tuple[np.ndarray, np.ndarray]:
  """Image labels [N_img] and text labels [N_txt]: an image and a text match iff labels agree."""
  if text_to_image is None:
    if num_images != num_texts:
      raise ValueError(f"image_text: {num_images} images but {num_texts} texts; paired data needs "
                       "as many of each, or pass text_to_image [N_txt] (the image of each text)")
    return np.arange(num_images), np.arange(num_texts)
  text_to_image = np.asarray(text_to_image)
  if (text_to_image.shape != (num_texts,) or not np.issubdtype(text_to_image.dtype, np.integer)
      or text_to_image.min() < 0 or text_to_image.max() >= num_images):
    raise ValueError(f"image_text: text_to_image must be int [{num_texts}] in [0, {num_images}), "
                     f"got {text_to_image.dtype} {text_to_image.shape}")
  return np.arange(num_images), text_to_image


def _check(image_emb, text_emb):
  if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
    raise ValueError(f"image_text: expected image_emb [N_img, D] and text_emb [N_txt, D] with the "
                     f"same D, got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")


def image_text_retrieval_metrics(image_emb: jax.Array | np.ndarray,
                                 text_emb: jax.Array | np.ndarray,
                                 ks: Sequence[int] = (1, 5, 10), *,
                                 text_to_image: np.ndarray | None = None,
                                 mesh: Mesh | None = None, corpus_chunk: int = 8192,
                                 query_chunk: int = 1024) -> dict[str, float]:
  """Recall@k both ways, plus mean reciprocal rank and median / mean rank of the first positive.

  Computed from each query's exact rank over the whole corpus (`topk.positive_ranks`, ties to
  the lower index), so no top-k list is materialised and any k is exact.

  Args:
    image_emb: [N_img, D] float.
    text_emb: [N_txt, D] float; row i pairs with image i unless `text_to_image` is given.
    ks: Recall@k cutoffs.
    text_to_image: optional [N_txt] int, the image each text describes.
    mesh: optional mesh with a leading "data" axis; queries are sharded over it.
    corpus_chunk, query_chunk: see `topk.exact_topk`.

  Returns:
    For d in ("i2t", "t2i"): "d/recall@k" for each k, "d/mrr", "d/median_rank" and "d/mean_rank"
    (1-based), and "d/num_queries".
  """
  _check(image_emb, text_emb)
  image_labels, text_labels = _labels(image_emb.shape[0], text_emb.shape[0], text_to_image)
  if any(int(k) < 1 for k in ks):
    raise ValueError(f"image_text_retrieval_metrics: ks must be >= 1, got {tuple(ks)}")
  out = {}
  for direction, (q, q_labels, c, c_labels) in zip(DIRECTIONS, (
      (image_emb, image_labels, text_emb, text_labels),
      (text_emb, text_labels, image_emb, image_labels))):
    ranks = np.asarray(topk.positive_ranks(q, c, q_labels, c_labels, corpus_chunk=corpus_chunk,
                                           query_chunk=query_chunk, mesh=mesh))
    summary = metrics_lib.rank_metrics(ranks, ks)
    for k in ks:
      out[f"{direction}/recall@{k}"] = summary[f"recall@{k}"]
    for name in ("mrr", "median_rank", "mean_rank"):
      out[f"{direction}/{name}"] = summary[name]
    out[f"{direction}/num_queries"] = int(ranks.size)
  return out


@dataclasses.dataclass(frozen=True)
class Ranking:
  """Top-k retrieval of one direction with its judgments, ready for `metrics` and `trec`.

  Attributes:
    scores: [Q, k] float32, non-increasing.
    indices: [Q, k] int32 corpus indices.
    qrels: binary judgments of the Q queries.
  """
  scores: np.ndarray
  indices: np.ndarray
  qrels: metrics_lib.Qrels


def image_text_rankings(image_emb: jax.Array | np.ndarray, text_emb: jax.Array | np.ndarray,
                        k: int, *, text_to_image: np.ndarray | None = None,
                        mesh: Mesh | None = None, corpus_chunk: int = 8192,
                        query_chunk: int = 1024) -> dict[str, Ranking]:
  """Top-k lists and judgments both ways, for the full metric suite and TREC run files.

  Args:
    image_emb: [N_img, D] float.
    text_emb: [N_txt, D] float.
    k: list length per query (clipped to the corpus size).
    text_to_image, mesh, corpus_chunk, query_chunk: as in `image_text_retrieval_metrics`.

  Returns:
    {"i2t": Ranking over texts for each image, "t2i": Ranking over images for each text}.
  """
  _check(image_emb, text_emb)
  image_labels, text_labels = _labels(image_emb.shape[0], text_emb.shape[0], text_to_image)
  out = {}
  for direction, (q, q_labels, c, c_labels) in zip(DIRECTIONS, (
      (image_emb, image_labels, text_emb, text_labels),
      (text_emb, text_labels, image_emb, image_labels))):
    scores, indices = topk.exact_topk(q, c, min(k, c.shape[0]), corpus_chunk=corpus_chunk,
                                      query_chunk=query_chunk, mesh=mesh)
    out[direction] = Ranking(np.asarray(scores), np.asarray(indices),
                             metrics_lib.Qrels.from_labels(q_labels, c_labels))
  return out
