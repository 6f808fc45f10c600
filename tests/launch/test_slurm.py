"""Real jobs on a real SLURM cluster (experiments/cluster/start_local_slurm.sh: a controller and two
simulated nodes on this machine): `mmcl launch` on 2 nodes with its evaluator job, a sweep as a
job array, SIGTERM → checkpoint → requeue → bit-identical resume, and `mmcl train` in an sbatch
script without srun.

Without SLURM on PATH (or no cluster answering) these tests are skipped, except under CI=true,
where that is a failure. All jobs are submitted together, once per test session (shared by xdist
workers through a file), so they run side by side; each test then waits for its own.
"""
import contextlib
import csv
import io
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import shared_runs
from mmcl import cli
from mmcl.train import finished as finished_lib

pytestmark = pytest.mark.slow
CI = os.environ.get("CI") == "true"
START = "bash experiments/cluster/start_local_slurm.sh"
JOB_TIMEOUT = 420


def _cluster_problem() -> str | None:
  missing = [b for b in ("sbatch", "srun", "scontrol", "scancel") if shutil.which(b) is None]
  if missing:
    return f"SLURM commands not on PATH ({', '.join(missing)}); start a local cluster with: {START}"
  try:
    r = subprocess.run(["srun", "-N", "2", "-t", "1", "true"], capture_output=True, text=True,
                       timeout=60)
  except subprocess.TimeoutExpired:
    return f"no SLURM cluster ran `srun -N 2 true` within 60 s; start one with: {START}"
  if r.returncode != 0:
    return f"`srun -N 2 true` failed ({' '.join(r.stderr.split())[:300]}); start a cluster: {START}"
  return None


def _job(jid: str) -> dict[str, str]:
  r = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True)
  fields = {}
  for line in r.stdout.splitlines()[:1]:
    for m in re.finditer(r"(\w+)=(\S*)", line):
      fields.setdefault(m.group(1), m.group(2))
  return fields


