"""`mmcl launch` and `mmcl sweep --launcher slurm`: write the job scripts, submit them, say where
the logs are."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

from mmcl import sweep as sweep_lib
from mmcl.launch import slurm
from mmcl.config import ConfigError
from mmcl.launch.common import resolve_config


def launch_run(config_spec: str, workdir: str, *, overrides: Sequence[str],
               res: slurm.Resources, evaluate: bool = False, eval_gpus: int = 0,
               eval_poll: float = 30.0, dry_run: bool = False,
               invocation: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes WORKDIR/slurm/train.sbatch (and eval.sbatch) and submits them.

  The evaluator job starts once the training job has started (`--dependency=after:`), watches the
  workdir and ends after evaluating the final checkpoint; training never waits for it.

  Returns {"train": {"script", "job", "log"}, "eval": {...} or None}; job ids are None for a dry
  run.
  """
  res.validate()
  if eval_gpus < 0:
    raise ConfigError(f"--eval-gpus must be >= 0, got {eval_gpus}")
  config = resolve_config(config_spec, overrides)
  wd = pathlib.Path(workdir).absolute()
  chdir = os.getcwd()
  (wd / "logs").mkdir(parents=True, exist_ok=True)  # SLURM opens the log before the script runs
  train_path = slurm.write_script(wd / "slurm" / "train.sbatch", slurm.train_script(
      workdir=wd, config_json=config.to_json(), res=res, chdir=chdir, invocation=invocation))
  eval_path = None
  if evaluate:
    eval_path = slurm.write_script(wd / "slurm" / "eval.sbatch", slurm.eval_script(
        workdir=wd, res=res, chdir=chdir, gpus=eval_gpus, poll=eval_poll, invocation=invocation))
  (wd / "slurm" / "eval.jobid").unlink(missing_ok=True)
  out: dict[str, Any] = {"train": {"script": train_path, "job": None, "log": None}, "eval": None}
  if dry_run:
    if eval_path:
      out["eval"] = {"script": eval_path, "job": None, "log": None}
    return out
  job = slurm.sbatch(train_path)
  out["train"].update(job=job, log=wd / "logs" / f"train-{job}.out")
  if eval_path:
    ejob = slurm.sbatch(eval_path, dependency=f"after:{job}")
    (wd / "slurm" / "eval.jobid").write_text(ejob + "\n")
    out["eval"] = {"script": eval_path, "job": ejob, "log": wd / "logs" / f"eval-{ejob}.out"}
  return out


def launch_sweep(config_spec: str, workdir: str, *, grids: list[str], overrides: list[str],
                 seeds: list[int] | None, evaluate: bool, res: slurm.Resources,
                 max_parallel: int | None, dry_run: bool = False,
                 invocation: Sequence[str] | None = None) -> dict[str, Any]:
  """One job array over the sweep's unfinished elements (at most `max_parallel` running), and a
  job that writes the tables once the array has ended, whatever its elements' fate.

  Returns {"elements", "todo", "array": {...} or None, "collect": {...}}.
  """
  res.validate()
  if max_parallel is not None and max_parallel < 1:
    raise ConfigError(f"--max-parallel must be at least 1, got {max_parallel}")
  elements = sweep_lib.plan(config_spec, workdir, grids=grids, overrides=overrides, seeds=seeds)
  root = pathlib.Path(workdir).absolute()
  chdir = os.getcwd()
  (root / "logs").mkdir(parents=True, exist_ok=True)
  manifest = sweep_lib.new_manifest(config_spec, root, grids=grids, overrides=overrides,
                                    seeds=seeds, evaluate=evaluate, elements=elements,
                                    launcher="slurm")
  todo = [e["index"] for e in elements if not sweep_lib.element_done(e, evaluate)]
  out: dict[str, Any] = {"elements": len(elements), "todo": todo, "array": None}
  array_job = None
  if todo:
    path = slurm.write_script(root / "slurm" / "sweep-array.sbatch", slurm.array_script(
        root=root, elements=elements, indices=todo, config_spec=config_spec, evaluate=evaluate,
        res=res, chdir=chdir, max_parallel=max_parallel, invocation=invocation))
    out["array"] = {"script": path, "job": None}
    if not dry_run:
      array_job = slurm.sbatch(path)
      out["array"]["job"] = array_job
      for i in todo:
        elements[i]["log"] = str(root / "logs" / f"sweep-{array_job}_{i}.out")
  sweep_lib.write_manifest(root, manifest)
  cpath = slurm.write_script(root / "slurm" / "sweep-collect.sbatch",
                             slurm.collect_script(root=root, res=res, chdir=chdir))
  out["collect"] = {"script": cpath, "job": None}
  if not dry_run:
    cjob = slurm.sbatch(cpath, dependency=f"afterany:{array_job}" if array_job else None)
    out["collect"].update(job=cjob, log=root / "logs" / f"sweep-collect-{cjob}.out")
  return out
