"""Orbax checkpoints of the train state and the grain iterator, sealed with checksums.

Layout: `workdir/checkpoints/<step>/{state,data_iter}` written by an asynchronous
`CheckpointManager`. Orbax writes each step into a temporary directory and renames it only when every
process has finished, so a crash or SIGKILL mid-save never leaves a step that readers list; committed
steps are never touched by a later failure. Retention: the newest `keep` steps plus the best `keep_best`
by a metric passed at save time.

Integrity: once a step is committed, a background thread of the writing process (process 0) seals
it by writing `<step>/mmcl_integrity.json`, the size and SHA-256 of every file of the step. Sealing
runs after the commit and off the training thread, so it adds nothing to the time a save blocks
training.
Every restore verifies the seal first. A step is then

  valid       every sealed file is present with its size and digest;
  corrupt     a file is missing, truncated or changed, or the seal itself is unreadable (or, for a
              step without a seal, orbax fails to restore it);
  unverified  no seal (written by an older mmcl, or the process died between commit and seal):
              restored as it is, and any restore failure counts as corrupt.

`Checkpointer.restore_newest` walks back from the newest step to the newest usable one, logging one
warning per step it passes over; nothing is ever deleted. A training run that resumes behind corrupt
steps moves them aside into `workdir/checkpoints_corrupt/` (`quarantine`), so it can save those step
numbers again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import queue
import threading
import time
from typing import Any, NamedTuple

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

log = logging.getLogger("mmcl.checkpoint")

INTEGRITY_FILE = "mmcl_integrity.json"
INTEGRITY_VERSION = 1
QUARANTINE_DIR = "checkpoints_corrupt"
QUARANTINE_NOTE = "mmcl_quarantined.json"  # why and when a step was moved aside
VALID, CORRUPT, UNVERIFIED = "valid", "corrupt", "unverified"


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


class CorruptCheckpointError(RuntimeError):
  """A checkpoint step that fails verification or cannot be restored (the message is one line)."""

  def __init__(self, step: int, reason: str, directory: pathlib.Path | str):
    self.step, self.reason, self.directory = step, reason, pathlib.Path(directory)
    super().__init__(f"checkpoint step {step} in {directory} is corrupt: {reason}")


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint step of a directory is corrupt (the message lists each with its reason)."""


class StepStatus(NamedTuple):
  step: int
  status: str  # VALID, CORRUPT or UNVERIFIED
  reason: str


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != INTEGRITY_FILE)


def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def seal_step(step_dir: str | pathlib.Path) -> pathlib.Path:
  """Writes `step_dir/mmcl_integrity.json`: {"files": {relative path: {size, sha256}}}."""
  step_dir = pathlib.Path(step_dir)
  files = {p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
           for p in _files(step_dir)}
  record = {"version": INTEGRITY_VERSION, "algorithm": "sha256", "files": files}
  path = step_dir / INTEGRITY_FILE
  tmp = step_dir / f".{INTEGRITY_FILE}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def verify_step(step_dir: str | pathlib.Path) -> tuple[str, str]:
  """(status, reason) of a committed step directory; see the module docstring."""
  step_dir = pathlib.Path(step_dir)
  path = step_dir / INTEGRITY_FILE
  if not path.is_file():
    return UNVERIFIED, "no integrity record"
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
    files = record["files"]
    if record.get("version") != INTEGRITY_VERSION or not isinstance(files, dict) or not files:
      raise ValueError(f"version {record.get('version')!r} or empty file list")
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return CORRUPT, f"{INTEGRITY_FILE} is unreadable ({_one_line(e)})"
  for rel, want in sorted(files.items()):
    p = step_dir / rel
    if not p.is_file():
      return CORRUPT, f"{rel} is missing"
    size = p.stat().st_size
    if size != want["size"]:
      return CORRUPT, (f"{rel} has {size} bytes, {want['size']} when saved (truncated or "
                       f"overwritten)")
    if _sha256(p) != want["sha256"]:
      return CORRUPT, f"{rel} changed since it was saved (SHA-256 mismatch)"
  return VALID, ""


