"""The full-ranking protocol: rank the whole corpus for each query, then score the lists.

Model-agnostic: it takes query and corpus embeddings (e.g. users and items, or one modality and
another) and judgments; `metrics.sampled_negative_metrics` is the sampled-negative counterpart.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from mmcl.eval import metrics as metrics_lib
from mmcl.eval import topk


@dataclasses.dataclass(frozen=True)
class FullRankingResult:
  """Attributes:
    metrics: {metric name: mean over judged queries}.
    per_query: {metric name: [Q] float64} (run-level metrics such as coverage excluded).
    scores: [Q, K] float32 top-K scores.
    ranked: [Q, K] int32 corpus indices (-1 where fewer than K items were eligible).
  """
  metrics: dict[str, float]
  per_query: dict[str, np.ndarray]
  scores: np.ndarray
  ranked: np.ndarray


def _cutoff(metric: str) -> int:
  _, k, p = metrics_lib.parse_metric(metric)
  if k is None:
    # RBP: deep enough that the unseen ranks' total weight p^K is below 1e-6.
    return math.ceil(math.log(1e-6) / math.log(p))
  return k


def full_ranking_metrics(queries: jax.Array | np.ndarray, corpus: jax.Array | np.ndarray,
                         qrels: metrics_lib.Qrels, metrics: Sequence[str], *,
                         k: int | None = None, exclude: np.ndarray | None = None,
                         max_rel: float | None = None, mesh: Mesh | None = None,
                         corpus_chunk: int = 8192, query_chunk: int = 1024
                         ) -> FullRankingResult:
  """Exact top-K over the whole corpus, then the named metrics of `mmcl.eval.metrics`.

  Args:
    queries: [Q, D] float.
    corpus: [N, D] float.
    qrels: judgments of the Q queries over corpus indices.
    metrics: names such as "recall@10", "ndcg@10", "map@100", "rbp.8", "coverage@10".
    k: list length K; defaults to the largest cutoff among `metrics` ("rbp.p" asks for the
      depth where p^K < 1e-6), clipped to N.
    exclude: optional [Q, E] int items to filter out per query (already-seen items), -1 padded;
      None ranks everything.
    max_rel: top grade for ERR.
    mesh, corpus_chunk, query_chunk: see `topk.exact_topk`.

  Returns:
    A FullRankingResult (the lists are kept for TREC run files).
  """
  num_corpus = int(np.shape(corpus)[0])
  if k is None:
    k = max(_cutoff(m) for m in metrics)
  k = min(k, num_corpus)
  scores, ranked = topk.exact_topk(queries, corpus, k, exclude=exclude, mesh=mesh,
                                   corpus_chunk=corpus_chunk, query_chunk=query_chunk)
  scores, ranked = np.asarray(scores), np.asarray(ranked)
  run_level = [m for m in metrics if metrics_lib.parse_metric(m)[0] == "coverage"]
  per_query = metrics_lib.per_query_metrics(
      ranked, qrels, [m for m in metrics if m not in run_level], max_rel=max_rel)
  summary = {}
  for metric in metrics:
    if metric in run_level:
      summary[metric] = metrics_lib.coverage_at_k(ranked, metrics_lib.parse_metric(metric)[1],
                                                  num_corpus)
    else:
      summary[metric] = metrics_lib.mean_over_judged(per_query[metric])
  return FullRankingResult(summary, per_query, scores, ranked)
