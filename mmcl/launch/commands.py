"""The `mmcl launch` command and the launcher options of `mmcl sweep` (parsers and handlers; cli.py
only registers them)."""

from __future__ import annotations

import argparse
import os
import sys


def sweep_command(args) -> int:
  """`mmcl sweep`: local runs, a SLURM job array, or only the tables (--collect)."""
  from mmcl import sweep
  if args.collect:
    rows = sweep.collect(args.workdir)
    print(f"{len(rows)} grid point(s): {args.workdir}/results.md, results.csv, runs.csv")
    return 0
  if not args.config or not args.grid:
    print("mmcl sweep: error: --config and --grid are required (unless --collect)", file=sys.stderr)
    return 2
  seeds = sweep.parse_seeds(args.seeds)
  wrong = ("--max-parallel" if args.launcher == "local" and args.max_parallel is not None else
           "--parallel" if args.launcher == "slurm" and args.parallel != 1 else None)
  if wrong:
    print(f"mmcl sweep: error: {wrong} is not an option of --launcher {args.launcher} (local: "
          "--parallel K, slurm: --max-parallel K)", file=sys.stderr)
    return 2
  if args.launcher == "local":
    sweep.run_sweep(args.config, args.workdir, grids=args.grid, overrides=args.set or [],
                    evaluate=not args.no_eval, seeds=seeds, parallel=args.parallel)
    print(f"tables: {args.workdir}/results.md, results.csv, runs.csv")
    return 0
  from mmcl.launch import submit
  out = submit.launch_sweep(args.config, args.workdir, grids=args.grid, overrides=args.set or [],
                            seeds=seeds, evaluate=not args.no_eval, res=slurm_resources(args),
                            max_parallel=args.max_parallel, dry_run=args.dry_run,
                            invocation=["mmcl", *sys.argv[1:]])
  verb = "written" if args.dry_run else "submitted"
  print(f"sweep: {out['elements']} element(s), {len(out['todo'])} to run")
  if out["array"]:
    job = out["array"]["job"]
    print(f"job array {job or ''} {verb}: {out['array']['script']}".replace("  ", " "))
    if job:
      print(f"  logs: {args.workdir}/logs/sweep-{job}_<element>.out")
  c = out["collect"]
  print(f"table job {c['job'] or ''} {verb}: {c['script']}".replace("  ", " "))
  if c["job"]:
    print(f"  writes {args.workdir}/results.md and results.csv when the array has ended; "
          f"log {c['log']}")
  return 0


def launch_command(args) -> int:
  """`mmcl launch`: write and submit the sbatch scripts of one run (and its evaluator)."""
  from mmcl.launch import submit
  out = submit.launch_run(args.config, args.workdir, overrides=args.set or [],
                          res=slurm_resources(args), evaluate=args.eval,
                          eval_gpus=args.eval_gpus, eval_poll=args.eval_poll,
                          dry_run=args.dry_run, invocation=["mmcl", *sys.argv[1:]])
  for name, what in (("train", "training"), ("eval", "evaluator")):
    job = out[name]
    if job is None:
      continue
    if job["job"] is None:
      print(f"{what} script written (not submitted): {job['script']}")
    else:
      print(f"{what} job {job['job']} submitted: {job['script']}")
      print(f"  log: {job['log']}")
  if out["train"]["job"]:
    jobs = ",".join(j["job"] for j in (out["train"], out["eval"]) if j)
    print(f"follow: tail -f {out['train']['log']}   squeue -j {jobs}")
  return 0


def slurm_resources(args):
  from mmcl.launch.common import captured_env
  from mmcl.launch.slurm import Resources
  return Resources(nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                   gpus_per_node=args.gpus_per_node, partition=args.partition,
                   account=args.account, time=args.time, signal_seconds=args.signal_seconds,
                   sbatch_args=args.sbatch_arg or [], setup=args.setup or [],
                   env=captured_env(os.environ, args.env or []))


def add_slurm_options(p: argparse.ArgumentParser) -> None:
  """Resources and script options shared by `mmcl launch` and `mmcl sweep --launcher slurm`."""
  g = p.add_argument_group("SLURM (--launcher slurm)")
  g.add_argument("--nodes", type=int, default=1, help="nodes per run")
  g.add_argument("--tasks-per-node", type=int, default=1,
                 help="processes per node, each one JAX process (default 1: it drives every GPU "
                      "of its node; or as many as --gpus-per-node: one GPU each)")
  g.add_argument("--gpus-per-node", type=int, default=0)
  g.add_argument("--partition")
  g.add_argument("--account")
  g.add_argument("--time", help="time limit, e.g. 04:00:00")
  g.add_argument("--signal-seconds", type=int, default=120,
                 help="SIGTERM this long before the time limit (checkpoint, then requeue)")
  g.add_argument("--sbatch-arg", action="append", metavar="OPTION",
                 help="another sbatch option, e.g. --sbatch-arg=--exclusive (repeatable)")
  g.add_argument("--setup", action="append", metavar="SHELL",
                 help="a shell line run before the command, e.g. 'module load cuda' (repeatable)")
  g.add_argument("--env", action="append", metavar="NAME=VALUE",
                 help="export in the job (JAX_*, XLA_*, MMCL_* and PYTHONPATH of this shell "
                      "are exported too)")
  g.add_argument("--dry-run", action="store_true", help="write the scripts, submit nothing")


def add_sweep_options(s: argparse.ArgumentParser) -> None:
  """Seeds, launchers and tables of `mmcl sweep` (its --config, --workdir, --grid, --set, --no-eval
  are declared in cli.py)."""
  s.add_argument("--seeds", metavar="S1,S2,...",
                 help="run every grid point with each seed (config key `seed`)")
  s.add_argument("--launcher", choices=("local", "slurm"), default="local")
  s.add_argument("--parallel", type=int, default=1, help="local: elements run at a time")
  s.add_argument("--max-parallel", type=int, help="slurm: array elements running at a time")
  s.add_argument("--collect", action="store_true",
                 help="only write the tables from what the elements have finished")
  add_slurm_options(s)


def add_launch_parser(sub) -> None:
  """`mmcl launch --launcher slurm ...`."""
  la = sub.add_parser("launch", help="submit a training run (and its evaluator) to a cluster")
  la.add_argument("--launcher", choices=("slurm",), required=True)
  la.add_argument("--config", required=True, help="experiments/<file>.py[:arg] or a config.json")
  la.add_argument("--workdir", required=True, help="on a filesystem every node sees")
  la.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
  la.add_argument("--eval", action="store_true",
                  help="also submit `mmcl eval --watch` as its own job")
  la.add_argument("--eval-gpus", type=int, default=0, help="GPUs of the evaluator job")
  la.add_argument("--eval-poll", type=float, default=30.0,
                  help="seconds between the evaluator's checks for new checkpoints")
  add_slurm_options(la)
  la.set_defaults(fn=launch_command)
