"""SLURM: self-contained sbatch scripts for training, the evaluator and sweeps; their submission.

Every script is written into the run's workdir (`WORKDIR/slurm/*.sbatch`) before it is submitted and
holds everything the job needs: the resources, the working directory, the environment variables
that decide where the code is and how JAX runs (`common.captured_env`), the resolved config
(training) and the exact commands; `sbatch` on the file alone reruns it. Logs go to
`WORKDIR/logs/`.

Inside a job, `srun` starts the same `mmcl train` in every task; JAX reads the process count and
ranks from SLURM, and the script points it at the first node of the job by the address SLURM knows
it by (its NodeAddr), on the port JAX itself derives from the job id, so node names need not
resolve.

Preemption and time limits: the training script asks SLURM for SIGTERM to the batch shell
`signal_seconds` before the time limit (`--signal=B:TERM@S`) and is requeueable (`--requeue`). The
shell passes the signal on to the tasks (`scancel --signal=TERM` of the job's steps: srun itself
must not get it, as srun answers SIGTERM by killing its tasks). Every process finishes its step, all
agree on one step to stop at, a checkpoint is committed and `mmcl train` exits with
`preemption.EXIT_CODE`; the script then requeues the job (`scontrol requeue`), and the requeued job
resumes from that checkpoint. SIGTERM sent straight to the tasks (`scancel --signal=TERM JOB`) takes
the same path.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

from mmcl.config import ConfigError
from mmcl.launch.common import quote


class SubmitError(RuntimeError):
  """sbatch is missing or refused a script; the message is one line naming the script."""


@dataclasses.dataclass
class Resources:
  """What one job asks SLURM for.

  Attributes:
    nodes: nodes of the job.
    tasks_per_node: processes per node; each runs the same `mmcl train` (one JAX process).
    gpus_per_node: GPUs per node (0: none requested). They are split evenly over the node's tasks:
      with 1 task a process drives all of them, with as many tasks as GPUs one each.
    partition, account, time: `--partition`, `--account`, `--time` (None: the cluster default).
    signal_seconds: SIGTERM this long before the time limit (training jobs).
    sbatch_args: further sbatch options, one `#SBATCH` line each (e.g. "--exclusive").
    setup: shell lines run before the command (e.g. "module load cuda/12.4").
    env: environment variables exported by the script.
  """
  nodes: int = 1
  tasks_per_node: int = 1
  gpus_per_node: int = 0
  partition: str | None = None
  account: str | None = None
  time: str | None = None
  signal_seconds: int = 120
  sbatch_args: Sequence[str] = ()
  setup: Sequence[str] = ()
  env: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def validate(self) -> None:
    for name in ("nodes", "tasks_per_node"):
      if getattr(self, name) < 1:
        raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, "
                          f"got {getattr(self, name)}")
    if self.gpus_per_node < 0:
      raise ConfigError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
    if self.gpus_per_node and self.gpus_per_node % self.tasks_per_node:
      raise ConfigError(f"--gpus-per-node {self.gpus_per_node} is not a multiple of "
                        f"--tasks-per-node {self.tasks_per_node}: each task needs the same number "
                        f"of GPUs")
    if self.signal_seconds < 0:
      raise ConfigError(f"--signal-seconds must be >= 0, got {self.signal_seconds}")
    for a in self.sbatch_args:
      if not a.startswith("-"):
        raise ConfigError(f"--sbatch-arg {a!r} is not an sbatch option "
                          "(e.g. --sbatch-arg=--exclusive)")

  @property
  def gpus_per_task(self) -> int:
    return self.gpus_per_node // self.tasks_per_node


def _header(*, job_name: str, output: pathlib.Path, res: Resources, chdir: str, ntasks: bool = True,
            gpus: int | None = None, extra: Sequence[str] = ()) -> list[str]:
  gpus = res.gpus_per_node if gpus is None else gpus
  lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}"]
  if ntasks:
    lines += [f"#SBATCH --nodes={res.nodes}", f"#SBATCH --ntasks-per-node={res.tasks_per_node}"]
  else:
    lines += ["#SBATCH --nodes=1", "#SBATCH --ntasks=1"]
  if gpus:
    lines.append(f"#SBATCH --gpus-per-node={gpus}")
  for opt in ("partition", "account", "time"):
    if getattr(res, opt):
      lines.append(f"#SBATCH --{opt}={getattr(res, opt)}")
  lines += [f"#SBATCH --chdir={chdir}", f"#SBATCH --output={output}", "#SBATCH --open-mode=append"]
  lines += [f"#SBATCH {a}" for a in extra]
  lines += [f"#SBATCH {a}" for a in res.sbatch_args]
  return lines


def _prelude(res: Resources, chdir: str, dirs: Sequence[pathlib.Path]) -> list[str]:
  lines = ["set -uo pipefail", f"cd {quote([chdir])}"]
  if res.env:
    lines.append("# From the environment of `mmcl launch`: where the code is, how JAX runs.")
    lines += [f"export {k}={quote([v])}" for k, v in res.env.items()]
  lines += list(res.setup)
  lines.append(f"mkdir -p {quote(dirs)}")
  lines += [
      "# JAX reads the process count and ranks from srun. Its coordinator is the job's first",
      "# node, named by the address SLURM has for it (node names need not resolve), on the port",
      "# JAX itself derives from the job id.",
      'first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
      "first_addr=$(scontrol show node \"$first_node\" 2>/dev/null"
      " | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
      'export JAX_COORDINATOR_ADDRESS="${first_addr:-$first_node}:'
      '$((61440 + SLURM_JOB_ID % 4096))"',
  ]
  return lines


def _srun(res: Resources, command: Sequence[str]) -> str:
  """`srun` of `command` in every task; with several GPUs per task, each task takes its own block
  of the node's GPUs (JAX's SLURM default is one GPU per task, the one of SLURM_LOCALID)."""
  k = res.gpus_per_task
  if k > 1:
    pick = (f'export JAX_LOCAL_DEVICE_IDS=$(seq -s, $((SLURM_LOCALID * {k})) '
            f'$((SLURM_LOCALID * {k} + {k - 1}))); exec "$@"')
    return f"srun --kill-on-bad-exit=0 bash -c {quote([pick])} mmcl-task {quote(command)}"
  return f"srun --kill-on-bad-exit=0 {quote(command)}"


def _run_forwarding_sigterm(srun_line: str) -> list[str]:
  """Runs `srun_line` in the background and waits for it; a SIGTERM to this shell is passed on to
  the job's tasks (not to srun, which would kill them). Leaves srun's exit status in $rc."""
  return [
      srun_line + " &",
      "srun_pid=$!",
      "trap 'echo \"mmcl: SIGTERM: passed on to the tasks, which stop after the step in flight"
      " with a checkpoint\"; scancel --signal=TERM \"$SLURM_JOB_ID\"' TERM",
      "# `wait` returns early when the trap runs; wait until srun has really ended.",
      'while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done',
      'wait "$srun_pid"; rc=$?',
      "trap - TERM",
  ]


def _requeue_on_preemption(rc_var: str = "rc") -> list[str]:
  from mmcl.train.preemption import EXIT_CODE  # imports jax: only when a script is written
  return [
      f'if [ "${rc_var}" -eq {EXIT_CODE} ]; then',
      '  echo "mmcl: training stopped on SIGTERM after committing a checkpoint; requeueing job '
      '$SLURM_JOB_ID (it resumes from that checkpoint)"',
      '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
      "fi",
  ]


def python_command(*args: str) -> list[str]:
  return [sys.executable, "-m", "mmcl.cli", *args]


def _stamp(invocation: Sequence[str] | None) -> list[str]:
  when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  lines = [f"# Written by `mmcl` on {when}; `sbatch` on this file alone reruns it."]
  if invocation:
    lines.append(f"# From: {quote(invocation)}")
  return lines


def train_script(*, workdir: pathlib.Path, config_json: str, res: Resources, chdir: str,
                 invocation: Sequence[str] | None = None) -> str:
  """The training job: the resolved config, `srun mmcl train` in every task, requeue on SIGTERM.

  A rerun (requeue or resubmission) resumes from the newest checkpoint in `workdir`.
  """
  sdir, logs = workdir / "slurm", workdir / "logs"
  cfg = sdir / "config.json"
  extra = ["--requeue", f"--signal=B:TERM@{res.signal_seconds}"]
  lines = _header(job_name=f"mmcl-train-{workdir.name}", output=logs / "train-%j.out", res=res,
                  chdir=chdir, extra=extra)
  lines += _stamp(invocation)
  lines += _prelude(res, chdir, [sdir, logs])
  lines += ["# The resolved config of this run (--config file and every --set applied).",
            f"cat > {quote([cfg])} <<'MMCL_CONFIG_EOF'", config_json.rstrip("\n"),
            "MMCL_CONFIG_EOF",
            'echo "mmcl: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on '
            '$SLURM_JOB_NODELIST, ${SLURM_NTASKS:-1} task(s)"']
  lines += _run_forwarding_sigterm(
      _srun(res, python_command("train", "--config", str(cfg), "--workdir", str(workdir))))
  lines += _requeue_on_preemption()
  lines += [
      "# The evaluator waits for the FINISHED marker, which a failed run never writes: stop it.",
      f'if [ "$rc" -ne 0 ] && [ -s {quote([sdir / "eval.jobid"])} ]; then',
      f'  scancel "$(cat {quote([sdir / "eval.jobid"])})"',
      "fi",
      'exit "$rc"']
  return "\n".join(lines) + "\n"


def eval_script(*, workdir: pathlib.Path, res: Resources, chdir: str, gpus: int, poll: float,
                invocation: Sequence[str] | None = None) -> str:
  """The evaluator job: `mmcl eval --watch`, one process, until the trainer's FINISHED marker."""
  sdir, logs = workdir / "slurm", workdir / "logs"
  lines = _header(job_name=f"mmcl-eval-{workdir.name}", output=logs / "eval-%j.out", res=res,
                  chdir=chdir, ntasks=False, gpus=gpus, extra=["--requeue"])
  lines += _stamp(invocation)
  lines += _prelude(res, chdir, [sdir, logs])
  cmd = python_command("eval", "--workdir", str(workdir), "--watch", "--poll", f"{poll:g}")
  lines += [f"srun --kill-on-bad-exit=0 {quote(cmd)}"]
  return "\n".join(lines) + "\n"


