"""Ranking metrics over ranked item ids and relevance judgments (pure numpy).

Conventions shared by every metric here:

* A **run** is `ranked: [Q, K] int`, the corpus indices retrieved for each of Q queries, best first.
  Entries equal to -1 are padding (fewer than K items retrieved) and never count as relevant.
* **Judgments** are a `Qrels` (below): for each query, the judged corpus items and their grade
  `rel >= 0`. Grades may be binary (0/1) or graded (0, 1, 2, ...). An item is *relevant* when its
  grade is > 0; unjudged items have grade 0.
* Ranks are 1-based in the formulas: `rel_r` is the grade of the item at rank r,
  `h_r = [rel_r > 0]`, and `R` is the number of relevant items of the query (grade > 0,
  retrieved or not).
* Per-query functions return `[Q] float64`, with **NaN for queries that have no relevant item**
  (their metric is undefined); `evaluate` and `by_bucket` average over the defined values. (ranx
  and trec_eval average over the queries listed in the qrels; the two agree whenever every judged
  query has a relevant item.)

The tests check the definitions against trec_eval (pytrec_eval: recall, P, success, map_cut,
ndcg_cut, recip_rank) and ranx (ndcg_burges, mrr, rbp) computed from TREC files written by
`mmcl.eval.trec`.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Qrels:
  """Relevance judgments of Q queries over corpus items, in compressed-row form.

  The judged items of query q are `items[indptr[q]:indptr[q + 1]]` with grades
  `rels[indptr[q]:indptr[q + 1]]`. Query q is row q of every run evaluated against it.
  Build one with `from_dict`, `from_dense`, `from_positives` or `from_labels`.

  Attributes:
    indptr: [Q + 1] int64, non-decreasing, indptr[0] == 0.
    items: [nnz] int64 corpus indices (>= 0), unique within a query.
    rels: [nnz] float64 grades (>= 0).
  """
  indptr: np.ndarray
  items: np.ndarray
  rels: np.ndarray

  def __post_init__(self):
    indptr = np.asarray(self.indptr, np.int64)
    items = np.asarray(self.items, np.int64)
    rels = np.asarray(self.rels, np.float64)
    if indptr.ndim != 1 or indptr.size < 1 or indptr[0] != 0 or np.any(np.diff(indptr) < 0):
      raise ValueError(f"Qrels.indptr: expected [Q + 1] non-decreasing from 0, got {indptr!r}")
    if items.shape != rels.shape or items.shape != (indptr[-1],):
      raise ValueError(
          f"Qrels: expected items and rels of shape [{indptr[-1]}] (indptr[-1]), "
          f"got items {items.shape} and rels {rels.shape}")
    if np.any(items < 0):
      raise ValueError(f"Qrels.items: expected corpus indices >= 0, found {items.min()}")
    if not np.all(np.isfinite(rels)) or np.any(rels < 0):
      raise ValueError("Qrels.rels: expected finite grades >= 0, found negative or non-finite ones")
    keys = _pair_keys(np.repeat(np.arange(indptr.size - 1), np.diff(indptr)), items,
                      int(items.max(initial=0)) + 1)
    if np.unique(keys).size != keys.size:
      raise ValueError("Qrels: an item is judged twice for the same query")
    object.__setattr__(self, "indptr", indptr)
    object.__setattr__(self, "items", items)
    object.__setattr__(self, "rels", rels)

  @property
  def num_queries(self) -> int:
    return self.indptr.size - 1

  @property
  def query_of_entry(self) -> np.ndarray:
    """[nnz] int64: the query each judgment belongs to."""
    return np.repeat(np.arange(self.num_queries), np.diff(self.indptr))

  @property
  def num_relevant(self) -> np.ndarray:
    """[Q] int64: R, the number of items with grade > 0 per query."""
    return np.bincount(self.query_of_entry[self.rels > 0], minlength=self.num_queries)

  @classmethod
  def from_dict(cls, judgments: Mapping[int, Mapping[int, float]] | Sequence[Mapping[int, float]],
                num_queries: int | None = None) -> Qrels:
    """From `{query_index: {item_index: grade}}` (or a list indexed by query).

    Args:
      judgments: grades per query; queries absent from a mapping have no judgments.
      num_queries: Q; defaults to 1 + the largest query index (or len of a sequence).
    """
    if isinstance(judgments, Mapping):
      pairs = dict(judgments)
      if num_queries is None:
        num_queries = 1 + max(pairs, default=-1)
    else:
      pairs = dict(enumerate(judgments))
      if num_queries is None:
        num_queries = len(judgments)
    bad = [q for q in pairs if not 0 <= int(q) < num_queries]
    if bad:
      raise ValueError(f"Qrels.from_dict: query indices {bad[:5]} outside [0, {num_queries})")
    counts = np.zeros(num_queries, np.int64)
    items, rels = [], []
    for q in range(num_queries):
      row = pairs.get(q, {})
      counts[q] = len(row)
      items.extend(int(i) for i in row)
      rels.extend(float(r) for r in row.values())
    return cls(np.concatenate([[0], np.cumsum(counts)]), np.asarray(items, np.int64),
               np.asarray(rels, np.float64))

  @classmethod
  def from_dense(cls, grades: np.ndarray) -> Qrels:
    """From a dense grade matrix `grades: [Q, N]` (0 = not relevant; zeros are not stored)."""
    grades = np.asarray(grades)
    if grades.ndim != 2:
      raise ValueError(f"Qrels.from_dense: expected grades [Q, N], got shape {grades.shape}")
    q, items = np.nonzero(grades)
    counts = np.bincount(q, minlength=grades.shape[0])
    return cls(np.concatenate([[0], np.cumsum(counts)]), items, grades[q, items])

  @classmethod
  def from_positives(cls, positives: np.ndarray) -> Qrels:
    """Binary judgments from positive item indices.

    Args:
      positives: [Q] int (one positive per query) or [Q, P] int padded with -1.
    """
    positives = np.asarray(positives)
    if positives.ndim == 1:
      positives = positives[:, None]
    if positives.ndim != 2 or not np.issubdtype(positives.dtype, np.integer):
      raise ValueError(
          f"Qrels.from_positives: expected int [Q] or [Q, P], got {positives.dtype} "
          f"{positives.shape}")
    valid = positives >= 0
    return cls(np.concatenate([[0], np.cumsum(valid.sum(1))]), positives[valid],
               np.ones(int(valid.sum())))

  @classmethod
  def from_labels(cls, query_labels: np.ndarray, corpus_labels: np.ndarray) -> Qrels:
    """Binary judgments: item j is relevant to query q iff `query_labels[q] == corpus_labels[j]`.

    Args:
      query_labels: [Q] int.
      corpus_labels: [N] int.
    """
    query_labels = np.asarray(query_labels).reshape(-1)
    corpus_labels = np.asarray(corpus_labels).reshape(-1)
    order = np.argsort(corpus_labels, kind="stable")
    sorted_labels = corpus_labels[order]
    lo = np.searchsorted(sorted_labels, query_labels, "left")
    hi = np.searchsorted(sorted_labels, query_labels, "right")
    items = np.concatenate([order[a:b] for a, b in zip(lo, hi)]) if len(lo) else np.zeros(0, int)
    return cls(np.concatenate([[0], np.cumsum(hi - lo)]), items, np.ones(items.size))

  def to_dict(self) -> list[dict[int, float]]:
    """[{item_index: grade}] per query, the inverse of `from_dict`."""
    return [dict(zip(self.items[a:b].tolist(), self.rels[a:b].tolist()))
            for a, b in zip(self.indptr[:-1], self.indptr[1:])]


def _pair_keys(queries: np.ndarray, items: np.ndarray, stride: int) -> np.ndarray:
  """Unique int64 key per (query, item) pair; items must be in [0, stride)."""
  return queries.astype(np.int64) * np.int64(stride) + items.astype(np.int64)


def _check_run(ranked: np.ndarray, qrels: Qrels, k: int | None = None) -> np.ndarray:
  ranked = np.asarray(ranked)
  if ranked.ndim != 2 or not np.issubdtype(ranked.dtype, np.integer):
    raise ValueError(
        f"ranked: expected int [Q, K] corpus indices, got {ranked.dtype} {ranked.shape}")
  if ranked.shape[0] != qrels.num_queries:
    raise ValueError(
        f"ranked has {ranked.shape[0]} queries (rows) but qrels judges {qrels.num_queries}")
  if k is not None and not 1 <= k <= ranked.shape[1]:
    raise ValueError(f"k={k}: expected 1 <= k <= K={ranked.shape[1]} (pad short runs with -1)")
  return ranked


def ranked_grades(ranked: np.ndarray, qrels: Qrels) -> np.ndarray:
  """Grade of each retrieved item.

  Args:
    ranked: [Q, K] int corpus indices, -1 = padding.
    qrels: judgments of the Q queries.

  Returns:
    [Q, K] float64: `rel` of `ranked[q, r]` for query q (0 for unjudged items and padding).
  """
  ranked = _check_run(ranked, qrels)
  num_q, num_k = ranked.shape
  if qrels.items.size == 0:
    return np.zeros((num_q, num_k))
  stride = int(max(qrels.items.max(initial=0), ranked.max(initial=0))) + 1
  keys = _pair_keys(qrels.query_of_entry, qrels.items, stride)
  order = np.argsort(keys)
  keys, rels = keys[order], qrels.rels[order]
  run_keys = _pair_keys(np.repeat(np.arange(num_q), num_k), np.maximum(ranked.reshape(-1), 0),
                        stride)
  pos = np.minimum(np.searchsorted(keys, run_keys), keys.size - 1)
  found = (keys[pos] == run_keys) & (ranked.reshape(-1) >= 0)
  return np.where(found, rels[pos], 0.0).reshape(num_q, num_k)


def ideal_grades(qrels: Qrels, k: int) -> np.ndarray:
  """[Q, k] float64: each query's grades sorted in decreasing order, zero-padded to k."""
  out = np.zeros((qrels.num_queries, k))
  q = qrels.query_of_entry
  order = np.lexsort((-qrels.rels, q))
  q, rels = q[order], qrels.rels[order]
  pos = np.arange(q.size) - qrels.indptr[q]
  keep = pos < k
  out[q[keep], pos[keep]] = rels[keep]
  return out


