"""Atomic file writes: readers (a watcher, a dashboard) never see a half-written file."""
from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it over `path`.

  The rename is atomic on POSIX file systems when source and target share a directory, so a
  reader sees either the old file or the complete new one.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
  """`write_bytes_atomic` for UTF-8 text."""
  return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  """Writes `obj` as indented, key-sorted JSON (NaN is written as JSON null)."""
  return write_text_atomic(path, json.dumps(_nan_to_none(obj), indent=2, sort_keys=True) + "\n")


def _nan_to_none(obj: Any) -> Any:
  # Strict JSON has no NaN; null keeps the file readable by every parser.
  if isinstance(obj, float) and obj != obj:
    return None
  if isinstance(obj, dict):
    return {str(k): _nan_to_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_nan_to_none(v) for v in obj]
  if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / jax scalars
    return _nan_to_none(obj.item())
  return obj