class Checkpointer:
  """Saves/restores {state, data_iter}; read-only mode is what the evaluator uses."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, keep_best: int = 0,
               best_metric: str | None = None, best_mode: str = "min",
               async_save: bool = True, read_only: bool = False):
    policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep)]
    if keep_best and best_metric:
      policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                               n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save and not read_only,
        preservation_policy=pp.AnyPreservationPolicy(policies),
        read_only=read_only, create=not read_only)
    self.workdir = pathlib.Path(workdir)
    self.directory = checkpoint_dir(workdir)
    self.read_only = read_only
    if read_only and not self.directory.is_dir():
      raise FileNotFoundError(f"no checkpoints in {self.directory}: has `mmcl train --workdir "
                              f"{pathlib.Path(workdir)}` saved one yet?")
    self._options = options
    self.manager = self._new_manager()
    # Sealing: only the process that writes the step's metadata (process 0) seals it.
    self._seal = not read_only and jax.process_index() == 0
    self._seal_queue: queue.Queue[int | None] = queue.Queue()
    self._seal_thread: threading.Thread | None = None
    self._saves_done = threading.Event()
    self._verified: dict[int, tuple[str, str]] = {}  # step -> verify_step(), computed once

  def _new_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "data_iter"))

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Finalized steps only (never one still being written)."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  # --- saving ------------------------------------------------------------------------------------
  def save(self, step: int, state: Any, data_iter: Any | None, metrics: dict | None = None,
           force: bool = True) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
    if self._seal:
      if self._seal_thread is None:
        self._seal_thread = threading.Thread(target=self._sealer, name="mmcl-seal", daemon=True)
        self._seal_thread.start()
      self._seal_queue.put(step)

  def _sealer(self) -> None:
    """Seals each saved step once orbax has renamed it into place (its commit)."""
    while (step := self._seal_queue.get()) is not None:
      step_dir = self.step_dir(step)
      while not step_dir.is_dir() and not self._saves_done.is_set():
        time.sleep(0.02)
      try:
        if step_dir.is_dir():
          seal_step(step_dir)
      except OSError as e:
        if step_dir.is_dir():  # the disk failed; the step stays unverified
          log.warning("could not seal checkpoint step %d: %s", step, _one_line(e))
        else:  # retention deleted it meanwhile
          log.debug("checkpoint step %d was deleted before it was sealed", step)

  def wait(self) -> None:
    """Waits for in-flight saves and their seals."""
    self.manager.wait_until_finished()
    if self._seal_thread is not None:
      self._saves_done.set()
      self._seal_queue.put(None)
      self._seal_thread.join()
      self._seal_thread = None
      self._saves_done.clear()

  def close(self) -> None:
    self.wait()
    self.manager.close()

  # --- verification and restore ------------------------------------------------------------------
  def status(self, step: int) -> StepStatus:
    """The step's verification (hashed once per Checkpointer: committed steps do not change)."""
    if step not in self._verified:
      status, reason = verify_step(self.step_dir(step))
      if status == UNVERIFIED:  # its seal may still be on its way: ask again next time
        return StepStatus(step, status, reason)
      self._verified[step] = (status, reason)
    return StepStatus(step, *self._verified[step])

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
    """Verifies step `step`, then restores the state into the shardings of `abstract_state` (and
    the iterator in place).

    Raises:
      CorruptCheckpointError: the step fails verification, or orbax cannot restore it.
    """
    _, status, reason = self.status(step)
    if status == CORRUPT:
      raise CorruptCheckpointError(step, reason, self.directory)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax / TensorStore / JSON errors of damaged files
      # A failed restore can leave the manager's async machinery closed: start a fresh one.
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 — the old manager is discarded either way
        pass
      self.manager = self._new_manager()
      what = "unverified, and restoring it failed" if status == UNVERIFIED else "restore failed"
      raise CorruptCheckpointError(step, f"{what}: {_one_line(e)}", self.directory) from e
    return restored["state"]

  def restore_newest(self, abstract_state: Any, data_iter: Any | None = None,
                     steps: list[int] | None = None) -> tuple[int, Any, list[StepStatus]]:
    """Restores the newest usable step of `steps` (default: every finalized step).

    Each step passed over is logged as one warning naming it and the reason.

    Returns:
      (step, state, skipped) where `skipped` lists the corrupt newer steps.
    Raises:
      NoUsableCheckpointError: no step could be restored (each named with its reason).
    """
    steps = self.all_steps() if steps is None else sorted(steps)
    skipped: list[StepStatus] = []
    for step in reversed(steps):
      try:
        state = self.restore(step, abstract_state, data_iter)
      except CorruptCheckpointError as e:
        skipped.append(StepStatus(step, CORRUPT, e.reason))
        older = [s for s in steps if s < step]
        log.warning("%s; %s", e, f"using the previous checkpoint (step {older[-1]})" if older
                    else "no older checkpoint")
        continue
      return step, state, skipped
    reasons = "; ".join(f"step {s.step}: {s.reason}" for s in skipped)
    raise NoUsableCheckpointError(f"no usable checkpoint in {self.directory} ({reasons})")

  def newest_usable_step(self) -> int | None:
    """The newest step that passes verification (valid or unverified), without restoring it."""
    for step in reversed(self.all_steps()):
      if self.status(step).status != CORRUPT:
        return step
    return None

  def quarantine(self, step: int, reason: str) -> pathlib.Path:
    """Moves a corrupt step out of the checkpoint directory (never deletes it) with a note of
    `reason`; returns where it went."""
    if self.read_only:
      raise RuntimeError("a read-only Checkpointer does not move checkpoints")
    target_root = self.workdir.absolute() / QUARANTINE_DIR
    target_root.mkdir(exist_ok=True)
    target, n = target_root / str(step), 1
    while target.exists():
      target, n = target_root / f"{step}.{n}", n + 1
    os.replace(self.step_dir(step), target)
    self._verified.pop(step, None)
    (target / QUARANTINE_NOTE).write_text(json.dumps(
        {"step": step, "reason": reason, "moved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    self.manager.reload()
    return target


def list_checkpoints(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """Every checkpoint step of `workdir` with its status (what `mmcl checkpoints` prints).

  Rows {"step", "status", "reason", "path"}: the finalized steps in checkpoints/ (verified, nothing
  restored), then steps moved aside into checkpoints_corrupt/ (status "quarantined").
  """
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    rows = [{"step": s.step, "status": s.status, "reason": s.reason,
             "path": str(ckpt.step_dir(s.step))}
            for s in (ckpt.status(step) for step in ckpt.all_steps())]
  finally:
    ckpt.close()
  moved = pathlib.Path(workdir).absolute() / QUARANTINE_DIR
  if moved.is_dir():
    for p in sorted(moved.iterdir(), key=lambda p: p.name):
      try:
        note = json.loads((p / QUARANTINE_NOTE).read_text())
      except (OSError, ValueError):
        note = {}
      head = p.name.split(".")[0]
      rows.append({"step": int(head) if head.isdigit() else None, "status": "quarantined",
                   "reason": note.get("reason") or verify_step(p)[1], "path": str(p)})
  return rows


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
