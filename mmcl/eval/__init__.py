"""Retrieval evaluation, model-agnostic parts.

  topk        exact chunked inner-product top-k and positive ranks (JAX, optionally sharded)
  metrics     Qrels and ranking metrics (Recall, HR, Precision, NDCG, MRR, MAP, ERR, RBP,
              coverage, per-bucket splits, sampled-negative protocol)
  image_text  image<->text Recall@k / MRR / median rank from embeddings
  retrieval   the full-ranking protocol (exact top-k, optional seen-item filtering, metrics)
  seqrec      the sequential-recommendation protocol (leave-one-out cases, sampled and full
              ranking) shared by the recommendation recipes
  trec        TREC run and qrels files
  report      metrics.json, plots and report.md
  watch       evaluate each finished checkpoint once, resumable
  atomic      atomic file writes
  finite      the checks that keep non-finite values from becoming scores
  evaluator   the evaluator process (`mmcl eval`)

Submodules load on first use (`mmcl.eval.topk`, or `from mmcl.eval import metrics`), so that
importing one does not pull in JAX or matplotlib for the others.
"""
from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("atomic", "evaluator", "finite", "image_text", "metrics",
               "report", "retrieval", "seqrec", "topk", "trec", "watch")
__all__ = list(_SUBMODULES)


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    return importlib.import_module(f"mmcl.eval.{name}")
  raise AttributeError(f"module 'mmcl.eval' has no attribute {name!r}")
