"""Metric logging for training runs: a JSONL file, TensorBoard scalars and a terminal progress line.

`MetricLogger(workdir, total_steps=...)` writes, for every `write(step, metrics)` call:
  * one JSON object per line to `workdir/metrics.jsonl`:
      {"step": 120, "time": 1763840000.25, "loss": 3.12, "examples_per_s": 812.4, ...}
    `time` is the wall-clock time (Unix seconds). Metric values are plain JSON numbers; a
    non-finite value (NaN, +inf, -inf) is written as `null` (JSON has no NaN) and reads back as
    None, so `[r for r in rows if r.get(k) is not None]` keeps the usable values.
  * TensorBoard scalars under `workdir/tb` (tensorboardX; non-finite values are passed as they are).
  * a progress line on stderr: step/total, loss, examples/s and an ETA from a moving average of the
    step time. On a TTY it is redrawn in place (`\\r`) at most every 0.5 s; otherwise (log files)
    a plain line is printed every `progress_every_percent` percent of the run, so logs stay short.

Each logger instance is one *session* and first appends a marker line
`{"event": "start", "time": ..., "total_steps": ...}`. The file is never truncated: resuming a run
appends. A killed run may have logged steps beyond the checkpoint that the resumed run restarts
from; `read_metrics` resolves this: a line for step s supersedes every earlier line for a step
≥ s from an earlier session (the resumed trajectory replaces the abandoned one), while lines of one
session for the same step merge (train metrics and validation metrics written at one step become
one row). TensorBoard gets the same treatment through tensorboardX's `purge_step`.

Only the main process writes (`is_main_process=False` makes every method a no-op), so multi-host
runs produce one log.
"""
from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
RESERVED_KEYS = ("step", "time", "event")
# Redraw a TTY progress line at most this often: formatting and writing it must stay negligible
# next to a training step even when `write` is called every step.
TTY_REFRESH_S = 0.5
# Step-time moving average over the last this-many `write` calls.
RATE_WINDOW = 20


def _json_value(key: str, value: Any) -> int | float | bool | None:
  """Converts one metric value (Python, numpy or JAX scalar) to a JSON-safe Python scalar.

  Integers stay integers, non-finite floats become None (written as `null`).

  Raises:
    TypeError: when `value` is not a single number.
  """
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  try:
    arr = np.asarray(value)  # also fetches a JAX scalar from its device
  except Exception as e:  # noqa: BLE001  (any conversion failure is the same user error)
    raise TypeError(f"MetricLogger.write: metric {key!r} is not a number: {value!r}") from e
  # Kind "V" holds ml_dtypes' bfloat16 / float8 scalars (what a bf16 JAX metric becomes).
  if arr.size != 1 or arr.dtype.kind not in "biufV":
    raise TypeError(
        f"MetricLogger.write: metric {key!r} must be a single number, found "
        f"{type(value).__name__} with shape {arr.shape} and dtype {arr.dtype}.")
  if arr.dtype.kind == "V":
    try:
      arr = arr.astype(np.float64)
    except (TypeError, ValueError) as e:
      raise TypeError(f"MetricLogger.write: metric {key!r} has a non-numeric dtype {arr.dtype}.") \
          from e
  item = arr.reshape(()).item()
  if isinstance(item, float) and not math.isfinite(item):
    return None
  return item


def _format_duration(seconds: float) -> str:
  """Seconds as H:MM:SS (or D days H:MM:SS past a day)."""
  seconds = int(round(max(seconds, 0.0)))
  days, rest = divmod(seconds, 86400)
  h, rest = divmod(rest, 3600)
  m, s = divmod(rest, 60)
  hms = f"{h}:{m:02d}:{s:02d}"
  return f"{days}d {hms}" if days else hms