def _wait(jid: str, log: pathlib.Path | None = None, timeout: float = JOB_TIMEOUT) -> dict:
  """Waits until job `jid` has ended; returns its `scontrol show job` fields."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    job = _job(jid)
    if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                               "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
      return job
    time.sleep(0.5)
  tail = log.read_text()[-3000:] if log and log.exists() else ""
  raise AssertionError(f"job {jid} did not end within {timeout} s: {_job(jid)}\n{tail}")


def _submit(args, *, root, devices) -> str:
  """Runs an `mmcl launch` / `mmcl sweep --launcher slurm` command in this process (it only writes
  scripts and calls sbatch) with the environment its jobs must inherit; returns what it printed."""
  saved, cwd = dict(os.environ), os.getcwd()
  os.environ.update(shared_runs.env(root, devices))
  os.chdir(shared_runs.REPO)
  out, err = io.StringIO(), io.StringIO()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      rc = cli.main(list(args))
  finally:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(saved)
  assert rc == 0, err.getvalue()[-3000:]
  return out.getvalue()


def _job_ids(stdout: str) -> list[str]:
  return re.findall(r"job (?:array )?(\d+) submitted", stdout)


# Augmentation is host-side numpy: every element runs the reference run's compiled step (the
# schedule is constant, so 8 steps instead of 24 compile the same program).
SWEEP_GRID = ["--grid", "data.augment=true,false"]
SWEEP_STEPS = ["--set", "train.total_steps=8", "--set", "train.checkpoint_every=4"]


@pytest.fixture(scope="module")
def jobs(request):
  problem = _cluster_problem()  # before the reference run: a skip costs nothing
  if problem:
    if CI:
      pytest.fail(f"CI=true but {problem}")
    pytest.skip(problem)
  return _submit_all(request.getfixturevalue("sigterm_reference"))


@contextlib.contextmanager
def _cancelled_on_failure(*job_ids):
  """A failing test cancels its jobs, so that none outlives it."""
  try:
    yield
  except BaseException:
    subprocess.run(["scancel", *job_ids], capture_output=True)
    raise


def _submit_all(sigterm_reference):
  """Submits every job of this module once per session; returns what each test needs."""
  ref = sigterm_reference
  root = ref["root"]
  record = root / "slurm_jobs.json"
  with shared_runs.locked(root / ".slurm.lock"):
    if record.exists():
      return json.loads(record.read_text())
    out: dict = {"root": str(root), "sets": ref["sets"], "reference": str(ref["workdir"])}
    sets = ref["sets"]
    launch = ["launch", "--launcher", "slurm", "--config", shared_runs.TINY, "--nodes", "2"]
    # (c) first: it must be signalled mid-run; the sweep and (d) are submitted meanwhile.
    wd = root / "slurm-sigterm"
    (out["sigterm_job"],) = _job_ids(_submit([*launch, "--workdir", str(wd), *sets], root=root,
                                             devices=1))
    out["sigterm_workdir"] = str(wd)
    # (b) 2 grid points × 2 seeds as one job array, then the table job.
    out["sweep_workdir"] = str(root / "slurm-sweep")
    sweeping = _submit(["sweep", "--launcher", "slurm", "--config", shared_runs.TINY,
                        "--workdir", out["sweep_workdir"], *SWEEP_GRID, "--seeds", "0,1",
                        "--max-parallel", "2", *sets, *SWEEP_STEPS], root=root, devices=2)
    # (d) mmcl train in an sbatch script, no srun: one process on 2 devices.
    wd = root / "slurm-wrap"
    wd.mkdir()
    cmd = " ".join([sys.executable, "-m", "mmcl.cli", "train", "--config", shared_runs.TINY,
                    "--workdir", str(wd), *sets])
    r = subprocess.run(["sbatch", "--parsable", f"--output={wd}/job.out",
                        f"--chdir={shared_runs.REPO}", "--wrap", cmd],
                       env=shared_runs.env(root, 2), capture_output=True, text=True, check=True)
    out["wrap_job"], out["wrap_workdir"] = r.stdout.strip().split(";")[0], str(wd)
    out["sigterm_stopped"] = _preempt(out["sigterm_job"], pathlib.Path(out["sigterm_workdir"]))
    # (a) 2 nodes × 1 task with its evaluator job; submitted once (c) has compiled the 2-process
    # step into the shared cache, which (a) then reuses.
    out["launch_workdir"] = str(root / "slurm-launch")
    launching = _submit([*launch, "--workdir", out["launch_workdir"], "--tasks-per-node", "1",
                         "--eval", "--eval-poll", "1", *sets], root=root, devices=1)
    out["launch_train"], out["launch_eval"] = _job_ids(launching)
    out["sweep_array"], out["sweep_collect"] = re.findall(r"job (?:array )?(\d+) ", sweeping)[:2]
    record.write_text(json.dumps(out))
    return out


def test_launch_two_nodes_matches_one_process_and_evaluator_job_ends(jobs):
  with _cancelled_on_failure(jobs["launch_train"], jobs["launch_eval"]):
    wd = pathlib.Path(jobs["launch_workdir"])
    train = _wait(jobs["launch_train"], next(iter((wd / "logs").glob("train-*.out")), None))
    assert train["JobState"] == "COMPLETED", (train, (wd / "logs").iterdir())
    log = (wd / "logs" / f"train-{jobs['launch_train']}.out").read_text()
    assert "2 task(s)" in log and "resuming" not in log
    # Per-step losses of 2 processes on 2 nodes = those of 1 process.
    got, want = shared_runs.losses(wd), shared_runs.losses(jobs["reference"])
    assert sorted(got) == sorted(want) == list(range(1, shared_runs.TOTAL_STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=1e-6)
    # Each checkpoint written once, by the two processes together (one grain state file each).
    rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("event") == "start" for r in rows) == 1
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, shared_runs.TOTAL_STEPS + 1))
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["16", "24"]  # keep 2
    data_iter = sorted(p.name for p in (wd / "checkpoints" / "24" / "data_iter").iterdir())
    assert len([n for n in data_iter if "process" in n]) == 2, data_iter
    assert finished_lib.read(wd)["checkpoint"] == shared_runs.TOTAL_STEPS
    # The evaluator job: every checkpoint it saw evaluated once, ended by the FINISHED marker.
    ev = _wait(jobs["launch_eval"])
    assert ev["JobState"] == "COMPLETED", ev
    state = json.loads((wd / "eval" / "state.json").read_text())
    assert str(shared_runs.TOTAL_STEPS) in state["done"]
    eval_log = (wd / "logs" / f"eval-{jobs['launch_eval']}.out").read_text()
    evaluated = re.findall(r"^step (\d+):", eval_log, flags=re.M)
    assert len(evaluated) == len(set(evaluated)) and evaluated[-1] == str(shared_runs.TOTAL_STEPS)


def _preempt(jid: str, wd: pathlib.Path) -> dict:
  """Sends SIGTERM to job `jid` once it has logged step 3, waits until it is requeued, and makes
  it eligible to start again at once. Returns what the interrupted run left."""
  log = wd / "logs" / f"train-{jid}.out"
  deadline = time.time() + JOB_TIMEOUT
  metrics = wd / "metrics.jsonl"
  while not (metrics.exists() and '"step": 3,' in metrics.read_text()):
    assert time.time() < deadline and _job(jid).get("JobState") in ("PENDING", "RUNNING"), (
        _job(jid), log.read_text()[-3000:] if log.exists() else "")
    time.sleep(0.05)
  # What SLURM does ahead of the time limit (--signal=B:TERM@S): SIGTERM to the batch shell.
  subprocess.run(["scancel", "--signal=TERM", "--batch", jid], check=True)
  while True:  # requeued: pending again, with one restart
    job = _job(jid)
    if job.get("Restarts") == "1" and job.get("JobState") == "PENDING":
      break
    assert time.time() < deadline and job.get("JobState") in ("RUNNING", "COMPLETING", "PENDING"), (
        job, log.read_text()[-3000:])
    time.sleep(0.2)
  stopped = {"last_logged": max(shared_runs.losses(wd)),
             "checkpoints": sorted(int(p.name) for p in (wd / "checkpoints").iterdir()
                                   if p.name.isdigit()),
             "finished": finished_lib.read(wd)}
  # SLURM holds a requeued job for 120 s; make it eligible now, but not within the second of the
  # requeue (slurmd refuses a job credential issued in the second its predecessor was revoked).
  time.sleep(2)
  subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=True)
  return stopped


def test_sigterm_requeues_and_resumes_bit_identical(jobs):
  with _cancelled_on_failure(jobs["sigterm_job"]):
    wd, jid = pathlib.Path(jobs["sigterm_workdir"]), jobs["sigterm_job"]
    log = wd / "logs" / f"train-{jid}.out"
    stopped = jobs["sigterm_stopped"]
    # Interrupted mid-run; the step it stopped at was checkpointed and nothing after it was trained.
    assert stopped["finished"] is None
    assert 3 <= stopped["last_logged"] < shared_runs.TOTAL_STEPS
    assert stopped["checkpoints"][-1] == stopped["last_logged"]
    job = _wait(jid, log)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", job
    text = log.read_text()
    assert "requeueing job" in text and "(restart 1)" in text
    assert f"resuming from {wd / 'checkpoints'} at step {stopped['last_logged']}" in text
    shared_runs.assert_same_run(wd, jobs["reference"])


def test_train_in_sbatch_script_without_srun_runs_as_one_process(jobs):
  with _cancelled_on_failure(jobs["wrap_job"]):
    wd = pathlib.Path(jobs["wrap_workdir"])
    job = _wait(jobs["wrap_job"], wd / "job.out")
    assert job["JobState"] == "COMPLETED", (job, (wd / "job.out").read_text()[-3000:])
    assert "coordinator_address" not in (wd / "job.out").read_text()
    got, want = shared_runs.losses(wd), shared_runs.losses(jobs["reference"])
    assert got == want


def _element_numbers(workdir: pathlib.Path) -> dict[str, float]:
  summary = json.loads((workdir / "train_summary.json").read_text())
  latest = json.loads((workdir / "eval" / "latest.json").read_text())
  return {"final/loss": summary["loss"], "eval/t2i/recall@1": latest["t2i/recall@1"]}


def test_sweep_job_array_tabulates_mean_and_se_over_seeds(jobs):
  with _cancelled_on_failure(jobs["sweep_array"], jobs["sweep_collect"]):
    wd = pathlib.Path(jobs["sweep_workdir"])
    collect = _wait(jobs["sweep_collect"])
    assert collect["JobState"] == "COMPLETED", collect
    array = subprocess.run(["scontrol", "show", "job", jobs["sweep_array"]], capture_output=True,
                           text=True).stdout
    assert array.count("JobState=COMPLETED") == 4, array
    rows = list(csv.DictReader(open(wd / "results.csv")))
    assert [r["data.augment"] for r in rows] == ["true", "false"]
    for row in rows:
      assert row["status"] == "ok" and row["seeds"] == "2" and row["not finished"] == ""
      elements = [_element_numbers(wd / row["run"] / f"seed{s}") for s in (0, 1)]
      for metric in ("final/loss", "eval/t2i/recall@1"):
        values = [e[metric] for e in elements]
        mean = (values[0] + values[1]) / 2
        se = abs(values[0] - values[1]) / 2  # sample std / sqrt(2) for two values
        assert math.isclose(float(row[metric]), mean, rel_tol=1e-12), (metric, row, values)
        assert math.isclose(float(row[f"{metric} se"]), se, rel_tol=1e-9, abs_tol=1e-15)
      assert elements[0]["final/loss"] != elements[1]["final/loss"]  # seeds differ: SE > 0
    md = (wd / "results.md").read_text()
    assert md.count("| ok | 2 |") == 2 and " ± " in md
    # Submitting the same sweep again runs nothing: every element has finished.
    out = _submit(["sweep", "--launcher", "slurm", "--config", shared_runs.TINY,
                   "--workdir", str(wd), *SWEEP_GRID, "--seeds", "0,1", "--max-parallel", "2", *jobs["sets"]],
                  root=pathlib.Path(jobs["root"]), devices=2)
    assert "4 element(s), 0 to run" in out and "job array" not in out
    (table_job,) = re.findall(r"table job (\d+) submitted", out)
    assert _wait(table_job)["JobState"] == "COMPLETED"
