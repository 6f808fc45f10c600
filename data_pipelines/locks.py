"""An exclusive build lock per output folder, so that processes building the same cached artefact
(e.g. the runs of a sweep started side by side on one rendered music set) do not race: the first
builds while the others wait, then find the artefact complete and return at once."""
from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
from typing import Iterator


@contextlib.contextmanager
def build_lock(folder: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Holds an exclusive `fcntl.flock` on `folder/.build.lock` (created with the folder) for the
  duration of the block; blocks while another process (or another open of the file in this one)
  holds it. The lock is released when the block exits or the process dies, so a killed builder
  never leaves the folder locked. Yields the folder."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  with open(folder / ".build.lock", "a+b") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield folder
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)
