"""GCL's reference evaluation: relevance grades from scores, the sampled test queries, the graded
metrics (options of `mmcl.eval.metrics`), the split's judgments and the evaluation of a split
(embedding, exact top-k, metrics, TREC files)."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from mmcl.eval import finite as finite_lib
from mmcl.eval import metrics as metrics_lib
from mmcl.eval import topk as topk_lib
from mmcl.eval import trec as trec_lib
from mmcl.parallel import mesh as mesh_lib


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


def embed_in_batches(fn, arrays: Mapping[str, np.ndarray], mesh, batch_size: int) -> np.ndarray:
  """fn(dict of [b, ...] sharded arrays) → [b, D]; runs over the N rows of `arrays` in batches
  padded to the mesh. Returns [N, D]."""
  n_dev = mesh.shape[mesh_lib.DATA_AXIS]
  bs = max(n_dev, batch_size // n_dev * n_dev)
  sharding = mesh_lib.batch_sharding(mesh)
  n = len(next(iter(arrays.values())))
  out = []
  for start in range(0, n, bs):
    chunk = {k: v[start:start + bs] for k, v in arrays.items()}
    m = len(next(iter(chunk.values())))
    if m < bs:  # pad with copies of the first row (dropped below) to keep one compiled shape
      chunk = {k: np.concatenate([v, np.repeat(v[:1], bs - m, 0)]) for k, v in chunk.items()}
    chunk = {k: jax.device_put(v, sharding) for k, v in chunk.items()}
    out.append(np.asarray(fn(chunk))[:m])
  return np.concatenate(out)


def embed_split(towers, params, source, table: SplitTable, maker, mesh, batch_size: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """(query embeddings [Q, D], document embeddings [N, D]) of a split's distinct rows (towers:
  `model.GCLTowers`; maker: the split's `products.batch_maker`)."""
  rep = mesh_lib.replicated(mesh)
  q_batch = maker(source, table.query_rows, 0)
  # Parameters are arguments, not constants closed over: a constant tree of a pretrained tower
  # (20M+ values) would be folded into the program and slow its compilation.
  embed_q = jax.jit(lambda p, b: towers.embed_queries(p, b["query"]), out_shardings=rep)
  queries = embed_in_batches(lambda b: embed_q(params, b), {"query": q_batch["query"]}, mesh,
                             batch_size)
  d_batch = maker(source, table.doc_rows, 0)
  keys = ["image", "has_image", "title", "has_title"] + (
      ["description", "has_description"] if "description" in d_batch else [])
  embed_d = jax.jit(lambda p, b: towers.embed_documents(p, b)[0], out_shardings=rep)
  docs = embed_in_batches(lambda b: embed_d(params, b), {k: d_batch[k] for k in keys}, mesh,
                          batch_size)
  return queries, docs


def evaluate_split(towers, params, split: str, source, maker, t, mesh,
                   out_dir: str | None = None) -> dict[str, float]:
  """The reference evaluation of one split → {"<split>/<metric>": mean over the sampled
  queries} (t: the `task` config); TREC run and qrels files into out_dir (task.write_trec)."""
  table = SplitTable(source)
  rel_sum = np.bincount(table.pairs[:, 0], weights=table.rel, minlength=len(table.query_ids))
  chosen = sample_eval_queries(rel_sum, t.eval_queries, t.eval_seed)
  qrels = table.qrels(chosen, t.eval_top_k)
  q_emb, d_emb = embed_split(towers, params, source, table, maker, mesh, t.eval_batch_size)
  finite_lib.require_scorable({f"query tower ({split} split)": q_emb[chosen],
                               f"document tower ({split} split)": d_emb})
  k = min(t.eval_top_k, d_emb.shape[0])
  scores, ranked = topk_lib.exact_topk(q_emb[chosen], d_emb, k, mesh=mesh)
  scores, ranked = np.asarray(scores), np.asarray(ranked)
  per_query = gcl_metrics(ranked, qrels, cutoff=t.eval_top_k)
  out = {f"{split}/{name}": metrics_lib.mean_over_judged(v) for name, v in per_query.items()}
  out[f"{split}/num_queries"] = float(len(chosen))
  out[f"{split}/num_documents"] = float(d_emb.shape[0])
  if out_dir is not None and t.write_trec:
    trec_lib.write_run_and_qrels(out_dir, split, ranked, scores, qrels,
                                 query_ids=list(table.query_ids[chosen]),
                                 doc_ids=list(table.doc_ids))
  return out
