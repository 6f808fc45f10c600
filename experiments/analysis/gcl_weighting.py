"""Why weighting wins the graded GCL metrics but not always mAP / MRR: reads the TREC run and
qrels files that `mmcl eval` wrote for two GCL runs (A = weighted, B = no_score) and reports, per
split:
  * the reference metrics recomputed from the files (sanity check against metrics.json);
  * mAP@1000 / MRR@1000 with binary relevance at thresholds rel >= t (t = 1 is the reference:
    every judged, i.e. listed, product is relevant);
  * mean grade of the top-1 / top-10 retrieved documents, recall@100 of low-grade (rel <= 50)
    and high-grade (rel > 50) documents;
  * the paired difference A − B per query with a 95 % bootstrap interval (2,000 resamples of the
    200 queries) and win / tie / loss counts.

  python experiments/analysis/gcl_weighting.py workdirs/gcl_fashion workdirs/gcl_fashion_no_score
"""
import pathlib
import sys

import numpy as np

from mmcl.eval import metrics as metrics_lib
from mmcl.eval import trec
from mmcl.tasks.gcl.evaluate import gcl_metrics

SPLITS = ("in_domain", "novel_query", "novel_document", "zero_shot")
THRESHOLDS = (1, 26, 51, 76, 91)


def load(workdir: pathlib.Path, split: str):
  step = max(int(x.name) for x in (workdir / "eval").iterdir() if x.name.isdigit())
  d = workdir / "eval" / str(step)
  return trec.read_run(d / f"{split}.run"), trec.read_qrels(d / f"{split}.qrels"), step


def per_query(run, judged, qids, min_rel=1):
  docs = sorted({doc for q in qids for doc in judged[q]} | {doc for q in qids for doc in run[q]})
  index = {doc: i for i, doc in enumerate(docs)}
  rows = [{index[doc]: rel for doc, rel in judged[q].items() if rel >= min_rel} for q in qids]
  qrels = metrics_lib.Qrels.from_dict(rows)
  ranked = np.full((len(qids), 1000), -1, np.int64)
  for i, q in enumerate(qids):
    ordered = list(run[q])[:1000]  # file order = rank order
    ranked[i, :len(ordered)] = [index[doc] for doc in ordered]
  out = gcl_metrics(ranked, qrels)
  grades = metrics_lib.ranked_grades(ranked, qrels)
  out["top1_grade"] = grades[:, 0]
  out["top10_grade"] = grades[:, :10].mean(1)
  for name, lo, hi in (("recall@100_rel<=50", 1, 50), ("recall@100_rel>50", 51, 100)):
    hit = ((grades[:, :100] >= lo) & (grades[:, :100] <= hi)).sum(1)
    total = np.asarray([sum(lo <= r <= hi for r in row.values()) for row in rows], float)
    out[name] = np.where(total > 0, hit / np.maximum(total, 1), np.nan)
  return out


def bootstrap(diff, rng, n=2000):
  diff = diff[~np.isnan(diff)]
  means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(1)
  return diff.mean(), np.percentile(means, 2.5), np.percentile(means, 97.5), (
      int((diff > 1e-12).sum()), int((np.abs(diff) <= 1e-12).sum()), int((diff < -1e-12).sum()))


def main(a_dir: str, b_dir: str) -> None:
  a_dir, b_dir = pathlib.Path(a_dir), pathlib.Path(b_dir)
  rng = np.random.default_rng(0)
  for split in SPLITS:
    run_a, judged, step_a = load(a_dir, split)
    run_b, judged_b, step_b = load(b_dir, split)
    assert judged == judged_b, "the two runs were judged with different qrels"
    qids = sorted(judged)
    print(f"\n== {split}: {len(qids)} queries; A = {a_dir.name} (step {step_a}), "
          f"B = {b_dir.name} (step {step_b})")
    grades = np.concatenate([list(j.values()) for j in judged.values()])
    print(f"judged per query {len(grades) / len(qids):.1f}; share with rel > 50: "
          f"{np.mean(grades > 50):.2f}")
    pa, pb = per_query(run_a, judged, qids), per_query(run_b, judged, qids)
    for name in ("ndcg@10", "err", "rbp.9", "map@1000", "mrr@1000", "top1_grade",
                 "top10_grade", "recall@100_rel<=50", "recall@100_rel>50"):
      mean, lo, hi, (w, t, l) = bootstrap(pa[name] - pb[name], rng)
      print(f"  {name:20s} A {np.nanmean(pa[name]):7.3f}  B {np.nanmean(pb[name]):7.3f}  "
            f"A-B {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]  wins/ties/losses {w}/{t}/{l}")
    for t in THRESHOLDS[1:]:
      ta, tb = per_query(run_a, judged, qids, t), per_query(run_b, judged, qids, t)
      for name in ("map@1000", "mrr@1000"):
        mean, lo, hi, _ = bootstrap(ta[name] - tb[name], rng)
        print(f"  {name} rel>={t:<3d}     A {np.nanmean(ta[name]):7.3f}  B "
              f"{np.nanmean(tb[name]):7.3f}  A-B {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")


if __name__ == "__main__":
  main(*sys.argv[1:3])
