"""GCL's reference evaluation: relevance grades from scores, the sampled test queries, the graded
metrics (options of `mmcl.eval.metrics`) and the split's judgments."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmcl.eval import metrics as metrics_lib


def relevance_grades(score_linear: np.ndarray) -> np.ndarray:
  """rel = int((w − min w)/(max w − min w) · 99 + 1), 1..100; all 1 when w is constant.

  Args:
    score_linear: [M] float, the split's rows.

  Returns:
    [M] int64.
  """
  w = np.asarray(score_linear, np.float64)
  lo, hi = w.min(initial=np.inf), w.max(initial=-np.inf)
  if w.size == 0 or hi <= lo:
    return np.ones(w.shape, np.int64)
  return ((w - lo) / (hi - lo) * 99 + 1).astype(np.int64)


def sample_eval_queries(rel_sum: np.ndarray, num: int, seed: int) -> np.ndarray:
  """Indices of `min(num, Q)` queries drawn without replacement, P ∝ summed rel; sorted by
  decreasing summed rel (the reference's `get_test_queries`).

  Args:
    rel_sum: [Q] float > 0.
  """
  rel_sum = np.asarray(rel_sum, np.float64)
  num = min(num, rel_sum.size)
  rng = np.random.default_rng(seed)
  chosen = rng.choice(rel_sum.size, size=num, replace=False, p=rel_sum / rel_sum.sum())
  return chosen[np.argsort(-rel_sum[chosen], kind="stable")]


def gcl_metrics(ranked: np.ndarray, qrels: metrics_lib.Qrels, *, ndcg_k: int = 10,
                cutoff: int = 1000, rbp_ps: Sequence[float] = (0.7, 0.8, 0.9)
                ) -> dict[str, np.ndarray]:
  """Per-query metrics of the GCL reference evaluation.

  Args:
    ranked: [Q, K] int corpus indices, best first, -1 = padding.
    qrels: graded judgments (rel ≥ 1 for judged documents).
    ndcg_k: NDCG cutoff (10).
    cutoff: mAP / MRR cutoff (1000; clipped to K).
    rbp_ps: RBP persistences.

  Returns:
    {"ndcg@10", "map@1000", "mrr@1000", "err", "rbp.7", "rbp.8", "rbp.9"}: [Q] float64 each
    (names follow the arguments). ERR and RBP run over the whole list of K documents.
  """
  ranked = np.asarray(ranked)
  k = ranked.shape[1]
  out = {f"ndcg@{ndcg_k}": metrics_lib.ndcg_at_k(ranked, qrels, min(ndcg_k, k), gain="linear"),
         f"map@{cutoff}": metrics_lib.map_at_k(ranked, qrels, min(cutoff, k)),
         f"mrr@{cutoff}": metrics_lib.mrr_at_k(ranked, qrels, min(cutoff, k)),
         "err": metrics_lib.err_at_k(ranked, qrels, k, max_rel="per_query")}
  for p in rbp_ps:
    out[f"rbp.{str(p).split('.')[1]}"] = metrics_lib.rbp(ranked, qrels, p, graded=True)
  return out


class SplitTable:
  """The distinct queries and documents of one split and its graded judgments.

  Attributes:
    query_ids: [Q] str; query_rows: [Q] int64, a record index holding each query.
    doc_ids: [N] str; doc_rows: [N] int64, a record index holding each document.
    pairs: [M, 2] int64 (query, document) indices of the split's rows; rel: [M] int64 grades.
  """

  def __init__(self, source):
    recs = source.read_many(list(range(len(source))))
    q_index: dict[str, int] = {}
    d_index: dict[str, int] = {}
    q_rows, d_rows, pairs, scores = [], [], [], []
    for r in recs:
      if r is None:  # skipped bad record
        continue
      q = q_index.setdefault(r["query_id"], len(q_index))
      if q == len(q_rows):
        q_rows.append(r["index"])
      d = d_index.setdefault(r["product_id"], len(d_index))
      if d == len(d_rows):
        d_rows.append(r["index"])
      pairs.append((q, d))
      scores.append(r["score_linear"])
    if not pairs:
      raise ValueError(f"split {source.split!r} has no readable rows")
    self.query_ids = np.asarray(list(q_index), object)
    self.doc_ids = np.asarray(list(d_index), object)
    self.query_rows = np.asarray(q_rows, np.int64)
    self.doc_rows = np.asarray(d_rows, np.int64)
    self.pairs = np.asarray(pairs, np.int64)
    self.rel = relevance_grades(np.asarray(scores))

  def qrels(self, queries: np.ndarray, top_k: int) -> metrics_lib.Qrels:
    """Judgments of `queries` (indices): each query's `top_k` documents by rel (rel ≥ 1)."""
    per_query: dict[int, list[tuple[int, int]]] = {}
    for (q, d), rel in zip(self.pairs.tolist(), self.rel.tolist()):
      per_query.setdefault(q, []).append((d, rel))
    rows = []
    for q in queries.tolist():
      judged = sorted(per_query[q], key=lambda x: -x[1])[:top_k]
      row: dict[int, float] = {}
      for d, rel in judged:  # a duplicated (query, document) row keeps its best grade
        row[d] = max(row.get(d, 0), rel)
      rows.append(row)
    return metrics_lib.Qrels.from_dict(rows)
