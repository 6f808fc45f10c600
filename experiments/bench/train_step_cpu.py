"""Quickstart train step on the CPU: step time with device-resident batches vs fed by the grain pipeline.

  .venv/bin/python experiments/bench/train_step_cpu.py --data data/shapes [--steps 30] [--devices 2]

Builds the quickstart job (experiments/clip_shapes.py) exactly as `mmcl train` does, then times
(a) `--steps` train steps on one batch already on the devices, and (b) `--steps` steps each pulling
its batch from the grain iterator and placing it on the mesh. The difference is what the input
pipeline adds to a step; it prints both and the overhead in percent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default="data/shapes")
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--devices", type=int, default=os.cpu_count() or 1)
  p.add_argument("--config", default="experiments/clip_shapes.py")
  args = p.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}")
  import jax

  from mmcl.config import load_config_file
  from mmcl.parallel import mesh as mesh_lib
  from mmcl.tasks import get_task_class
  from mmcl.train import loop as loop_lib
  from mmcl.train.step import make_train_step

  c = load_config_file(args.config)
  c.data.dir = args.data
  mesh, task = loop_lib.setup(c, get_task_class(c.task.name))
  state_fn, _, shardings, tx, schedule = loop_lib.build_state(c, task, mesh)
  step = jax.jit(make_train_step(task.loss, tx, schedule, mesh=mesh),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  it = task.train_iterator(0, 1)
  state = state_fn()
  fixed = mesh_lib.host_batch_to_global(mesh, next(it))
  state, m = step(state, fixed)  # compile
  jax.block_until_ready(m)

  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, fixed)
  jax.block_until_ready(m)
  t_device = (time.perf_counter() - t0) / args.steps

  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, mesh_lib.host_batch_to_global(mesh, next(it)))
  jax.block_until_ready(m)
  t_fed = (time.perf_counter() - t0) / args.steps
  it.close() if hasattr(it, "close") else None

  b = c.data.global_batch_size
  print(f"devices {args.devices}, global batch {b}, {args.steps} steps")
  print(f"(a) batch on device : {t_device * 1e3:8.1f} ms/step  {b / t_device:8.1f} examples/s")
  print(f"(b) fed by grain    : {t_fed * 1e3:8.1f} ms/step  {b / t_fed:8.1f} examples/s")
  print(f"input pipeline adds : {100 * (t_fed - t_device) / t_device:+.1f}% to a step")
  return 0


if __name__ == "__main__":
  sys.exit(main())