class MetricLogger:
  """Writes training metrics to JSONL, TensorBoard and a progress line (see the module docstring).

  Usable as a context manager; `close()` flushes everything.

  Args:
    workdir: run directory; `metrics.jsonl` and `tb/` are created in it.
    total_steps: the step count of the full run (for the progress percentage and the ETA).
    is_main_process: only the main process writes anything.
    use_tensorboard: also write TensorBoard scalars.
    progress: print the progress line on `stream`.
    progress_every_percent: on a non-TTY stream, print a line each time the run crosses a
      multiple of this percentage (and at the last step).
    loss_key: the metric shown as "loss" in the progress line.
    throughput_key: the metric shown as examples/s in the progress line.
    stream: where the progress line goes (default: sys.stderr at construction).
    clock: monotonic clock for step timing (injectable for tests).
  """

  def __init__(self, workdir: str | os.PathLike, *, total_steps: int,
               is_main_process: bool = True, use_tensorboard: bool = True, progress: bool = True,
               progress_every_percent: float = 5.0, loss_key: str = "loss",
               throughput_key: str = "examples_per_s", stream: TextIO | None = None,
               clock: Callable[[], float] = time.monotonic):
    if total_steps <= 0:
      raise ValueError(f"MetricLogger: total_steps must be positive, found {total_steps}.")
    if not 0 < progress_every_percent <= 100:
      raise ValueError("MetricLogger: progress_every_percent must be in (0, 100], found "
                       f"{progress_every_percent}.")
    self.workdir = pathlib.Path(workdir)
    self.total_steps = int(total_steps)
    self.active = bool(is_main_process)
    self._use_tb = use_tensorboard
    self._progress = progress
    self._every_percent = progress_every_percent
    self._loss_key = loss_key
    self._throughput_key = throughput_key
    self._stream = stream if stream is not None else sys.stderr
    self._clock = clock
    self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
    self._file: TextIO | None = None
    self._tb = None
    self._resuming = False
    self._timing: collections.deque[tuple[float, int]] = collections.deque(maxlen=RATE_WINDOW)
    self._last_draw = -math.inf
    self._last_bucket: int | None = None
    self._line_len = 0  # length of the TTY line on screen (0: none pending)
    self._latest: dict[str, Any] = {}
    self._closed = False
    if not self.active:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    path = self.workdir / METRICS_FILE
    self._resuming = path.exists() and path.stat().st_size > 0
    self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
    if self._resuming and not _ends_with_newline(path):
      # A killed writer can leave half a line: end it so our lines start clean (read_metrics
      # then skips the fragment).
      self._file.write("\n")
    self._write_line({"event": "start", "time": time.time(), "total_steps": self.total_steps})

  # --- public API ---------------------------------------------------------------------------------
  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `metrics` for `step` (JSONL line, TensorBoard scalars, progress line).

    Args:
      step: the global step these metrics belong to (≥ 0).
      metrics: {name: scalar}; Python, numpy or JAX scalars. Names must not be "step", "time" or
        "event".

    Raises:
      ValueError / TypeError: for a negative step, a reserved name or a non-scalar value (checked
        on every process, so a bad call fails the same way everywhere).
    """
    if self._closed:
      raise RuntimeError("MetricLogger.write called after close().")
    step = int(step)
    if step < 0:
      raise ValueError(f"MetricLogger.write: step must be ≥ 0, found {step}.")
    values: dict[str, Any] = {}
    for key, value in metrics.items():
      if not isinstance(key, str) or key in RESERVED_KEYS:
        raise ValueError(
            f"MetricLogger.write: metric name {key!r} is not allowed (names are strings other "
            f"than {RESERVED_KEYS}).")
      values[key] = _json_value(key, value)
    if not self.active:
      return
    self._write_line({"step": step, "time": time.time(), **values})
    if self._use_tb:
      self._tensorboard(step, metrics, values)
    self._observe(step, values)
    # Only writes that carry the training loss move the progress line (validation metrics logged
    # at the same step would otherwise draw it twice).
    if self._progress and self._loss_key in values:
      self._maybe_draw(step)

  def seconds_per_step(self) -> float | None:
    """Moving-average step time over the last RATE_WINDOW writes (None before two writes)."""
    if len(self._timing) < 2:
      return None
    (t0, s0), (t1, s1) = self._timing[0], self._timing[-1]
    if s1 <= s0:
      return None
    return (t1 - t0) / (s1 - s0)

  def eta_seconds(self) -> float | None:
    """Estimated seconds until `total_steps` (None until a step time is known)."""
    per_step = self.seconds_per_step()
    if per_step is None:
      return None
    return max(self.total_steps - self._timing[-1][1], 0) * per_step

  def progress_line(self, step: int) -> str:
    """The progress text for `step` from the latest metrics, e.g.
    `step 120/1000 (12.0%) | loss 3.1234 | 812.4 ex/s | ETA 0:12:34`."""
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)"]
    loss = self._latest.get(self._loss_key)
    if loss is not None:
      parts.append(f"loss {loss:.4f}")
    throughput = self._latest.get(self._throughput_key)
    if throughput is not None:
      parts.append(f"{throughput:.1f} ex/s")
    eta = self.eta_seconds()
    parts.append("ETA " + (_format_duration(eta) if eta is not None else "--"))
    return " | ".join(parts)

  def flush(self) -> None:
    """Flushes the JSONL file and TensorBoard."""
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes everything; ends a pending TTY progress line. Idempotent."""
    if self._closed:
      return
    self._closed = True
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._line_len:
      self._stream.write("\n")
      self._stream.flush()
      self._line_len = 0

  def __enter__(self) -> MetricLogger:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # --- internals ----------------------------------------------------------------------------------
  def _write_line(self, record: dict[str, Any]) -> None:
    assert self._file is not None
    # allow_nan=False: every non-finite value must already be None, so the file stays strict JSON.
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    # Flushed per line: a killed run keeps everything it logged (one small write per log step).
    self._file.flush()

  def _tensorboard(self, step: int, metrics: Mapping[str, Any],
                   values: Mapping[str, Any]) -> None:
    if self._tb is None:
      SummaryWriter = _summary_writer_class()
      # On resume, drop TensorBoard events of the killed run at steps ≥ this first new step, the
      # same rule read_metrics applies to the JSONL.
      # tensorboardX names files by the second and opens them with "wb": the nanosecond suffix
      # keeps a quick restart from overwriting the previous session's file (and sorts after it).
      self._tb = SummaryWriter(str(self.workdir / TB_DIR), flush_secs=30,
                               purge_step=step if self._resuming else None,
                               filename_suffix=f".{time.time_ns()}")
    for key, value in values.items():
      # TensorBoard takes NaN/inf, so it gets the original value rather than the JSON null.
      scalar = float(np.asarray(metrics[key]).reshape(())) if value is None else float(value)
      self._tb.add_scalar(key, scalar, global_step=step)

  def _observe(self, step: int, values: Mapping[str, Any]) -> None:
    if self._timing and step <= self._timing[-1][1]:
      # A second write for the same step (e.g. validation metrics): not a new timing point.
      self._latest.update(values)
      return
    self._timing.append((self._clock(), step))
    self._latest = dict(values)

  def _maybe_draw(self, step: int) -> None:
    last = step >= self.total_steps
    if self._tty:
      now = self._clock()
      if not last and now - self._last_draw < TTY_REFRESH_S:
        return
      self._last_draw = now
      line = self.progress_line(step)
      pad = max(self._line_len - len(line), 0)
      self._stream.write("\r" + line + " " * pad)
      self._line_len = len(line)
      if last:
        self._stream.write("\n")
        self._line_len = 0
      self._stream.flush()
      return
    bucket = int(100.0 * min(step, self.total_steps) / self.total_steps // self._every_percent)
    # The first write always prints (a sign of life after compilation), then one line per bucket.
    if self._last_bucket is not None and bucket <= self._last_bucket and not last:
      return
    self._last_bucket = bucket
    self._stream.write(self.progress_line(step) + "\n")
    self._stream.flush()


def _ends_with_newline(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


def _is_session_end(lines: list[str], lineno: int) -> bool:
  """Whether line `lineno` (1-based) is the last non-empty line of its session."""
  for line in lines[lineno:]:
    if line.strip():
      try:
        return json.loads(line).get("event") == "start"
      except (json.JSONDecodeError, AttributeError):
        return False
  return True


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads `workdir/metrics.jsonl` back as one dict per step, sorted by step.

  Resolution of resumed runs (see the module docstring): a line for step s drops every row for a
  step > s and replaces the row for s when that row came from an earlier session; lines of the
  same session for the same step merge (later keys win). Non-finite values read back as None.
  Returns [] when the file does not exist (a run that never logged).

  Raises:
    ValueError: for a malformed line, naming the file and line number. A truncated last line of a
      session (a writer killed mid-line) is skipped with a warning instead.
  """
  path = pathlib.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = path.read_text(encoding="utf-8").splitlines()
  rows: dict[int, tuple[int, dict[str, Any]]] = {}  # step → (session, row)
  session = 0
  max_step = -1
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if _is_session_end(lines, lineno):
        warnings.warn(f"{path}:{lineno}: skipping a truncated line (a killed run): {line[:80]!r}",
                      stacklevel=2)
        continue
      raise ValueError(f"{path}:{lineno}: not a JSON object: {e}") from e
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}.")
    if record.get("event") == "start":
      session += 1
      continue
    if "step" not in record:
      raise ValueError(f"{path}:{lineno}: a metrics line without a 'step' field: {line[:80]!r}")
    step = int(record["step"])
    if step < max_step:  # a resumed session going back: only then scan (keeps reading linear)
      for later in [s for s in rows if s > step]:
        del rows[later]
    max_step = step  # after the deletion above, no kept row is later than this one
    previous = rows.get(step)
    if previous is not None and previous[0] == session:
      previous[1].update(record)
    else:
      rows[step] = (session, dict(record))
  return [rows[s][1] for s in sorted(rows)]


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported on first use (only the main process writes).

  tensorboardX imports torch whenever it is installed (≈2 s of CPU per process) only so that it
  can accept torch tensors; the logger passes Python floats, so unless the process already uses
  torch the import is made to see none.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter
