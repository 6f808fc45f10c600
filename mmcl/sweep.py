"""`mmcl sweep`: train every combination of a grid of config overrides, over seeds, then tabulate.

An *element* is one (grid point, seed): `mmcl train` in its own workdir, then `mmcl eval` of its
final checkpoint, each in a fresh process (isolated JAX runtime; a crash stops only that element).
Workdirs: `ROOT/<point>` without `--seeds`, `ROOT/<point>/seed<S>` with them (`--set seed=S`).
An element whose workdir holds the trainer's FINISHED marker (and, when evaluating, the evaluation
of its final checkpoint) is done and never rerun, so a sweep invoked again continues where it
stopped.

Launchers: `local` (the default) runs elements here, `--parallel K` at a time; `slurm` submits one
job array (`--max-parallel K` elements at a time) plus a job that tabulates once the array has
ended (`mmcl sweep --collect`). `ROOT/sweep.json` records the plan (config, grid, seeds, element
workdirs and log files), which `--collect` reads.

Tables (`collect`): `results.csv` / `results.md` hold one row per grid point with, for every final
training metric (`final/*` from train_summary.json, `best_step` / `best_value` by
`train.best_metric`) and every evaluator metric (`eval/*`), the mean and the standard error of the
mean over the seeds that finished (`<metric> se`; SE = sample standard deviation / √n, empty for
n = 1), the number of seeds finished, and the elements that did not finish with their log files.
`runs.csv` holds one row per element.
"""

from __future__ import annotations

import concurrent.futures
import csv
import itertools
import json
import math
import os
import pathlib
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from mmcl.config import ConfigError, load_config_file
from mmcl.train import finished as finished_lib

MANIFEST = "sweep.json"


def parse_grid(grids: list[str]) -> list[tuple[str, list[str]]]:
  """['a.b=1,2', 'c=x,y'] → [('a.b', ['1', '2']), ('c', ['x', 'y'])]."""
  out = []
  for g in grids:
    if "=" not in g:
      raise ConfigError(f"--grid {g!r} is not of the form key=v1,v2")
    key, values = g.split("=", 1)
    out.append((key.strip(), [v for v in values.split(",") if v != ""]))
  return out


def parse_seeds(text: str | None) -> list[int] | None:
  """'0,1,2' → [0, 1, 2]; None stays None (each run keeps its config's seed)."""
  if text is None:
    return None
  try:
    seeds = [int(s) for s in text.split(",") if s.strip() != ""]
  except ValueError:
    raise ConfigError(f"--seeds {text!r} is not a comma-separated list of integers") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ConfigError(f"--seeds {text!r} must name at least one seed, each once")
  return seeds


def _run_name(assignments: list[str]) -> str:
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(assignments)) or "default"


def plan(config_spec: str, root: str | os.PathLike, *, grids: list[str], overrides: list[str],
         seeds: list[int] | None = None) -> list[dict[str, Any]]:
  """The sweep's elements, each {"index", "point", "assignments", "seed", "workdir", "overrides"}.

  Every grid value and override is applied to the config first, so a bad key or value fails here,
  before anything is written or trained.
  """
  root = pathlib.Path(root).absolute()
  grid = parse_grid(grids)
  base = load_config_file(config_spec)
  for o in overrides:
    base.override(o)
  for key, values in grid:
    if not values:
      raise ConfigError(f"--grid {key}= names no values")
    for v in values:
      load_config_file(config_spec).override(f"{key}={v}")
  if seeds is not None:
    base.override(f"seed={seeds[0]}")
  elements = []
  for combo in itertools.product(*[[f"{k}={v}" for v in vs] for k, vs in grid]):
    assignments = list(combo)
    point = _run_name(assignments)
    for seed in (seeds if seeds is not None else [None]):
      workdir = root / point if seed is None else root / point / f"seed{seed}"
      sets = list(overrides) + assignments + ([] if seed is None else [f"seed={seed}"])
      elements.append({"index": len(elements), "point": point, "assignments": assignments,
                       "seed": seed, "workdir": str(workdir), "overrides": sets})
  return elements


def write_manifest(root: pathlib.Path, manifest: dict[str, Any]) -> None:
  tmp = root / f".{MANIFEST}.tmp"
  tmp.write_text(json.dumps(manifest, indent=2) + "\n")
  os.replace(tmp, root / MANIFEST)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(root) / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {root} a `mmcl sweep` workdir?")
  return json.loads(path.read_text())


