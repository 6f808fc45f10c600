"""One uninterrupted reference run shared by the preemption and SLURM tests (and by pytest-xdist
workers: the first worker to need it trains it under a file lock, the others read it).

The run is experiments/clip_shapes.py:tiny for 24 steps, one loss row per step, checkpoints every 8
(the newest 2 kept, so a resumed run crosses a retention deletion), in one process on 2 simulated
devices. Runs that must match it use 2 devices in total too (one
process with 2, or two processes with 1 each): the mesh is then the same and the numbers are
bit-identical. All processes share one JAX compilation cache, so only the first compiles.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "experiments/clip_shapes.py:tiny"
TOTAL_STEPS = 24
SCHEDULE = ["--set", f"train.total_steps={TOTAL_STEPS}", "--set", "train.log_every=1",
            "--set", "train.checkpoint_every=8", "--set", "train.keep_checkpoints=2"]
SETS = [*SCHEDULE, "--set", "train.val_batches=0"]


def shared_root(tmp_path_factory) -> pathlib.Path:
  """A directory every xdist worker of this pytest session sees."""
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared_runs"
  root.mkdir(parents=True, exist_ok=True)
  return root


@contextlib.contextmanager
def locked(path: pathlib.Path):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def xla_flags(devices: int) -> str:
  """The test run's XLA_FLAGS (tests/conftest.py: compile options) with `devices` CPU devices."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return f"--xla_force_host_platform_device_count={devices} {flags.strip()}".strip()


def env(root: pathlib.Path, devices: int) -> dict[str, str]:
  """Environment of an `mmcl` subprocess: `devices` CPU devices and the test run's compilation
  cache (tests/conftest.py), or one under `root` when none is set."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = xla_flags(devices)
  e["JAX_PLATFORMS"] = "cpu"
  e.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax-cache"))
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return e


def cli(args, *, root, devices, **kw) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "mmcl.cli", *args], cwd=REPO,
                          env=env(root, devices), **kw)


def reference_run(tmp_path_factory) -> dict:
  """{"root", "shapes", "workdir", "sets"}: the shapes dataset and the finished reference run."""
  root = shared_root(tmp_path_factory)
  shapes, workdir = root / "shapes", root / "reference"
  sets = ["--set", f"data.dir={shapes}", *SETS]
  with locked(root / ".lock"):
    if not (shapes / "metadata.json").exists():
      from data_pipelines.image_text import build_shapes_dataset
      build_shapes_dataset(shapes, num_train=512, num_test=128, image_size=32, seed=0, num_shards=2)
    if not (workdir / "FINISHED").exists():
      p = cli(["train", "--config", TINY, "--workdir", str(workdir), *sets], root=root, devices=2,
              stderr=subprocess.PIPE, text=True)
      _, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]
  return {"root": root, "shapes": shapes, "workdir": workdir, "sets": sets}


def losses(workdir) -> dict[int, float]:
  """{step: loss} as the run's resolved metric log has it (a resumed trajectory replaces the
  abandoned one)."""
  from mmcl.train.metric_log import read_metrics
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def final_params(workdir) -> tuple[int, list[np.ndarray]]:
  """(step, parameter leaves) of the newest checkpoint, restored on this process's devices."""
  import jax
  from mmcl.tasks import config_from_dict, get_task_class
  from mmcl.train import checkpoint as ckpt_lib
  from mmcl.train import loop as loop_lib
  c = config_from_dict(json.loads((pathlib.Path(workdir) / "config.json").read_text()))
  c.distributed.coordinator_address = c.distributed.num_processes = c.distributed.process_id = None
  mesh, task = loop_lib.setup(c, get_task_class(c.task.name))
  _, abstract, shardings, _, _ = loop_lib.build_state(c, task, mesh)
  ck = ckpt_lib.Checkpointer(workdir, read_only=True)
  step = ck.latest_step()
  state = ck.restore(step, ckpt_lib.abstract_with_shardings(abstract, shardings))
  ck.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def assert_same_run(workdir, reference) -> None:
  """`workdir` ended where the reference did, with the same per-step losses and bit-identical
  parameters."""
  got, want = losses(workdir), losses(reference)
  assert sorted(got) == list(range(1, TOTAL_STEPS + 1)), sorted(got)
  np.testing.assert_array_equal([got[s] for s in sorted(got)], [want[s] for s in sorted(want)])
  (s1, p1), (s2, p2) = final_params(workdir), final_params(reference)
  assert s1 == s2 == TOTAL_STEPS
  for a, b in zip(p1, p2):
    np.testing.assert_array_equal(a, b)
