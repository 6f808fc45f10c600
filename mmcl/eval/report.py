"""Evaluation outputs: `metrics.json`, PNG plots and a markdown report, all written atomically.

Layout under an eval root (e.g. `WORKDIR/eval`), one folder per evaluated step:

  eval/<step>/metrics.json      {"recall@k"-style name: value}, flat
  eval/<step>/at_k.png          Recall@k (and NDCG@k when present) against k, one line per prefix
  eval/<step>/over_steps.png    chosen metrics against the training step, from every evaluated step
  eval/<step>/report.md         a table of the metrics and the two plots

Metric names follow "<prefix>/<name>@<k>" (e.g. "i2t/recall@5", "t2i/ndcg@10") or "<prefix>/<name>"
("i2t/mrr"); the prefix (a direction, a modality pair, a bucket) becomes a table row and a plot
line. Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend).
"""
from __future__ import annotations

import io
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mmcl.eval.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
AT_K_PLOT = "at_k.png"
OVER_STEPS_PLOT = "over_steps.png"
_AT_K = re.compile(r"^(?:(?P<prefix>.+)/)?(?P<name>[A-Za-z_]+)@(?P<k>\d+)$")


def _split(key: str) -> tuple[str, str]:
  prefix, _, name = key.rpartition("/")
  return prefix, name


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The numeric entries of `metrics` as floats (numpy / jax scalars included)."""
  out = {}
  for key, value in metrics.items():
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
      value = value.item()
    if _is_number(value):
      out[key] = float(value)
  return out


def write_metrics(eval_dir: str | os.PathLike, metrics: Mapping[str, Any]) -> pathlib.Path:
  """Writes `eval_dir/metrics.json` atomically (temp file + rename; NaN becomes null)."""
  return write_json_atomic(pathlib.Path(eval_dir) / METRICS_FILE, dict(metrics))


def load_history(eval_root: str | os.PathLike) -> dict[int, dict[str, float]]:
  """{step: scalar metrics} from every `eval_root/<step>/metrics.json`, ascending by step.

  Folders whose name is not an integer, or without a metrics.json yet, are skipped.
  """
  root = pathlib.Path(eval_root)
  history = {}
  if not root.is_dir():
    return history
  for child in root.iterdir():
    path = child / METRICS_FILE
    if child.name.isdigit() and path.is_file():
      with open(path, encoding="utf-8") as f:
        values = json.load(f)
      # write_metrics stores NaN as null.
      history[int(child.name)] = scalar_metrics(
          {k: (math.nan if v is None else v) for k, v in values.items()})
  return dict(sorted(history.items()))


def at_k_curves(metrics: Mapping[str, Any], names: Sequence[str] = ("recall", "ndcg")
                ) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
  """{name: {prefix: (ks ascending, values)}} from keys like "i2t/recall@5"."""
  curves: dict[str, dict[str, dict[int, float]]] = {}
  for key, value in scalar_metrics(metrics).items():
    m = _AT_K.match(key)
    if m and m["name"] in names:
      curves.setdefault(m["name"], {}).setdefault(m["prefix"] or "", {})[int(m["k"])] = value
  return {name: {prefix: (sorted(points), [points[k] for k in sorted(points)])
                 for prefix, points in sorted(by_prefix.items())}
          for name, by_prefix in curves.items()}


def _save_png(fig: Figure, path: pathlib.Path) -> pathlib.Path:
  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
  return write_bytes_atomic(path, buffer.getvalue())


def plot_at_k(metrics: Mapping[str, Any], path: str | os.PathLike,
              names: Sequence[str] = ("recall", "ndcg"), title: str = "") -> pathlib.Path | None:
  """Plots metric@k against k (one panel per metric name, one line per prefix) as a PNG.

  Returns:
    The path written, or None when `metrics` holds no "name@k" keys for `names`.
  """
  curves = at_k_curves(metrics, names)
  if not curves:
    return None
  fig = Figure(figsize=(5 * len(curves), 3.8))
  for i, name in enumerate(n for n in names if n in curves):
    ax = fig.add_subplot(1, len(curves), i + 1)
    all_ks = set()
    for prefix, (ks, values) in curves[name].items():
      ax.plot(ks, values, marker="o", label=prefix or name)
      all_ks.update(ks)
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.minorticks_off()
    ax.set_xlabel("k")
    ax.set_ylabel(f"{name}@k")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  return _save_png(fig, pathlib.Path(path))


def default_step_metrics(history: Mapping[int, Mapping[str, float]]) -> list[str]:
  """Keys plotted over steps when none are named: every "*recall@k" key, else every key."""
  keys = sorted({k for values in history.values() for k in values})
  recall = [(m["prefix"] or "", int(m["k"]), k) for k in keys
            if (m := _AT_K.match(k)) and m["name"] == "recall"]
  return [key for *_, key in sorted(recall)] or keys


def plot_over_steps(history: Mapping[int, Mapping[str, float]], path: str | os.PathLike,
                    metric_keys: Sequence[str] | None = None, *, best_step: int | None = None,
                    title: str = "") -> pathlib.Path | None:
  """Plots each metric against the training step as a PNG.

  Args:
    history: {step: {metric: value}}.
    path: PNG to write.
    metric_keys: metrics to draw (default `default_step_metrics`).
    best_step: marked with a vertical line when given.

  Returns:
    The path written, or None when the history is empty.
  """
  if not history:
    return None
  metric_keys = list(metric_keys) if metric_keys else default_step_metrics(history)
  steps = sorted(history)
  fig = Figure(figsize=(6.5, 4))
  ax = fig.add_subplot(1, 1, 1)
  for key in metric_keys:
    points = [(s, history[s][key]) for s in steps if key in history[s]]
    if points:
      ax.plot(*zip(*points), marker="o", label=key)
  if best_step is not None:
    ax.axvline(best_step, color="gray", linestyle="--", label=f"best (step {best_step})")
  ax.set_xlabel("training step")
  ax.set_ylabel("metric")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small")
  if title:
    fig.suptitle(title)
  return _save_png(fig, pathlib.Path(path))


def _format(value: Any) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if isinstance(value, float):
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
  return str(value)


def metrics_table(metrics: Mapping[str, Any]) -> str:
  """A markdown table: one row per prefix ("i2t", "t2i", ...), one column per metric name."""
  rows: dict[str, dict[str, Any]] = {}
  for key, value in metrics.items():
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
      value = value.item()
    if _is_number(value) or value is None:
      prefix, name = _split(key)
      rows.setdefault(prefix, {})[name] = value
  first_seen = {name: i for i, name in enumerate(
      dict.fromkeys(name for row in rows.values() for name in row))}

  def order(name: str):
    # name@k columns first, grouped by name with k ascending; then the others as they came.
    m = re.match(r"^(.*)@(\d+)$", name)
    return (0, m[1], int(m[2])) if m else (1, "", first_seen[name])

  columns = sorted(first_seen, key=order)
  lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for prefix in sorted(rows):
    cells = [_format(rows[prefix][c]) if c in rows[prefix] else "" for c in columns]
    lines.append(f"| {prefix or 'all'} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_report(eval_dir: str | os.PathLike, metrics: Mapping[str, Any], *, step: int,
                 history: Mapping[int, Mapping[str, float]] | None = None,
                 step_metrics: Sequence[str] | None = None, best: Mapping[str, Any] | None = None,
                 title: str = "Retrieval evaluation") -> pathlib.Path:
  """Writes metrics.json, the plots and report.md for one evaluated step.

  Args:
    eval_dir: this step's folder (e.g. WORKDIR/eval/<step>).
    metrics: the step's metrics.
    step: training step evaluated.
    history: {step: scalar metrics} of all evaluated steps (e.g. `load_history(eval_root)` or the
      watcher's state); this step's metrics are added when missing.
    step_metrics: metrics for the over-steps plot (default `default_step_metrics`).
    best: optional {"step", "metric", "value"} record of the best step so far.
    title: report heading.

  Returns:
    Path of report.md.
  """
  eval_dir = pathlib.Path(eval_dir)
  write_metrics(eval_dir, metrics)
  history = {int(s): dict(v) for s, v in (history or {}).items()}
  history.setdefault(int(step), scalar_metrics(metrics))
  at_k = plot_at_k(metrics, eval_dir / AT_K_PLOT, title=f"step {step}")
  over_steps = plot_over_steps(history, eval_dir / OVER_STEPS_PLOT, step_metrics,
                               best_step=None if best is None else best.get("step"))
  parts = [f"# {title}: step {step}\n\n", metrics_table(metrics)]
  if best:
    parts.append(f"\nBest so far: {best.get('metric')} = {_format(best.get('value'))} at step "
                 f"{best.get('step')}.\n")
  if at_k is not None:
    parts.append(f"\n## Metric@k\n\n![metric at k]({AT_K_PLOT})\n")
  if over_steps is not None:
    parts.append(f"\n## Over training steps ({len(history)} evaluated)\n\n"
                 f"![metrics over steps]({OVER_STEPS_PLOT})\n")
  return write_text_atomic(eval_dir / REPORT_FILE, "".join(parts))