def array_script(*, root: pathlib.Path, elements: Sequence[dict], indices: Sequence[int],
                 config_spec: str, evaluate: bool, res: Resources, chdir: str,
                 max_parallel: int | None, invocation: Sequence[str] | None = None) -> str:
  """One job array over sweep elements: element i trains (`srun`, every task) in its own workdir,
  then evaluates its final checkpoint (one process: the training process itself for a one-task
  element); requeued on SIGTERM like a training job."""
  logs = root / "logs"
  array = compress_indices(indices) + (f"%{max_parallel}" if max_parallel else "")
  extra = [f"--array={array}", "--requeue", f"--signal=B:TERM@{res.signal_seconds}"]
  lines = _header(job_name=f"mmcl-sweep-{root.name}", output=logs / "sweep-%A_%a.out", res=res,
                  chdir=chdir, extra=extra)
  lines += _stamp(invocation)
  lines += _prelude(res, chdir, [logs])
  lines.append('case "$SLURM_ARRAY_TASK_ID" in')
  for e in elements:
    sets = [a for o in e["overrides"] for a in ("--set", o)]
    lines.append(f"  {e['index']}) workdir={quote([e['workdir']])}; sets=({quote(sets)}) ;;")
  lines += ['  *) echo "mmcl: this sweep has no element $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
            "esac",
            'echo "mmcl: element $SLURM_ARRAY_TASK_ID (job $SLURM_JOB_ID, restart '
            '${SLURM_RESTART_COUNT:-0}): $workdir"']
  # A one-task element evaluates its final checkpoint in the training process (`train --eval`);
  # a multi-task one in a process of its own on this node once training has ended.
  in_process = evaluate and res.nodes * res.tasks_per_node == 1
  lines += _run_forwarding_sigterm(
      _srun(res, python_command("train", "--config", config_spec, "--workdir", "WORKDIR"))
      .replace("WORKDIR", '"$workdir" "${sets[@]}"' + (" --eval" if in_process else "")))
  lines += _requeue_on_preemption()
  if evaluate and not in_process:
    lines += ["# The final checkpoint's evaluation: one process on this node (no srun needed).",
              'if [ "$rc" -eq 0 ]; then',
              f'  {quote(python_command("eval", "--workdir"))} "$workdir"; rc=$?',
              "fi"]
  lines.append('exit "$rc"')
  return "\n".join(lines) + "\n"


