"""Retrieval evaluation, model-agnostic parts.

  topk        exact chunked inner-product top-k and positive ranks (JAX, optionally sharded)
  metrics     Qrels and ranking metrics (Recall, HR, Precision, NDCG, MRR, MAP, ERR, RBP,
              coverage, per-bucket splits, sampled-negative protocol)
  image_text  image<->text Recall@k / MRR / median rank from embeddings
  retrieval   the full-ranking protocol (exact top-k, optional seen-item filtering, metrics)
  trec        TREC run and qrels files
  report      metrics.json, plots and report.md
  watch       evaluate each finished checkpoint once, resumable
  atomic      atomic file writes

Submodules are imported explicitly (`from mmcl.eval import metrics`) so that importing one does
not pull in JAX or matplotlib for the others.
"""