def element_done(element: dict[str, Any], evaluate: bool) -> bool:
  """Trained to the end (FINISHED marker) and, when evaluating, its final checkpoint evaluated."""
  marker = finished_lib.read(element["workdir"])
  if marker is None:
    return False
  if not evaluate:
    return True
  latest = pathlib.Path(element["workdir"]) / "eval" / "latest.json"
  try:
    return json.loads(latest.read_text()).get("step") == marker.get("checkpoint")
  except (FileNotFoundError, json.JSONDecodeError):
    return False


def new_manifest(config_spec: str, root: pathlib.Path, *, grids, overrides, seeds, evaluate,
                 elements, launcher: str) -> dict[str, Any]:
  old = {}
  if (root / MANIFEST).is_file():
    old = {e["workdir"]: e for e in read_manifest(root).get("elements", [])}
  for e in elements:  # keep the log files of earlier submissions of the same element
    e["log"] = old.get(e["workdir"], {}).get("log")
  return {"config": config_spec, "cwd": os.getcwd(), "grid": grids, "seeds": seeds,
          "overrides": overrides, "evaluate": evaluate, "launcher": launcher,
          "elements": elements}


def _run_element(config_spec: str, element: dict[str, Any], evaluate: bool,
                 log_path: pathlib.Path) -> str:
  """Trains then evaluates one element in one subprocess (`mmcl train --eval`), output appended
  to `log_path`."""
  sets = [a for o in element["overrides"] for a in ("--set", o)]
  with open(log_path, "a") as log:
    r = subprocess.run([sys.executable, "-m", "mmcl.cli", "train", "--config", config_spec,
                        "--workdir", element["workdir"], *sets, *(["--eval"] if evaluate else [])],
                       stdout=log, stderr=subprocess.STDOUT)
  if r.returncode != 0:
    trained = finished_lib.read(element["workdir"]) is not None
    return f"{'eval' if evaluate and trained else 'train'} failed ({r.returncode})"
  if evaluate and not element_done(element, evaluate):
    return "eval failed (no eval/latest.json)"
  return "ok"


def run_sweep(config_spec: str, workdir: str, *, grids: list[str], overrides: list[str],
              evaluate: bool = True, seeds: list[int] | None = None,
              parallel: int = 1) -> list[dict[str, Any]]:
  """Runs every unfinished element here, `parallel` at a time, then writes the tables.

  Returns the rows of results.csv (one per grid point).
  """
  if parallel < 1:
    raise ConfigError(f"--parallel must be at least 1, got {parallel}")
  elements = plan(config_spec, workdir, grids=grids, overrides=overrides, seeds=seeds)
  root = pathlib.Path(workdir).absolute()
  (root / "logs").mkdir(parents=True, exist_ok=True)
  manifest = new_manifest(config_spec, root, grids=grids, overrides=overrides, seeds=seeds,
                          evaluate=evaluate, elements=elements, launcher="local")
  todo = [e for e in elements if not element_done(e, evaluate)]
  for e in todo:
    name = e["point"] + ("" if e["seed"] is None else f"__seed{e['seed']}")
    e["log"] = str(root / "logs" / f"{name}.log")
  write_manifest(root, manifest)
  print(f"sweep: {len(elements)} element(s), {len(elements) - len(todo)} already done, "
        f"running {len(todo)} ({parallel} at a time); logs in {root / 'logs'}", flush=True)
  with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
    futures = {pool.submit(_run_element, config_spec, e, evaluate, pathlib.Path(e["log"])): e
               for e in todo}
    for n, fut in enumerate(concurrent.futures.as_completed(futures), 1):
      e = futures[fut]
      print(f"[{n}/{len(todo)}] {e['workdir']}: {fut.result()} (log {e['log']})", flush=True)
  return collect(root)


# ----------------------------------------------------------------------------------------------
# Tables.


def _best_step(workdir: pathlib.Path, metric: str, mode: str) -> tuple[int | None, float | None]:
  from mmcl.train.metric_log import read_metrics
  rows = [r for r in read_metrics(workdir) if r.get(metric) is not None]
  if not rows:
    return None, None
  best = (min if mode == "min" else max)(rows, key=lambda r: r[metric])
  return int(best["step"]), float(best[metric])


