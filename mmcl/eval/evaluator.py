"""The evaluator process (`mmcl eval`): restores checkpoints read-only and runs the task's evaluation.

It shares nothing with a running trainer but the workdir: it reads `config.json`, lists only
finalized orbax checkpoints (orbax renames a step directory into place only when the save has
completed, so a half-written checkpoint is never listed), restores the parameters onto its own mesh
and calls `Task.evaluate`. Results go to `workdir/eval/<step>/metrics.json` and `report.md` (with
plots); `eval/latest.json` holds the newest evaluated step's metrics and `eval/state.json` the watch
state (evaluated steps, best so far), so a restarted watcher never redoes a step.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from data_pipelines import records
from mmcl.eval import finite as finite_lib
from mmcl.eval import report as report_lib
from mmcl.eval import watch as watch_lib
from mmcl.eval.atomic import write_json_atomic
from mmcl.train import checkpoint as ckpt_lib
from mmcl.train import finished as finished_lib
from mmcl.workdir import TaskResolver, TrainedWorkdir

log = logging.getLogger("mmcl.eval")


class Evaluator(TrainedWorkdir):
  """Evaluates checkpoints of one workdir."""

  def __init__(self, workdir: str | pathlib.Path, overrides: Sequence[str] = (),
               tag: str | None = None, *, resolve_task: TaskResolver):
    """`overrides` change evaluation settings of the saved config (e.g. another protocol); their
    results go to eval-<tag>/ instead of eval/, so the default reports are never mixed with them."""
    if overrides and not tag:
      raise ValueError("evaluating with config overrides needs a tag (`mmcl eval --tag NAME`): "
                       "their results go to eval-NAME/, apart from the default eval/")
    if tag is not None and (not tag or not all(c.isalnum() or c in "-_." for c in tag)):
      raise ValueError(f"eval tag {tag!r}: use letters, digits, '-', '_' or '.'")
    super().__init__(workdir, overrides, resolve_task=resolve_task)
    self.eval_dir = self.workdir / ("eval" if tag is None else f"eval-{tag}")

  def evaluate(self, step: int, params: Any = None) -> dict[str, float]:
    """Evaluates checkpoint `step` (restored unless `params` are given); the task writes its
    artefacts into eval/<step>/.

    Raises:
      CorruptCheckpointError: the step fails verification or cannot be restored.
      NonFiniteError: its parameters, embeddings or scores are not finite (names the step).
    """
    if params is None:
      params = self.restore_params(step)
    out = self.eval_dir / str(step)
    skips = self.config.data.skip_bad_records
    try:
      finite_lib.require_finite_params(params)
      out.mkdir(parents=True, exist_ok=True)
      with tempfile.TemporaryDirectory(prefix="mmcl-skips-") as folder, (
          records.skip_ledger(folder) if skips else contextlib.nullcontext()) as ledger:
        metrics = {k: float(v) for k, v in self.task.evaluate(params, str(out)).items()}
        if ledger is not None:  # records skipped by this evaluation, by split and field
          metrics.update(records.skip_metrics(ledger.counts()))
    except finite_lib.NonFiniteError as e:
      raise finite_lib.NonFiniteError(f"checkpoint step {step}: {e}; not evaluated") from e
    return metrics

  def evaluate_if_present(self, step: int) -> dict[str, float]:
    """`evaluate`, raising `watch.SkipStep` when the step's checkpoint vanished after it was listed
    (the trainer's retention deleted it) or is corrupt (logged as a warning); the watch loop then
    leaves the step out."""
    try:
      return self.evaluate(step)
    except ckpt_lib.CorruptCheckpointError as e:
      if step not in self.finished_steps():
        log.warning("checkpoint step %d was deleted before it could be evaluated; skipped", step)
      else:
        log.warning("%s; skipped", e)
      raise watch_lib.SkipStep(step) from e

  def write_report(self, step: int, metrics: dict[str, float], *, history: dict | None = None,
                   best: dict | None = None) -> None:
    """eval/<step>/{metrics.json, report.md, plots} and eval/latest.json."""
    if history is None:
      history = report_lib.load_history(self.eval_dir)
    report_lib.write_report(self.eval_dir / str(step), metrics, step=step, history=history,
                            best=best, title=f"{self.config.task.name} — {self.workdir.name}")
    write_json_atomic(self.eval_dir / "latest.json", {"step": step, **metrics})


def _print_summary(step: int, metrics: dict[str, Any], report_dir: pathlib.Path) -> None:
  def order(k):
    name, _, at = k.partition("@")
    return (name, int(at) if at.isdigit() else 0)
  keys = sorted((k for k in metrics if "/" in k and ("recall@" in k or "ndcg" in k or "mrr" in k)),
                key=order)
  print(f"step {step}:")
  for k in keys:
    print(f"  {k:28s} {metrics[k]:.4f}")
  if "chance_recall@1" in metrics:
    print(f"  {'chance_recall@1':28s} {metrics['chance_recall@1']:.4f}")
  for k in sorted(k for k in metrics if k.startswith("data/skipped")):
    print(f"  {k:28s} {metrics[k]:.0f}")
  print(f"report: {report_dir / 'report.md'}")


def wait_for_workdir(workdir: str | pathlib.Path, *, poll_seconds: float,
                     timeout_seconds: float | None, clock=time.monotonic,
                     sleep=time.sleep) -> None:
  """Waits until the trainer has written config.json and created checkpoints/ in `workdir`.

  `mmcl eval --watch` may be started before (or together with) `mmcl train`.

  Raises:
    FileNotFoundError: naming what is missing, after `timeout_seconds` (None waits forever).
  """
  workdir = pathlib.Path(workdir)
  needed = (workdir / "config.json", ckpt_lib.checkpoint_dir(workdir))
  start = clock()
  while not all(p.exists() for p in needed):
    missing = [str(p) for p in needed if not p.exists()]
    if timeout_seconds is not None and clock() - start >= timeout_seconds:
      raise FileNotFoundError(f"waited {timeout_seconds:g} s for {', '.join(missing)}: is "
                              f"`mmcl train --workdir {workdir}` running?")
    log.info("waiting for %s", ", ".join(missing))
    sleep(poll_seconds)


def final_step(workdir: str | pathlib.Path, total_steps: int) -> int:
  """The step after whose evaluation `--watch` stops: the final checkpoint named by the trainer's
  FINISHED marker (also when the data ran out before train.total_steps), else train.total_steps."""
  marker = finished_lib.read(workdir)
  if marker is not None and marker.get("checkpoint") is not None:
    return int(marker["checkpoint"])
  return total_steps


def run_evaluator(workdir: str, *, step: int | None = None, watch: bool = False,
                  poll_seconds: float = 10.0, timeout_seconds: float | None = None,
                  overrides: Sequence[str] = (), tag: str | None = None,
                  resolve_task: TaskResolver) -> dict:
  """Evaluates `step` (default: the newest usable) or, with `watch`, every finished checkpoint;
  `resolve_task(task.name)` is the workdir's `Task` subclass (`mmcl.tasks.get_task_class`)."""
  if watch:
    wait_for_workdir(workdir, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds)
  ev = Evaluator(workdir, overrides, tag, resolve_task=resolve_task)
  if watch:
    tc = ev.config.train
    state_path = ev.eval_dir / "state.json"

    def after_step(s, metrics, state):
      ev.write_report(s, dict(metrics), history=state.history, best=state.best)
      _print_summary(s, metrics, ev.eval_dir / str(s))
    return watch_lib.watch(ev.finished_steps, ev.evaluate_if_present, state_path=state_path,
                           poll_seconds=poll_seconds, timeout_seconds=timeout_seconds,
                           stop_after_step=lambda: final_step(ev.workdir, tc.total_steps),
                           best_metric=ev.task.primary_metric,
                           best_mode="max", after_step=after_step)
  step, params = ev.restore_usable_params(step)
  metrics = ev.evaluate(step, params)
  ev.write_report(step, metrics)
  _print_summary(step, metrics, ev.eval_dir / str(step))
  return metrics
