"""Cold-start baselines beside MMSRec's `:scientific_cold` run: ID-based SASRec and popularity.

The held-out items are those of `experiments/mmsrec.py:scientific_cold` (cold_item_fraction 0.1,
seed 0: `mmcl.tasks.mmsrec.data.cold_items(4385, 0.1, 0)`, 438 items).

  prep              writes workdirs/mmsrec_tools/scientific_cold.txt ("user item" lines, SASRec's
                    format): amazon-scientific-unisrec with the held-out items removed from every
                    user's training part (items[:-2]); the valid and test items are kept.
  eval WORKDIR STEP SASRec trained on that file, scored on the ORIGINAL data's test cases (histories
                    unchanged, as MMSRec is evaluated): all cases and the cases whose target is a
                    held-out item; and the popularity baseline (counts in the training parts of the
                    cold split, so held-out items have count 0). Writes WORKDIR/cold_eval_STEP.json.

Run from the repository root (docs/results/mmsrec.md, cold start):
  python experiments/analysis/mmsrec_cold.py prep
  mmcl data convert --format sasrec --input workdirs/mmsrec_tools/scientific_cold.txt \
      --output data/scientific_cold
  mmcl train --config experiments/sasrec.py:scientific_cold --workdir workdirs/sasrec_sci_cold
  python experiments/analysis/mmsrec_cold.py eval workdirs/sasrec_sci_cold STEP
"""
import json
import pathlib
import sys

import numpy as np

from mmcl.eval import seqrec
from mmcl.tasks import get_task_class
from mmcl.tasks.mmsrec.data import cold_items

ORIG = "data/scientific"


def prep() -> None:
  """Writes the cold split in SASRec's text format."""
  user_items, n = seqrec.load_interactions(ORIG)
  cold = cold_items(n, 0.1, 0)
  lines, kept, dropped = [], 0, 0
  for u, items in enumerate(user_items):
    if len(items) < 3:
      seq = items[~cold[items]]
    else:
      train = items[:-2][~cold[items[:-2]]]
      seq = np.concatenate([train, items[-2:]]) if len(train) else train
    if len(seq) == 0:
      dropped += 1
      continue
    kept += 1
    lines += [f"{u + 1} {i}" for i in seq]
  if max(int(x.split()[1]) for x in lines) != n:  # the converter's num_items is the largest item
    raise ValueError(f"{ORIG}: item {n} is held out everywhere; num_items would change")
  out = pathlib.Path("workdirs/mmsrec_tools/scientific_cold.txt")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text("\n".join(lines) + "\n")
  print(json.dumps({"users_kept": kept, "users_dropped": dropped, "cold_items": int(cold.sum())}))


def evaluate(workdir: str, step: int) -> None:
  """Prints and writes SASRec's and popularity's metrics, all cases and held-out targets."""
  from mmcl.workdir import TrainedWorkdir  # pylint: disable=g-import-not-at-top
  trained = TrainedWorkdir(workdir, resolve_task=get_task_class)
  cfg, task, mesh = trained.config, trained.task, trained.mesh
  params = trained.restore_params(trained.resolve_step(step))
  user_items, n = seqrec.load_interactions(ORIG)
  cold = cold_items(n, 0.1, 0)
  users, history, target = seqrec.eval_cases(user_items, "test", cfg.data.max_len)
  seen = [user_items[u] for u in users]
  item_emb = np.asarray(task.item_table(params))
  q = task.user_embeddings(params, history)
  kw = dict(ks=(10, 50), num_negatives=100, max_users=10000, seed=0, full_ranking=True, mesh=mesh)
  out = {"step": int(step)}
  out.update(seqrec.next_item_metrics(q, item_emb, target, seen, prefix="sasrec_test", **kw))
  out.update(seqrec.next_item_metrics(q, item_emb, target, seen, prefix="sasrec_test_cold",
                                      case_mask=cold[target], **kw))
  # Popularity: training-part counts of the cold split (held-out items never occur: count 0).
  counts = np.zeros(n + 1, np.float32)
  for items in user_items:
    tr = items[:-2] if len(items) >= 3 else items
    np.add.at(counts, tr[~cold[tr]], 1.0)
  pop_q = np.ones((len(users), 1), np.float32)
  out.update(seqrec.next_item_metrics(pop_q, counts[:, None], target, seen, prefix="pop_test",
                                      **kw))
  out.update(seqrec.next_item_metrics(pop_q, counts[:, None], target, seen, prefix="pop_test_cold",
                                      case_mask=cold[target], **kw))
  print(json.dumps(out, indent=1))
  (pathlib.Path(workdir) / f"cold_eval_{step}.json").write_text(json.dumps(out, indent=1))


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  sub.add_parser("prep", help="write the cold split in SASRec's text format")
  e = sub.add_parser("eval", help="score SASRec (WORKDIR at STEP) and popularity")
  e.add_argument("workdir")
  e.add_argument("step", type=int)
  args = p.parse_args(argv)
  if args.cmd == "prep":
    prep()
  else:
    evaluate(args.workdir, args.step)
  return 0


if __name__ == "__main__":
  sys.exit(main())
