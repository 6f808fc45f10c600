"""`mmcl eval --watch` beside a real `mmcl train` (tiny CLIP) in separate processes.

One training run (8 steps, a checkpoint every 2) and its watchers are shared by the tests here:
the first watcher starts before the workdir exists and is SIGKILLed after its first evaluation;
a second one finishes the job. Then: every step evaluated exactly once, nothing redone after the
restart, best-so-far kept, reports with plots; and, on a copy of the workdir, a checkpoint still
being written (orbax's `<step>.orbax-checkpoint-tmp` directory) is never listed or evaluated.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import shared_runs

from mmcl.eval import evaluator as evaluator_lib
from mmcl.eval import watch as watch_lib
from mmcl.tasks import get_task_class

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = (2, 4, 6, 8)
PRIMARY = "t2i/recall@1"


def _cli(args, log_path):
  # 2 devices (as the other multi-process tests): smaller programs, and the eval step compiled by
  # one process is the test run's compilation cache entry for the next.
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             XLA_FLAGS=shared_runs.xla_flags(2))
  log = open(log_path, "w")
  return subprocess.Popen([sys.executable, "-m", "mmcl.cli", *args], cwd=REPO, env=env,
                          stdout=log, stderr=subprocess.STDOUT)


def _done_steps(workdir):
  path = workdir / "eval" / "state.json"
  try:
    return {int(s) for s in json.loads(path.read_text())["done"]}
  except (FileNotFoundError, json.JSONDecodeError):
    return set()


def _summaries(log_path):
  """Steps whose evaluation summary the watcher printed, in order."""
  return [int(m) for m in re.findall(r"^step (\d+):$", log_path.read_text(), re.MULTILINE)]


def _wait(procs, deadline, logs):
  for p in procs:
    try:
      p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      tails = {str(log): log.read_text()[-2000:] for log in logs}
      pytest.fail(f"processes did not finish in time: {tails}")


@pytest.fixture(scope="module")
def watched_run(shapes_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("watched")
  workdir = root / "run"  # does not exist yet when the first watcher starts
  logs = [root / "watch1.log", root / "watch2.log", root / "train.log"]
  watch_args = ["eval", "--workdir", str(workdir), "--watch", "--poll", "0.2", "--timeout", "300"]
  watcher = _cli(watch_args, logs[0])
  trainer = _cli(["train", "--config", "experiments/clip_shapes.py:tiny", "--workdir",
                  str(workdir), "--set", f"data.dir={shapes_dir}", "--set",
                  "train.checkpoint_every=2", "--set", "train.keep_checkpoints=10",
                  "--set", "train.val_batches=0"], logs[2])
  deadline = time.time() + 300
  while not _done_steps(workdir) and watcher.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert watcher.poll() is None, f"first watcher exited early: {logs[0].read_text()[-2000:]}"
  watcher.send_signal(signal.SIGKILL)
  watcher.wait()
  done_at_kill = _done_steps(workdir)
  assert done_at_kill, "the first watcher recorded no step before it was killed"
  watcher2 = _cli(watch_args, logs[1])
  _wait([trainer, watcher2], deadline, logs)
  assert trainer.returncode == 0, logs[2].read_text()[-3000:]
  assert watcher2.returncode == 0, logs[1].read_text()[-3000:]
  return dict(workdir=workdir, done_at_kill=done_at_kill, first=_summaries(logs[0]),
              second=_summaries(logs[1]))


def test_each_step_evaluated_once_across_a_watcher_restart(watched_run):
  workdir = watched_run["workdir"]
  state = json.loads((workdir / "eval" / "state.json").read_text())
  assert sorted(int(s) for s in state["done"]) == list(STEPS)
  killed, first, second = (watched_run["done_at_kill"], watched_run["first"],
                           watched_run["second"])
  # The restarted watcher redid none of the recorded steps and evaluated every other step
  # exactly once, in order. The killed one may have finished (and printed) one more step whose
  # record it had not saved yet: that step is correctly redone.
  assert second == sorted(set(STEPS) - killed)
  assert len(first) == len(set(first)) and len(set(first) - killed) <= 1
  assert set(first) - killed <= set(second)
  # Best so far: the step with the highest primary metric (the first one on ties).
  values = {int(s): m[PRIMARY] for s, m in state["done"].items()}
  best_step = max(sorted(values), key=lambda s: values[s])
  assert state["best"] == {"step": best_step, "metric": PRIMARY, "value": values[best_step]}
  for step in STEPS:
    metrics = json.loads((workdir / "eval" / str(step) / "metrics.json").read_text())
    assert metrics[PRIMARY] == pytest.approx(values[step])
    assert 0.0 <= metrics[PRIMARY] <= 1.0 and metrics["num_pairs"] == 128
    assert (workdir / "eval" / str(step) / "report.md").is_file()
  final = workdir / "eval" / "8"
  assert (final / "over_steps.png").stat().st_size > 0 and (final / "at_k.png").stat().st_size > 0
  report = (final / "report.md").read_text()
  assert "over_steps.png" in report and f"at step {best_step}." in report
  assert json.loads((workdir / "eval" / "latest.json").read_text())["step"] == 8


def test_restarted_watcher_after_the_final_step_does_nothing(watched_run, monkeypatch):
  workdir = watched_run["workdir"]
  before = {p: p.stat().st_mtime_ns for p in (workdir / "eval").rglob("*") if p.is_file()}

  def fail(self, step):
    raise AssertionError(f"step {step} evaluated again")

  monkeypatch.setattr(evaluator_lib.Evaluator, "evaluate", fail)
  state = evaluator_lib.run_evaluator(str(workdir), watch=True, poll_seconds=0.05,
                                      timeout_seconds=5, resolve_task=get_task_class)
  assert sorted(state.done) == list(STEPS)
  after = {p: p.stat().st_mtime_ns for p in (workdir / "eval").rglob("*") if p.is_file()}
  assert after == before


def test_checkpoint_being_written_is_never_listed_or_evaluated(watched_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(watched_run["workdir"], workdir, ignore=shutil.ignore_patterns("eval"))
  ckpts = workdir / "checkpoints"
  # What orbax 0.12 writes while saving step 10: the step's files under a temporary name, renamed
  # to "10" only once complete (checked against a live async save when this test was written).
  in_flight = ckpts / "10.orbax-checkpoint-tmp"
  shutil.copytree(ckpts / "8", in_flight)
  (in_flight / "commit_success.txt").unlink(missing_ok=True)
  ev = evaluator_lib.Evaluator(workdir, resolve_task=get_task_class)
  assert ev.finished_steps() == list(STEPS)

  evaluated, polls = [], []

  def sleep(seconds):
    polls.append(seconds)
    if len(polls) == 3:  # the save completes while the watcher waits
      shutil.copy(ckpts / "8" / "commit_success.txt", in_flight / "commit_success.txt")
      os.replace(in_flight, ckpts / "10")

  def evaluate(step):
    evaluated.append((step, len(polls)))
    return {PRIMARY: step / 100}

  state = watch_lib.watch(ev.finished_steps, evaluate, state_path=tmp_path / "state.json",
                          poll_seconds=0.01, stop_after_step=10, best_metric=PRIMARY,
                          sleep=sleep)
  # Steps 2..8 at once; step 10 only after its rename, never while it was in flight.
  assert evaluated == [(2, 0), (4, 0), (6, 0), (8, 0), (10, 3)]
  assert state.best == {"step": 10, "metric": PRIMARY, "value": 0.1}


def test_checkpoint_deleted_after_listing_is_skipped(watched_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(watched_run["workdir"], workdir, ignore=shutil.ignore_patterns("eval"))
  ev = evaluator_lib.Evaluator(workdir, resolve_task=get_task_class)
  listed = ev.finished_steps()
  # The trainer's retention removes step 2 between the listing and the restore.
  shutil.rmtree(workdir / "checkpoints" / "2")
  assert 2 in listed
  with pytest.raises(watch_lib.SkipStep):
    ev.evaluate_if_present(2)
