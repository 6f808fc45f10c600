"""`mmcl sweep`: run every combination of a grid of config overrides, then tabulate.

Each run is `mmcl train` (then `mmcl eval` on its final checkpoint) in a subprocess, so runs are
isolated (fresh JAX runtime) and a crash in one does not stop the others; runs whose workdir already
holds a finished training are not retrained, so a re-invoked sweep continues where it stopped.
Outputs `results.csv` and `results.md`: one row per run with its overrides, final train metrics,
the best step by `train.best_metric` and the evaluator's metrics.
"""

from __future__ import annotations

import csv
import itertools
import json
import pathlib
import re
import subprocess
import sys
from typing import Any

from mmcl.config import ConfigError, load_config_file


def parse_grid(grids: list[str]) -> list[tuple[str, list[str]]]:
  """['a.b=1,2', 'c=x,y'] → [('a.b', ['1', '2']), ('c', ['x', 'y'])]."""
  out = []
  for g in grids:
    if "=" not in g:
      raise ConfigError(f"--grid {g!r} is not of the form key=v1,v2")
    key, values = g.split("=", 1)
    out.append((key.strip(), [v for v in values.split(",") if v != ""]))
  return out


def _run_name(assignments: list[str]) -> str:
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(assignments)) or "default"


def _best_step(workdir: pathlib.Path, metric: str, mode: str) -> tuple[int | None, float | None]:
  from mmcl.train.metric_log import read_metrics
  rows = [r for r in read_metrics(workdir) if r.get(metric) is not None]
  if not rows:
    return None, None
  best = (min if mode == "min" else max)(rows, key=lambda r: r[metric])
  return int(best["step"]), float(best[metric])


def run_sweep(config_spec: str, workdir: str, *, grids: list[str], overrides: list[str],
              evaluate: bool = True) -> list[dict[str, Any]]:
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  grid = parse_grid(grids)
  base = load_config_file(config_spec)
  for o in overrides:
    base.override(o)
  for key, values in grid:  # validate every grid value before spending any compute
    for v in values:
      load_config_file(config_spec).override(f"{key}={v}")
  rows = []
  for combo in itertools.product(*[[f"{k}={v}" for v in vs] for k, vs in grid]):
    assignments = list(combo)
    run_dir = root / _run_name(assignments)
    sets = [a for o in overrides + assignments for a in ("--set", o)]
    summary = run_dir / "train_summary.json"
    status = "ok"
    if not summary.exists():
      r = subprocess.run([sys.executable, "-m", "mmcl.cli", "train", "--config", config_spec,
                          "--workdir", str(run_dir), *sets])
      status = "ok" if r.returncode == 0 else f"train failed ({r.returncode})"
    row: dict[str, Any] = {"run": run_dir.name, **dict(a.split("=", 1) for a in assignments),
                           "status": status}
    if summary.exists():
      final = json.loads(summary.read_text())
      row.update({f"final/{k}": v for k, v in final.items()})
      cfg = json.loads((run_dir / "config.json").read_text())
      step, value = _best_step(run_dir, cfg["train"]["best_metric"], cfg["train"]["best_mode"])
      row["best_step"], row["best_value"] = step, value
      if evaluate and status == "ok":
        r = subprocess.run([sys.executable, "-m", "mmcl.cli", "eval", "--workdir", str(run_dir)])
        latest = run_dir / "eval" / "latest.json"
        if r.returncode == 0 and latest.exists():
          row.update({f"eval/{k}": v for k, v in json.loads(latest.read_text()).items()
                      if isinstance(v, (int, float))})
        else:
          row["status"] = f"eval failed ({r.returncode})"
    rows.append(row)
    _write_tables(root, rows)
  return rows


def _fmt(v: Any) -> str:
  return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def _write_tables(root: pathlib.Path, rows: list[dict[str, Any]]) -> None:
  columns: list[str] = []
  for r in rows:
    columns += [k for k in r if k not in columns]
  with open(root / "results.csv.tmp", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
  (root / "results.csv.tmp").replace(root / "results.csv")
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
  (root / "results.md").write_text("\n".join(lines) + "\n")
