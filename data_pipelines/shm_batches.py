"""Batches out of grain worker processes through a ring of persistent shared-memory slots.

grain's `mp_prefetch` moves each array of a worker's element through a fresh POSIX shared-memory
segment: created, zero-filled page by page on first touch in the worker (2,352 pages for a
[64, 224, 224, 3] uint8 batch), mapped and faulted again in the main process, unlinked after
use — about 10 ms of CPU per such batch, as much as decoding 25 small photos (BENCHMARKS.md,
"Worker processes through shared-memory slots", 2026-12-07). Here each worker instead owns one segment,
created on its first batch and mapped once by each side, holding R slots of the first batch's
array bytes:

  worker  (`_ToSlots`, a map just before `mp_prefetch`): batch number s goes to slot
          k = s mod R once the main process has read batch s - R (or passed over it); its
          arrays are copied into the slot (~0.7 ms for 9.6 MB, the pages long faulted in) and
          the element that crosses the process boundary is a small `SlotRecord` (segment
          name, k, s, and each array's dtype, shape and offset);
  main    (`_FromSlotsIterDataset`, right after `mp_prefetch`): copies the slot's arrays out
          into new arrays and publishes s as read, which frees slot k for batch s + R. The
          caller owns what it gets: no later batch can overwrite it, whatever it keeps (e.g.
          JAX's CPU backend may alias a numpy batch rather than copy it). The copy costs the
          main process ~1.2 ms per 9.6 MB batch; handing out views of the slot instead would
          tie slot reuse to the garbage collection of every array the consumer derived from
          them (BENCHMARKS.md has the measurement).

Safety:
  * Slot k holds batch s only while the segment's header says so: the worker marks the slot
    -1 (being written) before it writes and s after; the main process checks the mark against
    the record before and after its copy and raises `SlotOverwrittenError` naming the segment,
    slot and both batch numbers if it changed — never hands out a mixed batch.
  * The worker never waits for a slot: when slot k is still unread (a consumer far behind, or
    records that grain dropped after `set_state`, which only a later record's read frees) or
    a batch's arrays do not fit a slot, that batch goes grain's own way (a fresh segment), so
    nothing blocks and the batches stay the same.
  * Records of one worker arrive in the order written (one FIFO queue per worker), so "read up
    to s" frees every slot of an earlier batch, including batches grain dropped.
  * No leaked /dev/shm entries: the main process unlinks a segment's name as soon as it has
    mapped it (the mappings live on until both sides close them); a worker unlinks its own
    segment at exit when no record of it was ever read; a worker killed before that leaves it
    to multiprocessing's resource tracker, which unlinks it when the main process exits.
  * Checkpoints are unchanged: `get_state`/`set_state` are grain's (records carry no state).
  * Ordering between the processes: the slot's bytes are written before the record is sent
    through grain's queue (a pipe write, a system call) and read after it arrives; the
    read-up-to word is written after the copy-out, and a worker that sees it late only falls
    back.

Batches are dicts of numpy arrays (what every pipeline here yields); object-dtype or
non-array values travel inside the record (pickled), as do elements that are not dicts.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
from multiprocessing import shared_memory
from typing import Any, Mapping

import grain
import numpy as np

_LOG = logging.getLogger(__name__)
_ALIGN = 64  # slot and array offsets: cache-line aligned
_MAGIC = 0x6D6D636C73686D31  # header word 0: "mmclshm1", checks that a name maps a ring


def default_slots(per_worker_buffer_size: int) -> int:
  """R for grain's per-worker buffer size: its queue and the interleave's buffer hold up to
  that many records each, plus one in the interleave's hands and one being read."""
  return 2 * per_worker_buffer_size + 4


class SlotOverwrittenError(RuntimeError):
  """A slot was rewritten while the main process read it (a broken ring protocol)."""


@dataclasses.dataclass(frozen=True)
class SlotRecord:
  """What crosses the process boundary in place of a batch.

  Attributes:
    segment: shared-memory name of the worker's ring.
    slot: k, the slot holding the arrays.
    seq: s, the worker's batch number (slot k holds batch s while header[2 + k] == s).
    arrays: (key, dtype str, shape, byte offset in the slot) per array.
    rest: the batch's other values (pickled with the record).
    owner: the worker's process id.
  """
  segment: str
  slot: int
  seq: int
  arrays: tuple[tuple[str, str, tuple[int, ...], int], ...]
  rest: Mapping[str, Any]
  owner: int