def element_metrics(element: dict[str, Any], evaluate: bool) -> dict[str, float] | None:
  """The numbers of a done element (None when it is not done): final/*, best_*, eval/*."""
  if not element_done(element, evaluate):
    return None
  wd = pathlib.Path(element["workdir"])
  out: dict[str, float] = {}
  summary = json.loads((wd / "train_summary.json").read_text())
  out.update({f"final/{k}": v for k, v in summary.items() if _is_number(v)})
  cfg = json.loads((wd / "config.json").read_text())
  step, value = _best_step(wd, cfg["train"]["best_metric"], cfg["train"]["best_mode"])
  if step is not None:
    out["best_step"], out["best_value"] = step, value
  if evaluate:
    latest = json.loads((wd / "eval" / "latest.json").read_text())
    out.update({f"eval/{k}": v for k, v in latest.items() if k != "step" and _is_number(v)})
  return out


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def mean_and_se(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and standard error of the mean (sample std / √n; None for one value)."""
  n = len(values)
  mean = math.fsum(values) / n
  if n < 2:
    return mean, None
  var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(var / n)


def collect(root: str | os.PathLike) -> list[dict[str, Any]]:
  """Writes results.csv / results.md (one row per grid point) and runs.csv (one per element) from
  what the elements left in their workdirs; returns the grid-point rows."""
  root = pathlib.Path(root).absolute()
  manifest = read_manifest(root)
  evaluate = manifest["evaluate"]
  points: dict[str, list[dict[str, Any]]] = {}
  run_rows = []
  for e in manifest["elements"]:
    metrics = element_metrics(e, evaluate)
    e = dict(e, metrics=metrics)
    points.setdefault(e["point"], []).append(e)
    run_rows.append({"run": e["point"], **dict(a.split("=", 1) for a in e["assignments"]),
                     "seed": e["seed"], "status": "ok" if metrics is not None else "not finished",
                     "workdir": e["workdir"], "log": e.get("log"), **(metrics or {})})
  rows = []
  for point, elements in points.items():
    done = [e["metrics"] for e in elements if e["metrics"] is not None]
    failed = [e for e in elements if e["metrics"] is None]
    row: dict[str, Any] = {"run": point,
                           **dict(a.split("=", 1) for a in elements[0]["assignments"])}
    row["status"] = "ok" if not failed else f"{len(failed)} of {len(elements)} not finished"
    row["seeds"] = len(done)
    names: list[str] = []
    for m in done:
      names += [k for k in m if k not in names]
    for name in names:
      values = [m[name] for m in done if name in m and m[name] is not None]
      if values:
        mean, se = mean_and_se(values)
        row[name], row[f"{name} se"] = mean, se
    row["not finished"] = "; ".join(
        f"{'seed ' + str(e['seed']) if e['seed'] is not None else e['point']}: "
        f"{e.get('log') or 'no log (never ran)'}" for e in failed)
    rows.append(row)
  _write_csv(root / "results.csv", rows)
  _write_csv(root / "runs.csv", run_rows)
  _write_markdown(root / "results.md", rows)
  return rows


def _columns(rows: list[dict[str, Any]]) -> list[str]:
  columns: list[str] = []
  for r in rows:
    columns += [k for k in r if k not in columns]
  return columns


def _csv_value(v: Any) -> Any:
  if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
    return int(v)  # e.g. a mean best_step of 4.0 reads as 4
  return "" if v is None else v


def _write_csv(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=_columns(rows))
    w.writeheader()
    w.writerows([{k: _csv_value(v) for k, v in r.items()} for r in rows])
  os.replace(tmp, path)


def _fmt(v: Any) -> str:
  return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def _write_markdown(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  """Metric cells read "mean ± se" (the mean alone for one seed)."""
  columns = [c for c in _columns(rows) if not c.endswith(" se")]
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for r in rows:
    cells = []
    for c in columns:
      v, se = r.get(c), r.get(f"{c} se")
      cells.append(_fmt(v) + (f" ± {se:.2g}" if se is not None else ""))
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Metric cells: mean ± standard error of the mean over the seeds that finished "
            "(`seeds`); runs.csv has every element."]
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text("\n".join(lines) + "\n")
  os.replace(tmp, path)
