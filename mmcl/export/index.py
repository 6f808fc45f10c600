"""FAISS indexes of exported corpora (`mmcl export --corpus --index faiss[:flat|ivf|hnsw]`).

Kinds (all inner product, the similarity every mmcl tower is trained and evaluated with):
  flat  exact search (`IndexFlatIP`): its top-k equals the evaluator's (`mmcl.eval.topk`),
        ties aside.
  ivf   inverted lists over k-means cells (`IndexIVFFlat`): nlist = clip(4·√N, 1, N / 39) cells,
        nprobe = min(nlist, max(8, nlist / 8)) probed per query.
  hnsw  a navigable small-world graph (`IndexHNSWFlat`): M = 32 links, efConstruction 80,
        efSearch 128.
Search (`search_topk`, also what `mmcl serve` runs) follows the evaluator's ordering: decreasing
score, ties to the lower row index, where scores closer than `TIE_TOLERANCE` count as tied (FAISS
and XLA round inner products differently by ~1e-7, which would otherwise reorder duplicates); the
index is asked for more candidates until no tie straddles the k-th place.

Each index is checked at export time on the task's test queries for the corpus (or, when the task
gives none, on the corpus's own rows): against the evaluator's exact top-k, the exact index
reports how many queries have identical top-10 ids and the largest score difference, an
approximate one its Recall@10 (the mean fraction of the exact top 10 that it returns).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

# Imports numpy and faiss only (no jax): `mmcl serve` searches with it.

KINDS = ("flat", "ivf", "hnsw")
CHECK_K = 10
INDEX_SUFFIX = ".faiss"
TIE_TOLERANCE = 1e-6


def _error(message: str) -> Exception:
  from mmcl.export.exporter import ExportError  # pylint: disable=g-import-not-at-top
  return ExportError(message)


def parse_index_spec(spec: str | None) -> str | None:
  """"faiss" / "faiss:KIND" → KIND ("flat" for plain "faiss"); None stays None."""
  if spec is None:
    return None
  library, _, kind = spec.partition(":")
  kind = kind or "flat"
  if library != "faiss" or kind not in KINDS:
    raise _error(f"--index {spec!r}: expected faiss or faiss:KIND with KIND one of "
                     f"{', '.join(KINDS)}")
  return kind


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _error(f"--index needs faiss ({e}); install it with pip install 'mmcl[serve]'") from e
  return faiss


def build_index(embeddings: np.ndarray, kind: str, *, seed: int = 0) -> tuple[Any, dict]:
  """A FAISS inner-product index over `embeddings` [N, D] float32 and its parameters."""
  faiss = _faiss()
  x = np.ascontiguousarray(embeddings, np.float32)
  n, d = x.shape
  if kind == "flat":
    index = faiss.IndexFlatIP(d)
    return index, _add(index, x, {})
  if kind == "ivf":
    nlist = int(max(1, min(round(4 * math.sqrt(n)), n // 39)))
    nprobe = int(min(nlist, max(8, nlist // 8)))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(x)
    index.nprobe = nprobe
    return index, _add(index, x, {"nlist": nlist, "nprobe": nprobe})
  if kind == "hnsw":
    index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.hnsw.efSearch = 128
    return index, _add(index, x, {"M": 32, "efConstruction": 80, "efSearch": 128})
  raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")


def _add(index, x: np.ndarray, params: dict) -> dict:
  index.add(x)
  return params


def apply_search_params(index, kind: str, params: dict) -> None:
  """Sets the query-time parameters recorded in the manifest on a loaded index."""
  if kind == "ivf":
    index.nprobe = int(params["nprobe"])
  elif kind == "hnsw":
    index.hnsw.efSearch = int(params["efSearch"])


def search_topk(index, queries: np.ndarray, k: int, *, tie_tolerance: float = TIE_TOLERANCE
                ) -> tuple[np.ndarray, np.ndarray]:
  """Top-k of each query in the evaluator's order (see the module docstring).

  Args:
    index: a FAISS inner-product index of N rows.
    queries: [Q, D] float32.
    k: 1 <= k; clipped to N.

  Returns:
    (scores [Q, k] float32 non-increasing, row indices [Q, k] int64; -1 where an approximate
    index found fewer than k rows).
  """
  q = np.ascontiguousarray(queries, np.float32)
  n = int(index.ntotal)
  k = min(int(k), n)
  fetch = min(n, k + 16)
  while True:
    scores, rows = index.search(q, fetch)
    if fetch == n or not np.any(scores[:, fetch - 1] >= scores[:, k - 1] - tie_tolerance):
      break
    fetch = min(n, 2 * fetch)
  out_scores = np.empty((q.shape[0], k), np.float32)
  out_rows = np.empty((q.shape[0], k), np.int64)
  for r in range(q.shape[0]):
    s, i = scores[r], rows[r]
    s = np.where(i >= 0, s, -np.inf)  # empty slots of an approximate index rank last
    # Chains of scores closer than the tolerance form one group, ordered by row index.
    group = np.concatenate([[0], np.cumsum(s[:-1] - s[1:] > tie_tolerance)])
    order = np.lexsort((np.where(i >= 0, i, n), group))[:k]
    out_scores[r], out_rows[r] = s[order], i[order]
  return out_scores, out_rows


def exact_topk(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The evaluator's exact top-k (`mmcl.eval.topk.exact_topk`): (scores, indices) [Q, k]."""
  from mmcl.eval import topk  # pylint: disable=g-import-not-at-top
  scores, indices = topk.exact_topk(queries, corpus, k)
  return np.asarray(scores), np.asarray(indices)


def check_index(index, kind: str, corpus: np.ndarray, queries: np.ndarray,
                k: int = CHECK_K) -> dict[str, Any]:
  """Compares the index's top-k with the evaluator's exact top-k on `queries` [Q, D].

  Returns:
    {"queries", "k"} plus, for "flat", "identical_ids_fraction" (queries whose top-k ids are
    the same list) and "max_score_diff"; for approximate kinds, "recall@k" vs exact.
  """
  k = min(k, corpus.shape[0])
  q = np.ascontiguousarray(queries, np.float32)
  want_scores, want_ids = exact_topk(q, corpus, k)
  got_scores, got_ids = search_topk(index, q, k)
  out: dict[str, Any] = {"queries": int(q.shape[0]), "k": int(k),
                         "reference": "mmcl.eval.topk.exact_topk (the evaluator's ranking)"}
  if kind == "flat":
    out["identical_ids_fraction"] = float(np.mean(np.all(got_ids == want_ids, axis=1)))
    out["same_id_sets_fraction"] = float(np.mean(
        [set(g.tolist()) == set(w.tolist()) for g, w in zip(got_ids, want_ids)]))
    out["max_score_diff"] = float(np.abs(got_scores - want_scores).max())
  else:
    hits = [len(set(g.tolist()) & set(w.tolist())) for g, w in zip(got_ids, want_ids)]
    out[f"recall@{k}"] = float(np.mean(hits) / k)
  return out


def write_index(index, path: str | os.PathLike) -> None:
  _faiss().write_index(index, str(path))


def read_index(path: str | os.PathLike):
  return _faiss().read_index(str(path))