def collect_script(*, root: pathlib.Path, res: Resources, chdir: str) -> str:
  """The job that tabulates a sweep once its array has ended (results.csv / results.md)."""
  logs = root / "logs"
  lines = _header(job_name=f"mmcl-sweep-collect-{root.name}", output=logs / "sweep-collect-%j.out",
                  res=dataclasses.replace(res, sbatch_args=()), chdir=chdir, ntasks=False, gpus=0)
  lines += ["set -uo pipefail", f"cd {quote([chdir])}"]
  lines += [f"export {k}={quote([v])}" for k, v in res.env.items()]
  lines += list(res.setup)
  lines += [quote(python_command("sweep", "--collect", "--workdir", str(root)))]
  return "\n".join(lines) + "\n"


def compress_indices(indices: Sequence[int]) -> str:
  """[0, 1, 2, 5, 7, 8] → "0-2,5,7-8" (sbatch --array syntax)."""
  out, idx = [], sorted(set(indices))
  i = 0
  while i < len(idx):
    j = i
    while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
      j += 1
    out.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
    i = j + 1
  return ",".join(out)


def write_script(path: pathlib.Path, text: str) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  tmp.chmod(0o755)
  os.replace(tmp, path)
  return path


def sbatch(script: pathlib.Path, *, dependency: str | None = None) -> str:
  """Submits `script`; returns the job id.

  Raises:
    SubmitError: sbatch is not installed, or refused the script (its message, one line).
  """
  exe = shutil.which("sbatch")
  if exe is None:
    raise SubmitError(f"sbatch not found on PATH: submit {script} from a SLURM login node, or "
                      "write the script only with --dry-run")
  cmd = [exe, "--parsable"]
  if dependency:
    cmd.append(f"--dependency={dependency}")
  r = subprocess.run(cmd + [str(script)], capture_output=True, text=True)
  if r.returncode != 0:
    msg = " ".join((r.stderr or r.stdout).split()) or f"exit code {r.returncode}"
    raise SubmitError(f"sbatch refused {script}: {msg}")
  return r.stdout.strip().split(";")[0]
