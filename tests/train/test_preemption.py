"""SIGTERM mid-run (what SLURM, Kubernetes and Cloud TPU send before they stop a job): every process
stops at one agreed step after committing a checkpoint, exits with the distinct code, and a rerun
ends bit-identical to an uninterrupted run. Without a scheduler: 1 and 2 processes."""
import os
import signal
import socket
import subprocess
import time

import pytest

import shared_runs
from mmcl.train import finished as finished_lib
from mmcl.train.preemption import EXIT_CODE
from mmcl.train.checkpoint import Checkpointer


def _wait_for_step(workdir, step, procs, timeout=300):
  """Waits until the run has logged `step` (it is then mid-run: 24 steps, checkpoints every 8)."""
  deadline = time.time() + timeout
  metrics = workdir / "metrics.jsonl"
  while time.time() < deadline:
    if metrics.exists() and f'"step": {step},' in metrics.read_text():
      return
    assert all(p.poll() is None for p in procs), "the run ended before it could be signalled"
    time.sleep(0.02)
  raise AssertionError(f"step {step} not logged in {metrics} within {timeout} s")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_one_process_checkpoints_exits_75_and_resumes_bit_identical(sigterm_reference,
                                                                           tmp_path):
  ref = sigterm_reference
  args = ["train", "--config", shared_runs.TINY, "--workdir", str(tmp_path), *ref["sets"]]
  p = shared_runs.cli(args, root=ref["root"], devices=2, stderr=subprocess.PIPE, text=True)
  _wait_for_step(tmp_path, 3, [p])
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == EXIT_CODE, err[-3000:]
  steps = Checkpointer(tmp_path, read_only=True).all_steps()
  stopped = steps[-1]
  assert 3 <= stopped < shared_runs.TOTAL_STEPS
  assert f"stopped on SIGTERM after step {stopped}" in err and "Traceback" not in err
  assert finished_lib.read(tmp_path) is None
  # The step it stopped at is the last one trained: nothing after it was logged.
  assert max(shared_runs.losses(tmp_path)) == stopped

  p = shared_runs.cli(args, root=ref["root"], devices=2)
  assert p.wait(timeout=300) == 0
  assert finished_lib.read(tmp_path)["checkpoint"] == shared_runs.TOTAL_STEPS
  shared_runs.assert_same_run(tmp_path, ref["workdir"])


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(sigterm_reference, tmp_path):
  ref = sigterm_reference

  def start(port):
    return [shared_runs.cli(
        ["train", "--config", shared_runs.TINY, "--workdir", str(tmp_path), *ref["sets"],
         "--set", f"distributed.coordinator_address=127.0.0.1:{port}",
         "--set", "distributed.num_processes=2", "--set", f"distributed.process_id={i}"],
        root=ref["root"], devices=1, stderr=subprocess.PIPE, text=True) for i in range(2)]

  procs = start(_free_port())
  _wait_for_step(tmp_path, 3, procs)
  procs[1].send_signal(signal.SIGTERM)  # only one process is told; the other must follow
  errs = [p.communicate(timeout=120)[1] for p in procs]
  assert [p.returncode for p in procs] == [EXIT_CODE, EXIT_CODE], [e[-2000:] for e in errs]
  stopped = Checkpointer(tmp_path, read_only=True).all_steps()[-1]
  assert stopped < shared_runs.TOTAL_STEPS
  for e in errs:
    assert f"stopped on SIGTERM after step {stopped}" in e
  assert finished_lib.read(tmp_path) is None

  procs = start(_free_port())
  for p in procs:
    p.communicate(timeout=300)
  assert [p.returncode for p in procs] == [0, 0]
  # Two processes × 1 device and one × 2 devices build the same mesh: identical numbers.
  shared_runs.assert_same_run(tmp_path, ref["workdir"])


def test_watcher_stops_at_the_final_checkpoint_named_by_the_marker(tmp_path):
  """A run whose data ran out at step 16 of 40 still ends `mmcl eval --watch`."""
  from mmcl.eval import evaluator, watch
  seen = []
  listed = [[8], [8, 16], [8, 16]]

  def list_steps():
    steps = listed.pop(0) if listed else [8, 16]
    if steps == [8, 16]:  # the trainer writes the marker after its final checkpoint
      finished_lib.mark(tmp_path, step=16, checkpoint=16, total_steps=40)
    return steps

  state = watch.watch(list_steps, lambda s: seen.append(s) or {"m": float(s)},
                      state_path=tmp_path / "state.json", poll_seconds=0,
                      stop_after_step=lambda: evaluator.final_step(tmp_path, 40),
                      sleep=lambda s: None)
  assert seen == [8, 16] and sorted(state.done) == [8, 16]
  finished_lib.clear(tmp_path)
  assert evaluator.final_step(tmp_path, 40) == 40  # no marker: train.total_steps, as before