def _round_up(n: int) -> int:
  return -(-n // _ALIGN) * _ALIGN


_MARKS = 4  # header words before the slot marks: magic, read-up-to, R, slot bytes


def _header_words(slots: int) -> int:
  """int64 words before slot 0 (the header, padded to a cache line)."""
  return _round_up(8 * (_MARKS + slots)) // 8


def _slot_arrays(batch: Any) -> list[tuple[str, np.ndarray]] | None:
  """The arrays of `batch` that go into a slot; None when it is not a dict."""
  if not isinstance(batch, dict):
    return None
  return [(k, v) for k, v in batch.items()
          if isinstance(v, np.ndarray) and not v.dtype.hasobject]


class _Ring:
  """A worker's segment: header [magic, read-up-to, R, slot bytes, mark_0 .. mark_{R-1}] int64
  (mark_k: the batch number slot k holds, -1 while it is written), then R slots."""

  def __init__(self, slots: int, slot_bytes: int):
    self.slots, self.slot_bytes = slots, slot_bytes
    words = _header_words(slots)
    self.start = 8 * words
    self.shm = shared_memory.SharedMemory(create=True, size=self.start + slots * slot_bytes)
    self.header = np.ndarray((words,), np.int64, self.shm.buf)
    self.header[1] = -1  # nothing read yet
    self.header[2], self.header[3] = slots, slot_bytes
    self.header[_MARKS:_MARKS + slots] = -1
    self.header[0] = _MAGIC
    # Fault every page in now, once, rather than batch by batch.
    np.ndarray((slots * slot_bytes,), np.uint8, self.shm.buf, offset=self.start)[:] = 0
    self.next_seq = 0
    self.fallbacks = 0
    atexit.register(self.unlink_if_unread)

  def unlink_if_unread(self) -> None:
    """At worker exit: remove the name unless the main process already did."""
    if self.header[1] >= 0:
      return
    try:
      self.shm.unlink()
    except FileNotFoundError:
      pass


@dataclasses.dataclass
class _ToSlots:
  """grain map run in a worker process: batch → `SlotRecord` (or the batch itself, when no
  slot is free or it does not fit; grain then moves it its own way)."""
  slots: int = 6
  _ring: _Ring | None = dataclasses.field(default=None, repr=False)

  def __getstate__(self):
    return {"slots": self.slots, "_ring": None}  # each worker process builds its own ring

  def __call__(self, batch: Any) -> Any:
    arrays = _slot_arrays(batch)
    if not arrays:
      return batch
    offsets, total = [], 0
    for _, a in arrays:
      offsets.append(total)
      total += _round_up(a.nbytes)
    if self._ring is None:
      self._ring = _Ring(self.slots, max(total, _ALIGN))
    ring = self._ring
    seq = ring.next_seq
    k = seq % ring.slots
    if total > ring.slot_bytes or int(ring.header[1]) < seq - ring.slots:
      ring.fallbacks += 1
      if ring.fallbacks in (1, 10, 100, 1000):
        _LOG.info("shm_batches: %d batch(es) of worker %d went through grain's per-batch "
                  "shared memory (no free slot of %d, or larger than the first batch)",
                  ring.fallbacks, os.getpid(), ring.slots)
      return batch
    ring.header[_MARKS + k] = -1
    base = ring.start + k * ring.slot_bytes
    layout = []
    for (key, a), off in zip(arrays, offsets):
      dst = np.ndarray(a.shape, a.dtype, ring.shm.buf, offset=base + off)
      np.copyto(dst, a, casting="no")
      layout.append((key, a.dtype.str, tuple(a.shape), off))
    ring.header[_MARKS + k] = seq
    ring.next_seq = seq + 1
    in_slot = {key for key, _ in arrays}
    return SlotRecord(segment=ring.shm.name, slot=k, seq=seq, arrays=tuple(layout),
                      rest={key: v for key, v in batch.items() if key not in in_slot},
                      owner=os.getpid())


class _Attached:
  """The main process's mapping of one worker's ring (its name already unlinked)."""

  def __init__(self, name: str, owner: int):
    self.shm = shared_memory.SharedMemory(name)
    try:
      self.shm.unlink()  # both sides hold mappings now; nothing left to leak in /dev/shm
    except FileNotFoundError:
      pass
    self.owner = owner
    head = np.ndarray((_MARKS,), np.int64, self.shm.buf)
    if int(head[0]) != _MAGIC:
      raise ValueError(f"shared-memory segment {name!r} is not a batch ring (header "
                       f"{int(head[0]):#x}, expected {_MAGIC:#x})")
    self.slots, self.slot_bytes = int(head[2]), int(head[3])
    words = _header_words(self.slots)
    self.start = 8 * words
    self.header = np.ndarray((words,), np.int64, self.shm.buf)

  def close(self) -> None:
    self.header = None
    try:
      self.shm.close()
    except BufferError:  # an array still views it; the mapping goes with the last view
      pass


def read_record(record: SlotRecord, rings: dict[str, _Attached]) -> dict[str, Any]:
  """Copies a record's batch out of its slot into new arrays and frees the slot.

  Args:
    record: from a worker's `_ToSlots`.
    rings: the caller's mapped segments by name (updated in place).

  Returns:
    the batch: each array a new [same shape] array of the dtype it was written with, plus
    `record.rest`. Raises `SlotOverwrittenError` when the slot no longer (or not yet) holds
    batch `record.seq`.
  """
  ring = rings.get(record.segment)
  if ring is None:
    for name in [n for n, r in rings.items() if not _alive(r.owner)]:
      rings.pop(name).close()  # rings of workers that have exited (e.g. after a restart)
    ring = rings[record.segment] = _Attached(record.segment, record.owner)
  base = ring.start + record.slot * ring.slot_bytes
  mark = _MARKS + record.slot

  def check(when: str) -> None:
    found = int(ring.header[mark])
    if found != record.seq:
      raise SlotOverwrittenError(
          f"shared-memory batch ring {record.segment!r} slot {record.slot}: expected batch "
          f"{record.seq} {when} reading it, found {'a write in progress' if found < 0 else found}"
          f" — the worker reused the slot before the main process had read it")

  check("before")
  batch = {key: np.ndarray(shape, np.dtype(dt), ring.shm.buf, offset=base + off).copy()
           for key, dt, shape, off in record.arrays}
  check("after")
  if record.seq > ring.header[1]:
    ring.header[1] = record.seq  # frees every slot of batches <= seq (read or dropped)
  batch.update(record.rest)
  return batch


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class _FromSlotsIterator(grain.DatasetIterator):
  """Main-process side: records → batches; state, checkpoints and close are the parent's.

  `counts`: batches read from slots ("from_slots") and batches that came grain's own way
  ("passed_through": no free slot, or larger than the first batch)."""

  def __init__(self, parent: grain.DatasetIterator, slots: int):
    super().__init__(parent)
    self._slots = slots
    self._rings: dict[str, _Attached] = {}
    self.counts = {"from_slots": 0, "passed_through": 0}

  def __next__(self) -> Any:
    element = next(self._parent)
    if isinstance(element, SlotRecord):
      self.counts["from_slots"] += 1
      return read_record(element, self._rings)
    self.counts["passed_through"] += 1
    return element

  def get_state(self) -> Any:
    return self._parent.get_state()

  def set_state(self, state: Any) -> None:
    self._parent.set_state(state)

  def close(self) -> None:
    super().close()  # stops the workers first
    for ring in self._rings.values():
      ring.close()
    self._rings.clear()

  def __str__(self) -> str:
    return f"FromSlotsDatasetIterator(slots={self._slots})"


class _FromSlotsIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, slots: int):
    super().__init__(parent)
    self._slots = slots

  def __iter__(self) -> _FromSlotsIterator:
    return _FromSlotsIterator(self._parent.__iter__(), self._slots)

  def __str__(self) -> str:
    return f"FromSlotsIterDataset(slots={self._slots})"


