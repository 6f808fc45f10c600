"""Streaming shards into grain: per-host shard assignment, a seeded shuffle, exact resume.

Order contract of a streamed training source (S shards, P processes, b = B / P rows per host):
  * epoch e: the shards are permuted by `permutation.permute(·, S, epoch_key(seed, e))`; process
    p reads shards perm[p], perm[p + P], ... (so S >= P), each from its first sample on;
  * the host's epoch stream (those shards' samples in order, held-out keys and skipped bad
    samples removed) is cut into windows of `shuffle_buffer` consecutive samples; window w of
    epoch e is emitted in the order of a permutation keyed by (seed, e, p, w) — a shuffle buffer
    whose state is three integers, since random access inside a tar or parquet file is impossible;
  * batches are consecutive runs of b emitted samples; a batch may span two epochs (the remainder
    of an epoch is carried over, never dropped); with `num_epochs` the stream ends after that many
    epochs (a last partial batch is dropped). Hosts whose shards hold different numbers of
    samples then stop at different steps, so multi-host runs stream without `num_epochs` (the
    trainer's default: it stops at train.total_steps).
The iterator's state is (epoch, shard, offset, window, taken): the start of the current window
(the host's shard list index and the sample position inside that file) and how many of its
samples were emitted. Restoring seeks the file to that sample (skipping members unread), re-reads
the window and continues exactly.

Worker processes (`data.worker_count` = W > 0, grain's `mp_prefetch`): worker w gets the slice
w::W of the batches (`StreamedBatches.set_slice`). Every worker reads the whole stream (reading
is cheap next to decoding) but maps (decodes, augments) only batches w, w + W, ...; grain
interleaves the workers round robin, so the batches and their order are those of W = 0. A
worker's state adds `skip` (batches to pass over before its next one); grain keeps one state per
worker. The decoded batches cross to the main process through each worker's ring of
shared-memory slots (`shm_batches`, applied by `pairs.to_iterator`). Bad samples met while
reading are counted by worker 0 only (the others pass over them, or raise the same error), so
the skip ledger counts each once.

Samples: the reader's fields plus `path` (the shard file), `record` (the sample's position in
it), `index` and `epoch`; readers' fields must not use these names.

Keys: a sample's key (webdataset `__key__`, parquet key column or `<file>/<row>`) is hashed with a
fixed (seed-independent) 64-bit hash; `key_fraction(key) < holdout_fraction` holds it out of
training for validation and evaluation, and the hash's top 63 bits are the sample's `index` that
keys its augmentation, so the same pair gets the same crop in every source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Callable, Iterator, Protocol

import grain
import numpy as np

from data_pipelines import permutation
from data_pipelines import records
from data_pipelines.sources import spec as spec_lib

_LOG = logging.getLogger(__name__)
_WINDOW_STREAM = 0x57696E64  # separates window-shuffle randomness from other uses of the seed


class ShardReader(Protocol):
  files: list[str]

  def read(self, shard: int, start: int = 0, keep: Callable[[str], bool] | None = None
           ) -> Iterator[tuple[int, Any]]:
    ...


def key_hash(key: str) -> int:
  """A stable 64-bit hash of a sample key (blake2b of its UTF-8 bytes)."""
  return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def key_fraction(key: str) -> float:
  """key_hash / 2**64, uniform in [0, 1): the hold-out draw of the sample."""
  return key_hash(key) / 2.0**64


def key_index(key: str) -> int:
  """The sample's int63 index (the hash's top 63 bits): keys augmentation like a record index."""
  return key_hash(key) >> 1


def is_held_out(key: str, fraction: float) -> bool:
  return key_fraction(key) < fraction


def epoch_key(seed: int, epoch: int) -> int:
  return int(permutation.hash_u64(seed, epoch)[0])


def handle_bad(error: spec_lib.BadRecordError, skip: bool) -> None:
  """Raises `error`, or with `skip` logs it and counts it in the skip ledger."""
  if not skip:
    raise error
  records._count_skip(error.split, error.field)  # pylint: disable=protected-access
  _LOG.warning("skipping bad sample: %s", error)


def natural_records(reader: ShardReader, *, skip_bad_records: bool,
                    keep: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
  """Every good sample (whose key `keep` accepts) in the source's natural order (files sorted,
  then file order), with `path`, `record` (the position in that file) and `index` added."""
  for shard, path in enumerate(reader.files):
    for position, raw in reader.read(shard, 0, keep):
      if isinstance(raw, spec_lib.BadRecordError):
        handle_bad(raw, skip_bad_records)
        continue
      yield dict(raw, path=path, record=position, index=key_index(raw["key"]))


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  """batch_size: rows per host (B / P); the other fields as in the module docstring."""
  batch_size: int
  seed: int
  process_index: int = 0
  process_count: int = 1
  shuffle_buffer: int = 1000
  num_epochs: int | None = None
  holdout_fraction: float = 0.0
  skip_bad_records: bool = False


class StreamedBatches(grain.IterDataset):
  """grain `IterDataset` of lists of raw samples (b per element) under the order contract."""

  def __init__(self, reader: ShardReader, options: StreamOptions):
    super().__init__()
    self._slice = (0, 1)  # (first batch, step): this worker's batches (see `set_slice`)
    s, p = len(reader.files), options.process_count
    if s < p:
      raise spec_lib.SourceConfigError(
          f"{reader!r}: {s} shard file(s) for {p} processes; each process reads whole shards, "
          "so write at least as many shards as processes")
    if options.batch_size < 1 or options.shuffle_buffer < 1:
      raise ValueError(f"batch_size and shuffle_buffer must be >= 1, got {options}")
    self.reader, self.options = reader, options

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Keeps batches sl.start, sl.start + sl.step, ... (grain calls this in worker process
    sl.start of sl.step); the batches of the other workers are read and passed over."""
    if sequential_slice:
      raise ValueError("streamed sources are sliced by batch (round robin), not sequentially")
    start, step = sl.start or 0, sl.step or 1
    if sl.stop is not None or not 0 <= start < step:
      raise ValueError(f"StreamedBatches.set_slice: expected slice(w, None, W) with 0 <= w < W, "
                       f"got {sl}")
    self._slice = (start, step)

  def __iter__(self) -> "_StreamIterator":
    return _StreamIterator(self.reader, self.options, self._slice)

  def __str__(self) -> str:
    return f"StreamedBatches({self.reader!r}, {self.options}, slice={self._slice})"


