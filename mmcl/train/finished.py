"""The `FINISHED` marker: a training run says in its workdir that it has ended, nothing follows.

`mmcl train` removes `WORKDIR/FINISHED` when it starts and writes it, atomically, after its final
checkpoint has been committed:

  {"step": 800,              # the last trained step
   "checkpoint": 800,        # the newest committed checkpoint step (None when there is none)
   "total_steps": 1000,      # train.total_steps (a run whose data ran out stops earlier)
   "time": 1765108800.0}     # Unix seconds

A preempted run (SIGTERM) or a crashed one writes no marker. Readers: `mmcl eval --watch` exits once
it has evaluated `checkpoint`; sweeps count an element as done when its marker exists.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

MARKER = "FINISHED"


def marker_path(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / MARKER


def clear(workdir: str | os.PathLike) -> None:
  """Removes the marker (a run that starts, or resumes, is not finished)."""
  marker_path(workdir).unlink(missing_ok=True)


def mark(workdir: str | os.PathLike, *, step: int, checkpoint: int | None,
         total_steps: int) -> pathlib.Path:
  """Writes the marker atomically (temporary file, then rename)."""
  path = marker_path(workdir)
  tmp = path.with_name(f".{MARKER}.tmp")
  record = {"step": int(step), "checkpoint": checkpoint, "total_steps": int(total_steps),
            "time": time.time()}
  tmp.write_text(json.dumps(record, indent=2) + "\n")
  os.replace(tmp, path)
  return path


def read(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """The marker's contents, or None while the run has not finished."""
  try:
    return json.loads(marker_path(workdir).read_text())
  except FileNotFoundError:
    return None
