"""Recall@10 against exact, build time and search speed of `mmcl export --index` FAISS indexes.

  .venv/bin/python experiments/bench/index.py --corpus 100000 --dim 128 --queries 1000

The corpus is N random unit vectors [N, D]; each query is a corpus row plus Gaussian noise of the
same norm (re-normalised): its source row is a clear first hit, while ranks 2-10 are near-ties
among random vectors, the hardest case for approximate search. Each
kind is built with `mmcl.export.index.build_index` (the parameters `mmcl export` uses) and checked
with `check_index` against the evaluator's exact top-10 (`mmcl.eval.topk.exact_topk`), the number
`mmcl export` writes into the manifest; search speed is `search_topk` (what `mmcl serve` runs) on
all queries at once and one at a time. Output: a Markdown table.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from mmcl.export import index as index_lib


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--corpus", type=int, default=100_000)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--kinds", nargs="+", default=list(index_lib.KINDS))
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  corpus = rng.standard_normal((args.corpus, args.dim), dtype=np.float32)
  corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
  noise = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
  queries = corpus[rng.choice(args.corpus, args.queries, replace=False)] + noise / np.linalg.norm(
      noise, axis=1, keepdims=True)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  print("| kind | N | D | params | build s | Recall@10 vs exact | batch queries/s | "
        "single-query ms |")
  print("|---|---:|---:|---|---:|---:|---:|---:|")
  for kind in args.kinds:
    t0 = time.perf_counter()
    index, params = index_lib.build_index(corpus, kind, seed=0)
    build = time.perf_counter() - t0
    check = index_lib.check_index(index, kind, corpus, queries)
    recall = check.get("recall@10", check.get("identical_ids_fraction"))
    t0 = time.perf_counter()
    index_lib.search_topk(index, queries, 10)
    batch_qps = args.queries / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for q in queries[:50]:
      index_lib.search_topk(index, q[None], 10)
    single_ms = (time.perf_counter() - t0) / 50 * 1000
    print(f"| {kind} | {args.corpus:,} | {args.dim} | {params or '-'} | {build:.1f} | "
          f"{recall:.4f}{' (identical top-10)' if kind == 'flat' else ''} | {batch_qps:,.0f} | "
          f"{single_ms:.2f} |", flush=True)


if __name__ == "__main__":
  main()