def _mark_flags_parsed() -> None:
  """grain 0.2.18 workers read an absl flag and fail when flags were never parsed (plain
  scripts, pytest); fixed upstream after 0.2.18."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def mp_prefetch(ds: grain.IterDataset, options: grain.MultiprocessingOptions, *,
                slots: int | None = None) -> grain.IterDataset:
  """`ds.mp_prefetch(options)` with each worker's batches passed through its slot ring.

  Same elements, order, `get_state`/`set_state` and slicing as grain's `mp_prefetch` (the
  worker-side step is a plain `map` after `ds`, so grain still slices `ds` per worker).

  Args:
    ds: an IterDataset of batches (dicts of numpy arrays).
    options: grain's options (num_workers >= 1, per_worker_buffer_size).
    slots: R per worker, default `default_slots(options.per_worker_buffer_size)` (6 for
      grain's default of 1); a batch that finds no free slot goes grain's own way, slower but
      the same.

  Returns:
    an IterDataset of the batches, each array owned by the caller.
  """
  if slots is None:
    slots = default_slots(options.per_worker_buffer_size)
  if slots < 2:
    raise ValueError(f"shm_batches.mp_prefetch: slots must be >= 2, got {slots}")
  _mark_flags_parsed()
  out = ds.map(_ToSlots(slots=slots)).mp_prefetch(options)
  return _FromSlotsIterDataset(out, slots)