class _StreamIterator(grain.DatasetIterator):

  def __init__(self, reader: ShardReader, options: StreamOptions,
               batch_slice: tuple[int, int] = (0, 1)):
    super().__init__()
    self._reader, self._o = reader, options
    self._first, self._step = batch_slice
    self._skip = self._first  # batches to pass over before the next one this iterator returns
    self._state = {"epoch": 0, "shard": 0, "offset": 0, "window": 0, "taken": 0}
    self._window: list[dict] | None = None  # the current window, in emission order
    self._cursor = (0, 0, 0)  # (epoch, shard, offset) of the next sample to read
    self._gen = None
    self._gen_at: tuple[int, int] | None = None
    self._shards_of: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

  # --- reading ------------------------------------------------------------------------------------
  def _host_shards(self, epoch: int) -> np.ndarray:
    if self._shards_of[0] != epoch:
      s = len(self._reader.files)
      perm = permutation.permute(np.arange(s), s, epoch_key(self._o.seed, epoch))
      self._shards_of = (epoch, perm[self._o.process_index::self._o.process_count])
    return self._shards_of[1]

  def _next_sample(self, epoch: int) -> dict | None:
    """The next good training sample of `epoch` from the cursor on; None at the epoch's end."""
    _, shard, offset = self._cursor
    shards = self._host_shards(epoch)
    while shard < len(shards):
      if self._gen is None or self._gen_at != (epoch, shard):
        self._gen = self._reader.read(int(shards[shard]), offset)
        self._gen_at = (epoch, shard)
      for position, raw in self._gen:
        self._cursor = (epoch, shard, position + 1)
        if isinstance(raw, spec_lib.BadRecordError):
          if self._first == 0 or not self._o.skip_bad_records:
            handle_bad(raw, self._o.skip_bad_records)
          continue
        if self._o.holdout_fraction and is_held_out(raw["key"], self._o.holdout_fraction):
          continue
        return dict(raw, path=self._reader.files[int(shards[shard])], record=position,
                    index=key_index(raw["key"]), epoch=epoch)
      shard, offset = shard + 1, 0
      self._cursor, self._gen = (epoch, shard, 0), None
    return None

  def _fill(self) -> None:
    """Reads the window that starts at the cursor (moving to the next epoch when the current
    one is exhausted) and sets the state to its start."""
    epoch, shard, offset = self._cursor
    window_index = self._state["window"] + 1 if self._window is not None else self._state["window"]
    empty_epochs = 0
    while True:
      if self._o.num_epochs is not None and epoch >= self._o.num_epochs:
        raise StopIteration
      self._state = {"epoch": epoch, "shard": shard, "offset": offset, "window": window_index,
                     "taken": 0}
      samples = []
      while len(samples) < self._o.shuffle_buffer:
        sample = self._next_sample(epoch)
        if sample is None:
          break
        samples.append(sample)
      if samples:
        break
      empty_epochs += 1
      if empty_epochs > 1 or (shard == 0 and offset == 0):
        raise spec_lib.SourceConfigError(f"{self._reader!r}: process {self._o.process_index} of "
                         f"{self._o.process_count} found no training samples in its shards "
                         f"of epoch {epoch}")
      epoch, shard, offset, window_index = epoch + 1, 0, 0, 0
      self._cursor, self._gen = (epoch, 0, 0), None
    key = int(permutation.hash_u64(self._o.seed, _WINDOW_STREAM, epoch, self._o.process_index,
                                   window_index)[0])
    order = permutation.permute(np.arange(len(samples)), len(samples), key)
    self._window = [samples[i] for i in order]

  # --- grain iterator protocol --------------------------------------------------------------------
  def _take(self, keep: bool) -> list[dict]:
    batch = []
    for _ in range(self._o.batch_size):
      if self._window is None or self._state["taken"] >= len(self._window):
        self._fill()
      if keep:
        batch.append(self._window[self._state["taken"]])
      self._state["taken"] += 1
    return batch

  def __next__(self) -> list[dict]:
    while self._skip:
      self._take(keep=False)
      self._skip -= 1
    batch = self._take(keep=True)
    self._skip = self._step - 1
    return batch

  def get_state(self) -> dict[str, Any]:
    state = dict(self._state)
    if self._step > 1:
      state["skip"] = self._skip
    return state

  def set_state(self, state: dict[str, Any]) -> None:
    st = {k: int(state[k]) for k in ("epoch", "shard", "offset", "window", "taken")}
    self._skip = int(state.get("skip", 0)) if self._step > 1 else 0
    self._cursor = (st["epoch"], st["shard"], st["offset"])
    self._gen = None
    self._fill_at(st)

  def _fill_at(self, st: dict[str, int]) -> None:
    """Re-reads the window that starts at `st` and skips its `taken` samples."""
    self._state = dict(st)
    self._window = None
    self._cursor = (st["epoch"], st["shard"], st["offset"])
    try:
      self._fill()
    except StopIteration:
      self._window = []
      self._state = dict(st)
      return
    # _fill moves on to the next epoch only when nothing is left in this one; keep its window.
    self._state["taken"] = min(st["taken"], len(self._window))
