"""End-to-end trainer behaviour on the tiny CLIP config: learning, resume after SIGKILL,
NaN handling, retention, and clear errors for bad input."""
import json
import os
import pathlib
import signal
import time

import jax
import numpy as np
import pytest

import shared_runs

from mmcl.config import load_config_file
from mmcl.tasks import get_task_class
from mmcl.train import checkpoint as ckpt_lib
from mmcl.train import loop as loop_lib
from mmcl.train.metric_log import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = "experiments/clip_shapes.py:tiny"


def _config(shapes_dir, **overrides):
  c = load_config_file(str(REPO / "experiments/clip_shapes.py") + ":tiny")
  c.data.dir = str(shapes_dir)
  for k, v in overrides.items():
    c.set(k.replace("__", "."), v)
  return c


def _final_params(workdir, shapes_dir):
  """Params of the newest checkpoint in `workdir`, restored on this process's 8 devices."""
  c = _config(shapes_dir)
  c.update_from_dict(json.loads((pathlib.Path(workdir) / "config.json").read_text()))
  mesh, task = loop_lib.setup(c, get_task_class(c.task.name))
  _, abstract, shardings, _, _ = loop_lib.build_state(c, task, mesh)
  ck = ckpt_lib.Checkpointer(workdir, read_only=True)
  step = ck.latest_step()
  state = ck.restore(step, ckpt_lib.abstract_with_shardings(abstract, shardings))
  return step, jax.device_get(state.params)


def test_training_learns_on_procedural_data(shapes_dir, tmp_path):
  c = _config(shapes_dir, train__total_steps=40, train__log_every=5, train__checkpoint_every=40,
              optim__lr=3e-3, optim__warmup_steps=5)
  loop_lib.train(c, tmp_path, get_task_class("clip"))
  rows = [r for r in read_metrics(tmp_path) if "loss" in r]
  first, last = rows[0]["loss"], rows[-1]["loss"]
  # ln(32) = 3.47 is the loss of an untrained model on batches of 32; learning must cut it clearly.
  assert first > 3.0 and last < 0.8 * first, (first, last)
  assert all(r["examples_per_s"] > 0 for r in rows)
  assert 0 < rows[-1]["temperature"] < 1


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(sigterm_reference, tmp_path):
  # Killed once step 8 is saved (of 24; the test polls every 10 ms); the rerun resumes, crosses a
  # retention deletion (the newest 2 of 8, 16, 24 are kept) and must end exactly where the shared
  # uninterrupted reference run (tests/shared_runs.py) ended. Two processes against one: see
  # tests/train/test_preemption.py and tests/launch/test_slurm.py.
  ref = sigterm_reference
  args = ["train", "--config", shared_runs.TINY, "--workdir", str(tmp_path), *ref["sets"]]
  p = shared_runs.cli(args, root=ref["root"], devices=2)
  ckdir = tmp_path / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    if ckdir.is_dir() and any(d.name.isdigit() and int(d.name) >= 8 for d in ckdir.iterdir()):
      break
    time.sleep(0.01)
  os.kill(p.pid, signal.SIGKILL)
  assert p.wait() == -signal.SIGKILL, "the run finished before it could be killed"
  steps = ckpt_lib.Checkpointer(tmp_path, read_only=True).all_steps()
  assert steps and max(steps) < shared_runs.TOTAL_STEPS
  assert shared_runs.cli(args, root=ref["root"], devices=2).wait(timeout=300) == 0
  shared_runs.assert_same_run(tmp_path, ref["workdir"])


def test_nan_loss_stops_with_last_good_checkpoint_intact(shapes_dir, tmp_path):
  from data_pipelines.image_text import global_batch_indices, split_size
  import jax.numpy as jnp
  c = _config(shapes_dir, train__total_steps=12, train__checkpoint_every=4)
  # A record that is in global batch 7 (0-based step 6) and in no earlier batch.
  n, bsz = split_size(shapes_dir, "train"), c.data.global_batch_size
  earlier = set(np.concatenate([global_batch_indices(n, bsz, c.seed, s) for s in range(6)]).tolist())
  poison = next(i for i in global_batch_indices(n, bsz, c.seed, 6).tolist() if i not in earlier)

  class NaNOnOneRecord(get_task_class("clip")):
    def loss(self, params, batch, rng, *, train):
      loss, aux = super().loss(params, batch, rng, train=train)
      return jnp.where(jnp.any(batch["index"] == poison), jnp.nan, loss), aux

  with pytest.raises(loop_lib.NonFiniteLossError,
                     match=f"at step 7 .*record indices.*{poison}.*Last good checkpoint: step 4"):
    loop_lib.train(c, tmp_path, NaNOnOneRecord)
  assert ckpt_lib.Checkpointer(tmp_path, read_only=True).all_steps() == [4]


def test_missing_dataset_is_a_clear_error(tmp_path, capsys, monkeypatch):
  from mmcl import cli
  monkeypatch.chdir(REPO)
  rc = cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"),
                 "--set", f"data.dir={tmp_path / 'nope'}"])
  err = capsys.readouterr().err
  assert rc == 2, err
  assert str(tmp_path / "nope") in err and "build-shapes" in err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_retention_keeps_latest_and_best(shapes_dir, tmp_path):
  c = _config(shapes_dir, train__total_steps=12, train__checkpoint_every=3,
              train__keep_checkpoints=2, train__keep_best=1)
  loop_lib.train(c, tmp_path, get_task_class("clip"))
  steps = ckpt_lib.Checkpointer(tmp_path, read_only=True).all_steps()
  vals = {r["step"]: r["val/loss"] for r in read_metrics(tmp_path) if "val/loss" in r}
  best = min(vals, key=vals.get)
  assert set(steps) == {9, 12} | {best}


def test_fork_from_another_runs_checkpoint_continues_it_exactly(shapes_dir, tmp_path):
  base = _config(shapes_dir, train__total_steps=8, train__checkpoint_every=4, train__val_batches=0,
                 train__keep_checkpoints=3)
  loop_lib.train(base, tmp_path / "a", get_task_class("clip"))
  fork = _config(shapes_dir, train__total_steps=8, train__checkpoint_every=4, train__val_batches=0,
                 train__init_from=f"{tmp_path / 'a'}:4")
  loop_lib.train(fork, tmp_path / "b", get_task_class("clip"))
  # The fork's own first checkpoint is its step 8; its steps 5..8 saw the source's batches.
  assert ckpt_lib.Checkpointer(tmp_path / "b", read_only=True).all_steps() == [8]
  la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r}
  lb = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r}
  assert min(lb) > 4 and lb == {s: la[s] for s in lb}
  (_, pa), (_, pb) = _final_params(tmp_path / "a", shapes_dir), _final_params(tmp_path / "b",
                                                                              shapes_dir)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)
  bad = _config(shapes_dir, train__init_from=f"{tmp_path / 'a'}:5")
  with pytest.raises(FileNotFoundError, match=r"init_from.*has no step 5 \(it has \[4, 8\]\)"):
    loop_lib.train(bad, tmp_path / "c", get_task_class("clip"))
