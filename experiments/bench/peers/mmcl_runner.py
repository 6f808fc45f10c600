"""mmcl's training iterator as `mmcl train` builds it (data_pipelines.pipelines), timed.

  python mmcl_runner.py DATASET_DIR --batches 40 --warmup 3 [--worker_count 0]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cputime  # noqa: E402

from data_pipelines import pipelines  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("data")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--worker_count", type=int, default=0)
  args = p.parse_args()
  cfg = {"dir": args.data, "global_batch_size": args.batch, "seed": 0, "image_size": 224,
         "augment": True, "crop_scale": (0.08, 1.0), "max_text_len": 32,
         "worker_count": args.worker_count}
  it = pipelines.build_train_iterator(cfg)
  for _ in range(args.warmup):
    batch = next(it)
  cpu0, t0 = cputime.tree_cpu_seconds(), time.perf_counter()
  for _ in range(args.batches):
    batch = next(it)
  wall, cpu = time.perf_counter() - t0, cputime.tree_cpu_seconds() - cpu0
  assert batch["image"].shape == (args.batch, 224, 224, 3) and batch["image"].dtype.name == "uint8"
  print(json.dumps(cputime.report(args.batches * args.batch, wall, cpu,
                                  output=f"{batch['image'].dtype.name} {list(batch['image'].shape)}")))
  if hasattr(it, "close"):
    it.close()


if __name__ == "__main__":
  main()