def _undefined_to_nan(values: np.ndarray, qrels: Qrels) -> np.ndarray:
  return np.where(qrels.num_relevant > 0, values, np.nan)


def _hits(ranked: np.ndarray, qrels: Qrels, k: int) -> np.ndarray:
  """[Q, k] float64: h_r = 1 if the item at rank r <= k is relevant."""
  ranked = _check_run(ranked, qrels, k)
  return (ranked_grades(ranked[:, :k], qrels) > 0).astype(np.float64)


def recall_at_k(ranked: np.ndarray, qrels: Qrels, k: int) -> np.ndarray:
  """Recall@k = (1/R) sum_{r<=k} h_r: the fraction of the query's relevant items in its top k.

  Args:
    ranked: [Q, K] int corpus indices, best first, -1 = padding; K >= k.
    qrels: judgments of the Q queries.
    k: cutoff.

  Returns:
    [Q] float64, NaN where R = 0.
  """
  hits = _hits(ranked, qrels, k).sum(1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return _undefined_to_nan(hits / qrels.num_relevant, qrels)


def hit_rate_at_k(ranked: np.ndarray, qrels: Qrels, k: int) -> np.ndarray:
  """HR@k = 1[sum_{r<=k} h_r > 0]: whether any relevant item is in the top k.

  With one relevant item per query, HR@k equals Recall@k. Shapes as in `recall_at_k`.
  """
  return _undefined_to_nan((_hits(ranked, qrels, k).sum(1) > 0).astype(np.float64), qrels)


def precision_at_k(ranked: np.ndarray, qrels: Qrels, k: int) -> np.ndarray:
  """Precision@k = (1/k) sum_{r<=k} h_r (denominator k even when fewer items were retrieved).

  Shapes as in `recall_at_k`.
  """
  return _undefined_to_nan(_hits(ranked, qrels, k).sum(1) / k, qrels)


def _log2_discount(k: int) -> np.ndarray:
  """[k] float64: 1 / log2(r + 1) for r = 1..k."""
  return 1.0 / np.log2(np.arange(2, k + 2))


GAINS = ("exponential", "linear")


def _gains(grades: np.ndarray, gain: str) -> np.ndarray:
  if gain == "exponential":
    return np.exp2(grades) - 1.0
  if gain == "linear":
    return grades
  raise ValueError(f"gain {gain!r}: expected one of {GAINS}")


def per_query_max_grade(qrels: Qrels) -> np.ndarray:
  """[Q] float64: the largest grade judged for each query (0 for a query without judgments)."""
  max_rel = np.zeros(qrels.num_queries)
  np.maximum.at(max_rel, qrels.query_of_entry, qrels.rels)
  return max_rel


def dcg_at_k(ranked: np.ndarray, qrels: Qrels, k: int, gain: str = "exponential") -> np.ndarray:
  """DCG@k = sum_{r<=k} g(rel_r) / log2(r + 1), g(rel) = 2^rel - 1 (gain="exponential", Burges
  et al. 2005) or rel (gain="linear", trec_eval `ndcg_cut`).

  Shapes as in `recall_at_k`; defined (not NaN) for every query.
  """
  ranked = _check_run(ranked, qrels, k)
  return _gains(ranked_grades(ranked[:, :k], qrels), gain) @ _log2_discount(k)


def ndcg_at_k(ranked: np.ndarray, qrels: Qrels, k: int, gain: str = "exponential") -> np.ndarray:
  """NDCG@k = DCG@k / IDCG@k with graded relevance.

  DCG@k = sum_{r<=k} g(rel_r) / log2(r + 1) with a log2 discount and the exponential gain
  2^rel_r - 1 (Burges et al. 2005; ranx `ndcg_burges`) or, gain="linear", rel_r (trec_eval
  `ndcg_cut`, the GCL reference); both agree on binary grades. IDCG@k is the DCG@k of the ideal
  ranking: the query's judged items sorted by decreasing grade.

  Shapes as in `recall_at_k`.
  """
  dcg = dcg_at_k(ranked, qrels, k, gain)
  idcg = _gains(ideal_grades(qrels, k), gain) @ _log2_discount(k)
  with np.errstate(invalid="ignore", divide="ignore"):
    return _undefined_to_nan(dcg / idcg, qrels)


def mrr_at_k(ranked: np.ndarray, qrels: Qrels, k: int) -> np.ndarray:
  """MRR@k (per query: reciprocal rank) = 1 / r_1 where r_1 is the rank of the first relevant
  item, or 0 when none is in the top k. Shapes as in `recall_at_k`.
  """
  hits = _hits(ranked, qrels, k)
  first = hits.argmax(1)
  return _undefined_to_nan(np.where(hits.any(1), 1.0 / (first + 1), 0.0), qrels)


def map_at_k(ranked: np.ndarray, qrels: Qrels, k: int) -> np.ndarray:
  """MAP@k (per query: average precision) = (1/R) sum_{r<=k} h_r * Precision@r.

  The denominator is R, all relevant items of the query (trec_eval and ranx convention), not
  min(R, k). Shapes as in `recall_at_k`.
  """
  hits = _hits(ranked, qrels, k)
  precision_at_r = np.cumsum(hits, 1) / np.arange(1, k + 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return _undefined_to_nan((hits * precision_at_r).sum(1) / qrels.num_relevant, qrels)


def err_at_k(ranked: np.ndarray, qrels: Qrels, k: int,
             max_rel: float | str | None = None) -> np.ndarray:
  """ERR@k, expected reciprocal rank under the cascade model (Chapelle et al. 2009).

  ERR@k = sum_{r<=k} (1/r) R_r prod_{i<r} (1 - R_i), with stopping probability
  R_i = (2^rel_i - 1) / 2^max_rel.

  Args:
    ranked: [Q, K] int corpus indices, best first, -1 = padding; K >= k.
    qrels: judgments of the Q queries.
    k: cutoff.
    max_rel: the top grade of the scale; defaults to the largest grade in `qrels` (pass it
      explicitly to compare runs judged with different qrels); "per_query" = each query's own
      largest judged grade (the GCL reference evaluation).

  Returns:
    [Q] float64, NaN where R = 0.
  """
  ranked = _check_run(ranked, qrels, k)
  grades = ranked_grades(ranked[:, :k], qrels)
  if max_rel == "per_query":
    top = per_query_max_grade(qrels)
    scale = np.exp2(np.where(top > 0, top, 1.0))[:, None]
  else:
    if max_rel is None:
      max_rel = float(qrels.rels.max(initial=0.0))
    if np.any(grades > max_rel):
      raise ValueError(f"err_at_k: a grade {grades.max()} exceeds max_rel={max_rel}")
    scale = 2.0**max_rel
  stop = (np.exp2(grades) - 1.0) / scale
  reach = np.cumprod(np.concatenate([np.ones((grades.shape[0], 1)), 1.0 - stop[:, :-1]], 1), 1)
  return _undefined_to_nan((stop * reach / np.arange(1, k + 1)).sum(1), qrels)


def rbp(ranked: np.ndarray, qrels: Qrels, p: float, k: int | None = None,
        graded: bool = False) -> np.ndarray:
  """Rank-biased precision (Moffat & Zobel 2008), binary or graded relevance.

  RBP(p) = (1 - p) sum_{r<=k} h_r p^(r-1): the expected rate of relevant items seen by a user who
  moves on to the next rank with probability p. Ranks past the run (or past k) contribute 0, so
  this is the lower bound of RBP's [lower, lower + p^k] interval. graded=True replaces h_r by
  rel_r / (the query's largest judged grade) (graded RBP, as in the GCL reference evaluation).

  Args:
    ranked: [Q, K] int corpus indices, best first, -1 = padding.
    qrels: judgments of the Q queries.
    p: persistence in (0, 1).
    k: cutoff; defaults to the full run (K).

  Returns:
    [Q] float64, NaN where R = 0.
  """
  if not 0.0 < p < 1.0:
    raise ValueError(f"rbp: expected persistence 0 < p < 1, got {p}")
  k = np.asarray(ranked).shape[-1] if k is None else k
  if graded:
    top = per_query_max_grade(qrels)
    hits = ranked_grades(_check_run(ranked, qrels, k)[:, :k], qrels) / np.where(
        top > 0, top, 1.0)[:, None]
  else:
    hits = _hits(ranked, qrels, k)
  return _undefined_to_nan((1.0 - p) * hits @ (p ** np.arange(k)), qrels)


def coverage_at_k(ranked: np.ndarray, k: int, corpus_size: int) -> float:
  """Catalogue coverage@k = |union over queries of their top-k items| / corpus_size.

  Args:
    ranked: [Q, K] int corpus indices, -1 = padding; K >= k.
    k: cutoff.
    corpus_size: N, the number of items that could have been recommended.

  Returns:
    A float in [0, 1] (a property of the whole run, not a per-query value).
  """
  ranked = np.asarray(ranked)
  if ranked.ndim != 2 or not 1 <= k <= ranked.shape[1]:
    raise ValueError(f"coverage_at_k: expected ranked [Q, K>={k}], got shape {ranked.shape}")
  top = ranked[:, :k]
  top = top[top >= 0]
  if top.size and top.max() >= corpus_size:
    raise ValueError(f"coverage_at_k: item {top.max()} outside corpus of size {corpus_size}")
  return float(np.unique(top).size / corpus_size)


# Metric names, ranx style: "recall@10", "ndcg@10", "rbp.95" (p = 0.95), "coverage@10".
_PER_QUERY: dict[str, Callable[..., np.ndarray]] = {
    "recall": recall_at_k,
    "hit_rate": hit_rate_at_k,
    "precision": precision_at_k,
    "ndcg": ndcg_at_k,
    "mrr": mrr_at_k,
    "map": map_at_k,
    "err": err_at_k,
}
_NAME = re.compile(r"^(?P<name>[a-z_]+)(?:@(?P<k>\d+)|\.(?P<p>\d+))?$")


def parse_metric(metric: str) -> tuple[str, int | None, float | None]:
  """'ndcg@10' -> ('ndcg', 10, None); 'rbp.95' -> ('rbp', None, 0.95)."""
  m = _NAME.match(metric)
  if not m or m["name"] not in {*_PER_QUERY, "rbp", "coverage"}:
    raise ValueError(
        f"unknown metric {metric!r}: expected one of {sorted({*_PER_QUERY, 'coverage'})} with "
        "'@k' (e.g. 'ndcg@10'), or 'rbp.P' (e.g. 'rbp.95' for p = 0.95)")
  name, k, p = m["name"], m["k"], m["p"]
  if name == "rbp":
    if p is None:
      raise ValueError(f"metric {metric!r}: rbp needs a persistence, e.g. 'rbp.8' or 'rbp.95'")
    return name, None, float("0." + p)
  if k is None:
    raise ValueError(f"metric {metric!r}: expected a cutoff, e.g. '{name}@10'")
  return name, int(k), None


def per_query_metrics(ranked: np.ndarray, qrels: Qrels, metrics: Sequence[str], *,
                      max_rel: float | None = None) -> dict[str, np.ndarray]:
  """Per-query values of the named metrics (coverage, a run-level metric, is not accepted).

  Args:
    ranked: [Q, K] int corpus indices, best first, -1 = padding.
    qrels: judgments of the Q queries.
    metrics: names such as "recall@10", "ndcg@10", "map@100", "err@20", "rbp.8".
    max_rel: top grade for ERR (see `err_at_k`).

  Returns:
    {metric: [Q] float64}, NaN for queries without relevant items.
  """
  out = {}
  for metric in metrics:
    name, k, p = parse_metric(metric)
    if name == "coverage":
      raise ValueError(f"{metric!r} is a run-level metric; use evaluate()")
    if name == "rbp":
      out[metric] = rbp(ranked, qrels, p)
    elif name == "err":
      out[metric] = err_at_k(ranked, qrels, k, max_rel)
    else:
      out[metric] = _PER_QUERY[name](ranked, qrels, k)
  return out


def evaluate(ranked: np.ndarray, qrels: Qrels, metrics: Sequence[str], *,
             corpus_size: int | None = None, max_rel: float | None = None) -> dict[str, float]:
  """Mean of each named metric over the queries that have a relevant item.

  Args:
    ranked: [Q, K] int corpus indices, best first, -1 = padding.
    qrels: judgments of the Q queries.
    metrics: names as in `per_query_metrics`, plus "coverage@k" (needs `corpus_size`).
    corpus_size: N, for coverage.
    max_rel: top grade for ERR.

  Returns:
    {metric: float}; NaN when no query has a relevant item.
  """
  out = {}
  per_query = [m for m in metrics if parse_metric(m)[0] != "coverage"]
  values = per_query_metrics(ranked, qrels, per_query, max_rel=max_rel)
  for metric in metrics:
    name, k, _ = parse_metric(metric)
    if name == "coverage":
      if corpus_size is None:
        raise ValueError(f"{metric!r} needs corpus_size")
      out[metric] = coverage_at_k(ranked, k, corpus_size)
    else:
      out[metric] = mean_over_judged(values[metric])
  return out


def mean_over_judged(values: np.ndarray) -> float:
  """Mean of per-query values over the defined (non-NaN) ones; NaN when none is defined."""
  values = np.asarray(values, np.float64)
  finite = ~np.isnan(values)
  return float(values[finite].mean()) if finite.any() else float("nan")


def by_bucket(per_query: Mapping[str, np.ndarray], buckets: Sequence[Hashable] | np.ndarray
              ) -> dict[Any, dict[str, float]]:
  """Splits per-query metrics by a per-query bucket label and averages within each bucket.

  Use it for popularity quintiles (`quantile_buckets`), query-modality x corpus-modality pairs
  (labels such as "image->text"), or any other grouping.

  Args:
    per_query: {metric: [Q] float64} as from `per_query_metrics` (NaN = undefined, skipped).
    buckets: [Q] hashable labels.

  Returns:
    {bucket: {metric: nanmean over the bucket's queries, "num_queries": count}}, buckets sorted
    when their labels are orderable.
  """
  labels = np.asarray(buckets, dtype=object) if not isinstance(buckets, np.ndarray) else buckets
  for metric, values in per_query.items():
    if np.shape(values) != (len(labels),):
      raise ValueError(f"by_bucket: metric {metric!r} has shape {np.shape(values)}, "
                       f"expected [{len(labels)}] like buckets")
  keys = list(dict.fromkeys(labels.tolist()))
  try:
    keys = sorted(keys)
  except TypeError:
    pass
  out = {}
  for key in keys:
    mask = np.array([label == key for label in labels.tolist()])
    row = {metric: mean_over_judged(np.asarray(values)[mask])
           for metric, values in per_query.items()}
    row["num_queries"] = int(mask.sum())
    out[key] = row
  return out


def quantile_buckets(values: np.ndarray, num_buckets: int = 5) -> np.ndarray:
  """[Q] int bucket 0..num_buckets-1 by quantile of `values: [Q]` (e.g. item popularity quintile).

  Bucket b holds the values in the b-th of `num_buckets` equal-count slices of the sorted values
  (ties are kept together, so bucket sizes can differ).
  """
  values = np.asarray(values, np.float64)
  edges = np.quantile(values, np.linspace(0, 1, num_buckets + 1)[1:-1])
  return np.searchsorted(edges, values, side="right").astype(np.int64)


# --- Single-positive protocols: metrics from the rank of the positive item. -------------------


def rank_gains(ranks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-query hit and NDCG gain at cutoff k from 0-based ranks of a single positive.

  ranks: [Q] int ≥ 0. Returns (hit [Q] bool = 1[rank0 < k], ndcg [Q] float64 = hit / log2(rank0 +
  2)); their means are `rank_metrics`' recall@k and ndcg@k (per-query values for paired tests).
  """
  ranks = np.asarray(ranks)
  hit = ranks < k
  return hit, np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)


def rank_metrics(ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
  """Metrics from the 0-based rank of each query's single positive (or first positive).

  With rank0 the number of items ranked above the positive:
    HR@k = Recall@k = 1[rank0 < k];  NDCG@k = 1[rank0 < k] / log2(rank0 + 2);
    MRR = mean 1 / (rank0 + 1) (no cutoff); median_rank and mean_rank are 1-based (rank0 + 1).

  Args:
    ranks: [Q] int, 0-based.
    ks: cutoffs.

  Returns:
    {"recall@k", "hit_rate@k", "ndcg@k" for each k, "mrr", "median_rank", "mean_rank"}.
  """
  ranks = np.asarray(ranks)
  if ranks.ndim != 1 or ranks.size == 0 or np.any(ranks < 0):
    raise ValueError(f"rank_metrics: expected non-empty [Q] ranks >= 0, got {ranks.shape}")
  out = {}
  for k in ks:
    hit, ndcg = rank_gains(ranks, k)
    out[f"recall@{k}"] = float(hit.mean())
    out[f"hit_rate@{k}"] = float(hit.mean())
    out[f"ndcg@{k}"] = float(ndcg.mean())
  out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
  out["median_rank"] = float(np.median(ranks + 1))
  out["mean_rank"] = float((ranks + 1).mean())
  return out


def sample_negatives(rng: np.random.Generator, num_items: int, seen: Sequence[Sequence[int]],
                     num_negatives: int, *, max_users: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Samples negatives per user for the sampled-negative protocol (SASRec, Kang & McAuley 2018).

  Each user's negatives are `num_negatives` distinct items drawn uniformly from the items the
  user never interacted with (`seen` must include the held-out positive). SASRec draws with
  replacement; drawing distinct items gives the same expectation without duplicate candidates.

  Args:
    rng: numpy generator (the randomness is explicit; seed it from the eval config).
    num_items: N, items are 0..N-1.
    seen: per user, the items it interacted with (history and held-out positive).
    num_negatives: M negatives per user (SASRec: 100).
    max_users: evaluate at most this many users, chosen uniformly without replacement (SASRec caps
      at 10,000); None keeps all.

  Returns:
    users: [U] int64 indices into `seen`, ascending.
    negatives: [U, M] int64 item indices.
  """
  num_users = len(seen)
  users = np.arange(num_users)
  if max_users is not None and max_users < num_users:
    users = np.sort(rng.choice(num_users, size=max_users, replace=False))
  negatives = np.empty((users.size, num_negatives), np.int64)
  for row, user in enumerate(users):
    excluded = np.unique(np.asarray(seen[user], np.int64))
    if num_items - excluded.size < num_negatives:
      raise ValueError(f"sample_negatives: user {user} has seen {excluded.size} of {num_items} "
                       f"items, fewer than {num_negatives} unseen ones remain")
    picked = np.zeros(0, np.int64)
    while picked.size < num_negatives:
      # Rejection sampling: cheap when users have seen a small part of the catalogue.
      draw = rng.integers(0, num_items, size=2 * num_negatives + 8)
      draw = draw[~np.isin(draw, excluded)]
      picked = np.concatenate([picked, draw])
      _, first = np.unique(picked, return_index=True)
      picked = picked[np.sort(first)]
    negatives[row] = picked[:num_negatives]
  return users, negatives


def sampled_ranks(positive_scores: np.ndarray, negative_scores: np.ndarray, *,
                  ties: str = "pessimistic") -> np.ndarray:
  """0-based rank of the positive among itself and its sampled negatives.

  Args:
    positive_scores: [U] float.
    negative_scores: [U, M] float.
    ties: "pessimistic" (negatives scoring equal to the positive rank above it, so a collapsed
      model that scores everything equal gets no credit) or "optimistic".

  Returns:
    [U] int64 in [0, M].
  """
  positive_scores = np.asarray(positive_scores)
  negative_scores = np.asarray(negative_scores)
  if positive_scores.ndim != 1 or negative_scores.shape[:1] != positive_scores.shape:
    raise ValueError(f"sampled_ranks: expected positive [U] and negatives [U, M], got "
                     f"{positive_scores.shape} and {negative_scores.shape}")
  if ties not in ("pessimistic", "optimistic"):
    raise ValueError(f"sampled_ranks: ties must be 'pessimistic' or 'optimistic', got {ties!r}")
  # NaN ranks last: a NaN positive below every negative, a NaN negative below every real score.
  negative_scores = np.where(np.isnan(negative_scores), -np.inf, negative_scores)
  above = (negative_scores >= positive_scores[:, None] if ties == "pessimistic"
           else negative_scores > positive_scores[:, None])
  ranks = above.sum(1).astype(np.int64)
  return np.where(np.isnan(positive_scores), negative_scores.shape[1], ranks)


def sampled_negative_metrics(query_emb: np.ndarray, item_emb: np.ndarray, positives: np.ndarray,
                             negatives: np.ndarray, ks: Sequence[int] = (1, 5, 10), *,
                             ties: str = "pessimistic") -> dict[str, float]:
  """HR@k / NDCG@k / MRR of each positive ranked against its sampled negatives (SASRec protocol).

  Scores are inner products computed in float64.

  Args:
    query_emb: [U, D] float, one row per evaluated user (rows of `users` from `sample_negatives`).
    item_emb: [N, D] float.
    positives: [U] int, the held-out item of each user.
    negatives: [U, M] int, from `sample_negatives`.
    ks: cutoffs.
    ties: see `sampled_ranks`.

  Returns:
    `rank_metrics` of the ranks among M + 1 candidates.
  """
  query_emb = np.asarray(query_emb, np.float64)
  item_emb = np.asarray(item_emb, np.float64)
  positives = np.asarray(positives)
  negatives = np.asarray(negatives)
  if (query_emb.ndim != 2 or item_emb.ndim != 2 or query_emb.shape[1] != item_emb.shape[1]
      or positives.shape != query_emb.shape[:1] or negatives.shape[:1] != positives.shape):
    raise ValueError(
        f"sampled_negative_metrics: expected query_emb [U, D], item_emb [N, D], positives [U], "
        f"negatives [U, M]; got {query_emb.shape}, {item_emb.shape}, {positives.shape}, "
        f"{negatives.shape}")
  pos = np.einsum("ud,ud->u", query_emb, item_emb[positives])
  neg = np.einsum("ud,umd->um", query_emb, item_emb[negatives])
  return rank_metrics(sampled_ranks(pos, neg, ties=ties), ks)
