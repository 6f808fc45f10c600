"""A generic watch loop: evaluate each finished checkpoint once, surviving restarts.

The loop knows nothing of models or checkpoint formats: the caller passes `list_finished_steps`
(which must only return complete checkpoints, e.g. orbax's finalized steps) and `evaluate`.
Progress lives in a JSON state file rewritten atomically after every evaluation:

  {"version": 1,
   "done": {"<step>": {metric: value, ...}, ...},   # scalar metrics of every evaluated step
   "best": {"step": int, "metric": str, "value": float} | null}

so a restarted watcher skips finished steps, keeps its best-so-far record, and the "done" map
doubles as the history for metric-over-steps plots.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mmcl.eval.atomic import write_json_atomic
from mmcl.eval.report import scalar_metrics

STATE_VERSION = 1


class SkipStep(Exception):
  """Raised by `evaluate` for a step that can no longer be evaluated (e.g. its checkpoint was
  deleted by the trainer's retention after it was listed): the step is left unrecorded and not
  retried by this watcher."""


@dataclasses.dataclass
class WatchState:
  """What the watcher has done.

  Attributes:
    done: {step: scalar metrics} of every evaluated step.
    best: {"step", "metric", "value"} of the best evaluated step so far, or None.
  """
  done: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
  best: dict[str, Any] | None = None

  @property
  def history(self) -> dict[int, dict[str, float]]:
    """{step: metrics}, ascending by step."""
    return dict(sorted(self.done.items()))

  def to_json(self) -> dict[str, Any]:
    return {"version": STATE_VERSION,
            "done": {str(s): m for s, m in sorted(self.done.items())},
            "best": self.best}


def load_state(state_path: str | os.PathLike) -> WatchState:
  """Reads the state file, or returns an empty state when it does not exist yet.

  Raises:
    ValueError: naming the file when it is not a watcher state.
  """
  path = pathlib.Path(state_path)
  if not path.exists():
    return WatchState()
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    if raw.get("version") != STATE_VERSION:
      raise ValueError(f"version {raw.get('version')!r}, expected {STATE_VERSION}")
    done = {int(step): {k: (math.nan if v is None else float(v)) for k, v in values.items()}
            for step, values in raw["done"].items()}
    best = raw.get("best")
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f"{path}: not a valid watcher state file ({e}); delete it to start over")
  return WatchState(done=done, best=best)


def save_state(state_path: str | os.PathLike, state: WatchState) -> pathlib.Path:
  """Writes the state file atomically (temp file + rename)."""
  return write_json_atomic(state_path, state.to_json())


def _improves(value: float, best: Mapping[str, Any] | None, mode: str) -> bool:
  if math.isnan(value):
    return False
  if best is None or best.get("value") is None:
    return True
  return value > best["value"] if mode == "max" else value < best["value"]


def watch(list_finished_steps: Callable[[], Iterable[int]],
          evaluate: Callable[[int], Mapping[str, Any]], *, state_path: str | os.PathLike,
          poll_seconds: float, timeout_seconds: float | None = None,
          stop_after_step: int | Callable[[], int | None] | None = None,
          best_metric: str | None = None,
          best_mode: str = "max",
          after_step: Callable[[int, Mapping[str, Any], WatchState], None] | None = None,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> WatchState:
  """Evaluates every finished step once, in ascending order, until told to stop.

  Each round lists the finished steps, evaluates those not yet in the state (lowest first),
  saving the state after each one, and then either lists again (when it evaluated something, as
  more steps may have finished meanwhile) or sleeps `poll_seconds`. A step that raises in
  `evaluate` propagates: the state holds every step finished before it, and a restart retries it;
  one that raises `SkipStep` is left out (unrecorded, not retried by this call).

  Args:
    list_finished_steps: returns the steps whose checkpoints are complete (never one still being
      written).
    evaluate: step -> metrics; numeric entries are recorded in the state.
    state_path: JSON state file (see module docstring); created when missing.
    poll_seconds: wait between listings when nothing new is found.
    timeout_seconds: stop after this long without a new step to evaluate (counted from the start
      or the last evaluation); None waits forever.
    stop_after_step: stop once a step >= this one has been evaluated (e.g. the final step); a
      callable is asked again each time (e.g. the trainer's final checkpoint once it is known).
    best_metric: metric whose best value (per `best_mode`) is tracked in `state.best`.
    best_mode: "max" or "min".
    after_step: called as after_step(step, metrics, state) with the step already in `state`
      (e.g. to write a report with `state.history` and `state.best`), before the state file
      records the step; if it raises, the step stays unrecorded and a restart redoes it.
    clock, sleep: injectable for tests.

  Returns:
    The final state.
  """
  if best_mode not in ("max", "min"):
    raise ValueError(f"watch: best_mode must be 'max' or 'min', got {best_mode!r}")
  if poll_seconds < 0:
    raise ValueError(f"watch: poll_seconds must be >= 0, got {poll_seconds}")
  state = load_state(state_path)

  skipped: set[int] = set()

  def finished() -> bool:
    # A final step that had to be skipped (corrupt, or deleted) ends the watch as well.
    last = stop_after_step() if callable(stop_after_step) else stop_after_step
    return last is not None and any(s >= last for s in set(state.done) | skipped)

  last_progress = clock()
  while not finished():
    pending = sorted({int(s) for s in list_finished_steps()} - set(state.done) - skipped)
    for step in pending:
      try:
        metrics = evaluate(step)
      except SkipStep:
        skipped.add(step)
        continue
      values = scalar_metrics(metrics)
      if best_metric is not None:
        if best_metric not in values:
          raise KeyError(f"watch: best_metric {best_metric!r} not among the metrics of step "
                         f"{step}: {sorted(values)}")
        if _improves(values[best_metric], state.best, best_mode):
          state.best = {"step": step, "metric": best_metric, "value": values[best_metric]}
      state.done[step] = values
      # The step's own outputs (report, plots) come first and the state record last, so a crash
      # in between re-evaluates the step instead of leaving it recorded without its report.
      if after_step is not None:
        after_step(step, metrics, state)
      save_state(state_path, state)
      last_progress = clock()
      if finished():
        return state
    if pending:
      continue
    if timeout_seconds is not None:
      remaining = timeout_seconds - (clock() - last_progress)
      if remaining <= 0:
        return state
      sleep(min(poll_seconds, remaining))
    else:
      sleep(poll_seconds)
  return state
