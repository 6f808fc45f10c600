"""Image–text pairs from any `data.source`: one raw record shape, one transform, grain pipelines.

Every reader yields raw records {image: encoded bytes, caption: str, key: str}; this module adds
where each came from and its `index` (see `stream.key_index` for streamed sources, the split
position for tfds) and turns lists of them into batches with the per-example transform of the
ArrayRecord image–text path (`image_ops`: decode into a random-resized crop and flip, uint8
pixels that the model normalises on the device; the caption tokenised and padded):

  image: [b, S, S, 3] uint8; text: [b, L] int32; index: [b] int64 (eval: -1 on padding rows);
  valid: [b] bool (eval batches only).

Training order: streamed sources (webdataset, parquet) follow `stream`'s contract; tfds (random
access) follows `data_pipelines.image_text`'s contract (one seeded permutation per epoch of the
training records, process p reads its rows of each global batch). Both are checkpointable grain
iterators that resume exactly.

Held-out data: with no separate evaluation source, a stable hash of each sample's key holds out
`holdout_fraction` of the source (stream: the key's hash; tfds: the record's `<split>/<index>`).
Validation and the evaluator read the first `max_examples` held-out samples in the source's
natural order; training never sees them.

Bad samples: a corrupt or missing member or an undecodable image raises `BadRecordError` (file,
sample, field), or with `skip_bad_records` is logged and counted in the skip ledger
(`records.skip_ledger`); in a batch, a skipped row is replaced by the next good row of the same
batch, so batches keep their shape and stay deterministic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
from typing import Any, Callable, Sequence

import grain
import numpy as np

from data_pipelines import image_ops
from data_pipelines import image_text
from data_pipelines import shm_batches
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.sources import parquet as parquet_lib
from data_pipelines.sources import spec as spec_lib
from data_pipelines.sources import stream
from data_pipelines.sources import tfds as tfds_lib
from data_pipelines.sources import webdataset as wds_lib

IMAGE_MEAN = image_ops.CLIP_MEAN
IMAGE_STD = image_ops.CLIP_STD


# --------------------------------------------------------------------------------------------
# The per-example transform, over lists of raw records.


def report_bad(record: dict, field: str, reason: str, skip: bool) -> None:
  """Raises (or with `skip` logs and counts) a BadRecordError for a raw record's `field`."""
  stream.handle_bad(spec_lib.BadRecordError(
      path=record["path"], key=record["key"], position=record["record"], field=field,
      reason=reason, split=record.get("split", "train")), skip)


def decode_images(records: Sequence[dict], *, image_size: int, augment: bool,
                  crop_scale: tuple[float, float], seed: int, skip_bad_records: bool,
                  decode_threads: int = 1, field: str = "image"
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Decodes the encoded images of a batch of raw records into crops.

  Each record carries `field` (bytes), key, index (int), epoch, path, record; the crop box and
  flip are drawn per (seed, epoch, index) (random-resized crop + flip with `augment`, else the
  centre square). `decode_threads` > 1 decodes in that many threads (PIL releases the GIL while
  decoding and resizing); the result does not depend on it. A record marked `reported` (already
  counted as bad) or whose image does not decode is reported (`report_bad`) and its row takes
  the next good row of the batch (cyclically), so batches keep their shape and stay
  deterministic.

  Returns:
    images: [b, S, S, 3] uint8; source_row: [b] int64, the record each row's image (and so every
    other field of the row) comes from.
  """
  b, s = len(records), image_size
  opened: list[Any] = [None] * b
  for r, rec in enumerate(records):
    if rec.get("reported"):
      continue
    try:
      opened[r] = image_ops.open_image(rec[field])
    except ValueError as e:
      report_bad(rec, field, str(e), skip_bad_records)
  ok = [r for r in range(b) if opened[r] is not None]
  sizes = np.asarray([opened[r].size for r in ok], np.int64).reshape(-1, 2)
  indices = np.asarray([records[r]["index"] for r in ok], np.int64)
  epochs = np.asarray([records[r].get("epoch", 0) for r in ok], np.int64)
  if not augment:
    boxes, flips = (image_ops.center_crop_boxes(sizes[:, 1], sizes[:, 0]),
                    np.zeros(len(indices), bool))
  else:
    boxes, flips = np.zeros((len(indices), 4)), np.zeros(len(indices), bool)
    for e in np.unique(epochs).tolist():  # a batch spans at most two epochs
      rows = np.flatnonzero(epochs == e)
      boxes[rows] = image_ops.random_resized_crop_boxes(
          sizes[rows, 1], sizes[rows, 0], seed=seed, epoch=int(e), indices=indices[rows],
          scale=crop_scale)
      flips[rows] = image_ops.flip_mask(seed=seed, epoch=int(e), indices=indices[rows])
  images = np.empty((b, s, s, 3), np.uint8)
  good = np.zeros(b, bool)

  def decode(j: int) -> str:
    r = ok[j]
    try:
      images[r] = image_ops.decode_crop_resize(opened[r], boxes[j], s, flip=bool(flips[j]))
      return ""
    except ValueError as e:  # pixel data corrupt although the header parsed
      return str(e)

  reasons = image_ops.map_threaded(decode, range(len(ok)), decode_threads)
  for j, r in enumerate(ok):  # reported in row order, whatever the threads did
    if reasons[j]:
      report_bad(records[r], field, reasons[j], skip_bad_records)
    else:
      good[r] = True
  if not good.any():
    raise spec_lib.SourceConfigError(f"every sample of a batch is bad (first: "
                                     f"{records[0]['path']}, sample {records[0]['key']!r})")
  source_row = np.arange(b)
  for r in np.flatnonzero(~good).tolist():
    k = r
    while not good[k]:
      k = (k + 1) % b
    source_row[r] = k
    images[r] = images[k]
  return images, source_row


@dataclasses.dataclass(frozen=True)
class ImageTextTransform:
  """Raw records → {image [b, S, S, 3] uint8, text [b, L] int32, index [b] int64}.

  Images stay uint8 pixels (a quarter of float32's bytes); the model's image tower normalises
  them on the device with IMAGE_MEAN / IMAGE_STD, as for the ArrayRecord path. Decoding,
  augmentation and bad samples: `decode_images`.
  """
  image_size: int
  max_text_len: int
  tokenizer: tokenizer_lib.TextTokenizer
  augment: bool = True
  crop_scale: tuple[float, float] = (0.08, 1.0)
  seed: int = 0
  skip_bad_records: bool = False
  decode_threads: int = 1

  def __call__(self, records: Sequence[dict]) -> dict[str, np.ndarray]:
    images, source_row = decode_images(
        records, image_size=self.image_size, augment=self.augment, crop_scale=self.crop_scale,
        seed=self.seed, skip_bad_records=self.skip_bad_records,
        decode_threads=self.decode_threads)
    captions = [records[k]["caption"] for k in source_row.tolist()]
    index = np.asarray([records[k]["index"] for k in source_row.tolist()], np.int64)
    return {"image": images,
            "text": self.tokenizer.encode(captions, self.max_text_len), "index": index}


# --------------------------------------------------------------------------------------------
# Opening a source.


@dataclasses.dataclass(frozen=True)
class Fields:
  """Where image, caption and key live: '' = the source's default (webdataset jpg/jpeg/png/webp
  and txt; parquet columns image and caption, key column `key` if present, else `<file>/<row>`;
  tfds features image and caption). For webdataset a field may list alternatives separated by
  ';'."""
  image: str = ""
  caption: str = ""
  key: str = ""


class PairSource:
  """An opened streamed (webdataset, parquet) or random-access (tfds) image–text source."""

  def __init__(self, spec: str | spec_lib.SourceSpec, fields: Fields = Fields()):
    self.spec = spec if isinstance(spec, spec_lib.SourceSpec) else spec_lib.parse(spec)
    self.fields = fields
    if self.spec.scheme == "webdataset":
      self.files = spec_lib.expand_files(self.spec)
      if fields.key:
        raise spec_lib.SourceConfigError(
            f"data source {self.spec}: webdataset samples are keyed by their member names; "
            f"config key data.key_field must be empty (got {fields.key!r})")
      self.reader: Any = wds_lib.WebDatasetShards(
          self.files, image_fields=fields.image.split(";") if fields.image
          else wds_lib.IMAGE_FIELDS,
          caption_fields=fields.caption.split(";") if fields.caption else wds_lib.CAPTION_FIELDS)
    elif self.spec.scheme == "parquet":
      self.files = spec_lib.expand_files(self.spec)
      self.reader = parquet_lib.ParquetShards(self.files, image_column=fields.image or "image",
                                              caption_column=fields.caption or "caption",
                                              key_column=fields.key)
    elif self.spec.scheme == "tfds":
      if fields.key:
        raise spec_lib.SourceConfigError(
            f"data source {self.spec}: tfds records are keyed by <split>/<index>; config key "
            f"data.key_field must be empty (got {fields.key!r})")
      self.reader = tfds_lib.TfdsRecords(self.spec, image_field=fields.image or "image",
                                         caption_field=fields.caption or "caption")
      self.files = sorted(str(p) for p in pathlib.Path(self.reader.path).glob(
          f"*-{self.spec.split}.array_record-*"))
    else:
      raise spec_lib.SourceConfigError(f"data source {self.spec}: {self.spec.scheme} datasets "
                                       "are read by data_pipelines.image_text, not here")

  @property
  def streamed(self) -> bool:
    return self.spec.scheme != "tfds"

  def __repr__(self) -> str:
    return f"PairSource({self.spec})"

  def fingerprint(self) -> str:
    """Changes when the source's files change (names, sizes, modification times)."""
    parts = [str(self.spec), repr(self.fields)]
    for f in self.files:
      st = os.stat(f)
      parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()

  # --- random access (tfds) -----------------------------------------------------------------------
  def _split_indices(self, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """tfds: (training indices, held-out indices) of the split, by the hash of `<split>/<i>`."""
    n = len(self.reader)
    held = np.asarray([stream.is_held_out(self.reader.key(i), holdout_fraction)
                       for i in range(n)], bool) if holdout_fraction > 0 else np.zeros(n, bool)
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)

  def _read_indexed(self, indices: np.ndarray, *, epoch: int, skip: bool) -> list[dict]:
    rows = self.reader.read(indices.tolist())
    out = []
    for i, raw in zip(indices.tolist(), rows):
      if isinstance(raw, spec_lib.BadRecordError):
        stream.handle_bad(raw, skip)
        # Already reported: the transform replaces the row without reporting it again.
        raw = {"image": b"", "caption": "", "key": self.reader.key(i), "reported": True}
      out.append(dict(raw, path=self.reader.path, record=i, index=i, epoch=epoch,
                      split=self.spec.split))
    return out

  # --- what the pipelines use ---------------------------------------------------------------------
  def training_captions(self, num: int, holdout_fraction: float) -> list[str]:
    """The first `num` captions of the training part in natural order (bad samples skipped)."""
    out: list[str] = []
    if self.streamed:
      for shard in range(len(self.files)):
        for _, raw in self.reader.read(shard):
          if isinstance(raw, spec_lib.BadRecordError):
            continue
          if not stream.is_held_out(raw["key"], holdout_fraction):
            out.append(raw["caption"])
            if len(out) >= num:
              return out
      return out
    train, _ = self._split_indices(holdout_fraction)
    for start in range(0, min(num, len(train)), 256):
      rows = self.reader.read(train[start:min(start + 256, num)].tolist())
      out.extend(r["caption"] for r in rows if not isinstance(r, spec_lib.BadRecordError))
    return out

  def held_out(self, *, holdout_fraction: float, max_examples: int, skip_bad_records: bool
               ) -> "RecordTable":
    """The first `max_examples` (0 = all) held-out samples in natural order; holdout_fraction
    1.0 = every sample (a separate evaluation source)."""
    limit = max_examples if max_examples > 0 else sys.maxsize
    if self.streamed:
      rows = []
      keep = lambda key: stream.is_held_out(key, holdout_fraction)  # noqa: E731
      for rec in stream.natural_records(self.reader, skip_bad_records=skip_bad_records,
                                        keep=keep):
        rows.append(dict(rec, epoch=0, split="heldout"))
        if len(rows) >= limit:
          break
      return ListTable(rows, str(self.spec))
    _, held = self._split_indices(holdout_fraction)
    return TfdsTable(self, held[:limit], skip_bad_records)

  def train_dataset(self, *, global_batch_size: int, seed: int, transform: ImageTextTransform,
                    holdout_fraction: float, shuffle_buffer: int, process_index: int = 0,
                    process_count: int = 1, num_epochs: int | None = None):
    """Training batches: a grain IterDataset (streamed) or MapDataset (tfds) of transformed
    batches of this host's b = B / P rows."""
    image_text._check_batch(sys.maxsize, global_batch_size, process_index, process_count)  # pylint: disable=protected-access
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be None (infinite) or >= 1, got {num_epochs}")
    if self.streamed:
      options = stream.StreamOptions(
          batch_size=global_batch_size // process_count, seed=seed, process_index=process_index,
          process_count=process_count, shuffle_buffer=shuffle_buffer, num_epochs=num_epochs,
          holdout_fraction=holdout_fraction, skip_bad_records=transform.skip_bad_records)
      return stream.StreamedBatches(self.reader, options).map(transform)
    train, _ = self._split_indices(holdout_fraction)
    n = len(train)
    image_text._check_batch(n, global_batch_size, process_index, process_count)  # pylint: disable=protected-access
    length = sys.maxsize if num_epochs is None else num_epochs * (n // global_batch_size)
    return grain.MapDataset.range(length).map(_RandomAccessBatch(
        source=self, train=train, transform=transform, global_batch_size=global_batch_size,
        seed=seed, process_index=process_index, process_count=process_count))


@dataclasses.dataclass(frozen=True)
class _RandomAccessBatch:
  """grain map: step t → this host's rows of global batch t (image_text's order contract over
  the training indices of a tfds split)."""
  source: PairSource
  train: np.ndarray
  transform: ImageTextTransform
  global_batch_size: int
  seed: int
  process_index: int
  process_count: int

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    n = len(self.train)
    positions = image_text.global_batch_indices(n, self.global_batch_size, self.seed, step,
                                                process_index=self.process_index,
                                                process_count=self.process_count)
    epoch = int(step) // (n // self.global_batch_size)
    return self.transform(self.source._read_indexed(  # pylint: disable=protected-access
        self.train[positions], epoch=epoch, skip=self.transform.skip_bad_records))


class RecordTable:
  """A fixed, ordered set of raw records (held-out data): `len`, `read(rows)`."""

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, rows: np.ndarray) -> list[dict]:
    raise NotImplementedError


class ListTable(RecordTable):
  """Held-out samples of a streamed source, kept in memory (encoded bytes)."""

  def __init__(self, rows: list[dict], name: str):
    self.rows, self.name = rows, name

  def __len__(self) -> int:
    return len(self.rows)

  def __repr__(self) -> str:
    return f"ListTable({self.name}, {len(self.rows)} samples)"

  def read(self, rows: np.ndarray) -> list[dict]:
    return [self.rows[int(r)] for r in rows]


class TfdsTable(RecordTable):
  """Held-out records of a tfds split, read on demand."""

  def __init__(self, source: PairSource, indices: np.ndarray, skip: bool):
    self.source, self.indices, self.skip = source, indices, skip

  def __len__(self) -> int:
    return len(self.indices)

  def __repr__(self) -> str:
    return f"TfdsTable({self.source.spec}, {len(self.indices)} records)"

  def read(self, rows: np.ndarray) -> list[dict]:
    return self.source._read_indexed(self.indices[np.asarray(rows, np.int64)], epoch=0,  # pylint: disable=protected-access
                                     skip=self.skip)


@dataclasses.dataclass(frozen=True)
class _TableBatch:
  """grain map: t → this process's rows of the t-th table-order batch (padded when `pad`)."""
  table: RecordTable
  transform: ImageTextTransform
  batch_size: int
  process_index: int
  process_count: int
  pad: bool

  def __call__(self, t: int) -> dict[str, np.ndarray]:
    n = len(self.table)
    per_host = self.batch_size // self.process_count
    start = int(t) * self.batch_size + self.process_index * per_host
    real = np.arange(start, min(start + per_host, n), dtype=np.int64)
    if not self.pad:
      return self.transform(self.table.read(real))
    # Pad with copies of row 0 and flag them invalid (eval).
    rows = np.concatenate([real, np.zeros(per_host - len(real), np.int64)])
    batch = self.transform(self.table.read(rows))
    valid = np.zeros(per_host, bool)
    valid[:len(real)] = True
    batch["valid"] = valid
    batch["index"] = np.where(valid, batch["index"], -1)
    return batch


def table_batches(table: RecordTable, transform: ImageTextTransform, *, batch_size: int,
                  process_index: int = 0, process_count: int = 1, pad: bool = True
                  ) -> grain.MapDataset:
  """Table-order batches: with `pad`, ceil(n / B) batches flagged by `valid` (the evaluator);
  without, the n // B full batches (validation, training layout)."""
  n = len(table)
  image_text._check_batch(n, batch_size, process_index, process_count, drop_remainder=not pad)  # pylint: disable=protected-access
  count = math.ceil(n / batch_size) if pad else n // batch_size
  return grain.MapDataset.range(count).map(_TableBatch(
      table=table, transform=transform, batch_size=batch_size, process_index=process_index,
      process_count=process_count, pad=pad))


def to_iterator(ds, *, num_threads: int = 2, prefetch_buffer_size: int = 4,
                worker_count: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator with background prefetch, for either dataset kind.

  worker_count > 0 maps (decodes, augments) the batches in that many grain worker processes:
  a streamed source's batches are dealt round robin (`stream` module docstring), a
  random-access one's by grain's slicing; either way the batches and their order are those of
  worker_count = 0 (the entry point needs a `__main__` guard: workers are spawned). Batches
  come through each worker's shared-memory slot ring (`shm_batches.mp_prefetch`)."""
  if isinstance(ds, grain.MapDataset):
    return image_text.to_iterator(ds, num_threads=num_threads,
                                  prefetch_buffer_size=prefetch_buffer_size,
                                  worker_count=worker_count)
  if worker_count > 0:
    return iter(shm_batches.mp_prefetch(ds, grain.MultiprocessingOptions(
        num_workers=worker_count)))
  if prefetch_buffer_size > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_buffer_size)
  return iter(ds)


# --------------------------------------------------------------------------------------------
# The caption tokenizer of a source that carries none.


def default_cache_dir() -> pathlib.Path:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "mmcl"


def cached_tokenizer(key: Any, texts: Callable[[], list[str]], *, vocab_size: int,
                     cache_dir: str | os.PathLike | None = None, what: str = "texts"
                     ) -> tuple[tokenizer_lib.TextTokenizer, pathlib.Path]:
  """A BPE tokenizer of `vocab_size` trained on `texts()` (deterministic), cached as
  `<cache_dir>/tokenizers/<hash of key>.json` so the trainer, the evaluator and the exporter
  share one file. `key` (JSON-able) must change whenever the texts would. Returns (tokenizer,
  its path)."""
  digest = hashlib.sha256(json.dumps([key, vocab_size]).encode()).hexdigest()[:24]
  folder = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  path = folder / "tokenizers" / f"{digest}.json"
  if path.is_file():
    return tokenizer_lib.TextTokenizer.load(path), path
  corpus = texts()
  if not corpus:
    raise spec_lib.SourceConfigError(f"no training {what} to train a tokenizer on")
  tok = tokenizer_lib.TextTokenizer.train(corpus, vocab_size=vocab_size)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tok.save(tmp)
  os.replace(tmp, path)
  return tok, path


def source_tokenizer(source: PairSource, *, vocab_size: int, num_captions: int,
                     holdout_fraction: float, cache_dir: str | os.PathLike | None = None
                     ) -> tuple[tokenizer_lib.TextTokenizer, pathlib.Path]:
  """A BPE tokenizer trained on the first `num_captions` training captions of `source`
  (`cached_tokenizer`). Returns (tokenizer, its path)."""
  try:
    return cached_tokenizer(
        [source.fingerprint(), num_captions, holdout_fraction],
        lambda: source.training_captions(num_captions, holdout_fraction), vocab_size=vocab_size,
        cache_dir=cache_dir, what="captions")
  except spec_lib.SourceConfigError as e:
    raise spec_lib.SourceConfigError(f"data source {source.spec}: {e}") from None


# --------------------------------------------------------------------------------------------
# Everything a task needs, from its config.


class ImageTextData:
  """The training, validation and evaluation pipelines of a webdataset/tfds/parquet source.

  Built from a config's data section (`from_config`; keys in `data_pipelines.sources
  .CONFIG_KEYS`, plus max_text_len, augment, skip_bad_records, global_batch_size, num_epochs).
  Attributes: image_size, tokenizer, tokenizer_path, vocab_size, source, eval (PairSource).
  """

  def __init__(self, source: str, *, seed: int, image_size: int, max_text_len: int,
               fields: Fields = Fields(), tokenizer: str = "", vocab_size: int = 8192,
               tokenizer_captions: int = 100_000, holdout_fraction: float = 0.02,
               eval_source: str = "", eval_examples: int = 5000, shuffle_buffer: int = 1000,
               cache_dir: str = "", augment: bool = True, skip_bad_records: bool = False,
               decode_threads: int = 0, worker_count: int = 0):
    if not 0.0 <= holdout_fraction < 1.0:
      raise spec_lib.SourceConfigError(f"config key data.holdout_fraction must be in [0, 1), "
                                       f"got {holdout_fraction}")
    if not eval_source and holdout_fraction == 0.0:
      raise spec_lib.SourceConfigError(
          "config keys data.holdout_fraction = 0 and data.eval_source = '': nothing is held "
          "out for validation and evaluation; set one of them")
    self.source = PairSource(source, fields)
    self.eval = PairSource(eval_source, fields) if eval_source else self.source
    self.holdout_fraction = holdout_fraction
    self._eval_fraction = holdout_fraction if not eval_source else 1.0
    self.eval_examples, self.shuffle_buffer = eval_examples, shuffle_buffer
    self.seed, self.image_size, self.max_text_len = seed, image_size, max_text_len
    self.augment, self.skip_bad_records = augment, skip_bad_records
    # With worker processes each decodes its share of the cores (`image_ops.decode_threads`).
    self.decode_threads = image_ops.decode_threads(decode_threads, worker_count=worker_count)
    if tokenizer:
      self.tokenizer_path = pathlib.Path(tokenizer)
      self.tokenizer = tokenizer_lib.TextTokenizer.load(self.tokenizer_path)
    else:
      self.tokenizer, self.tokenizer_path = source_tokenizer(
          self.source, vocab_size=vocab_size, num_captions=tokenizer_captions,
          holdout_fraction=holdout_fraction, cache_dir=cache_dir or None)
    self.vocab_size = self.tokenizer.vocab_size
    self._held_out: RecordTable | None = None

  @classmethod
  def from_config(cls, data: Any, *, seed: int) -> "ImageTextData":
    g = lambda k: getattr(data, k)  # noqa: E731
    return cls(g("source"), seed=seed, image_size=int(g("image_size")),
               max_text_len=int(g("max_text_len")),
               fields=Fields(g("image_field"), g("caption_field"), g("key_field")),
               tokenizer=g("tokenizer"), vocab_size=int(g("vocab_size")),
               tokenizer_captions=int(g("tokenizer_captions")),
               holdout_fraction=float(g("holdout_fraction")), eval_source=g("eval_source"),
               eval_examples=int(g("eval_examples")), shuffle_buffer=int(g("shuffle_buffer")),
               cache_dir=g("cache_dir"), augment=bool(g("augment")),
               skip_bad_records=bool(g("skip_bad_records")),
               decode_threads=int(g("decode_threads")),
               worker_count=int(g("worker_count")) if "worker_count" in data else 0)

  def transform(self, *, train: bool) -> ImageTextTransform:
    return ImageTextTransform(image_size=self.image_size, max_text_len=self.max_text_len,
                              tokenizer=self.tokenizer, augment=train and self.augment,
                              seed=self.seed, skip_bad_records=self.skip_bad_records,
                              decode_threads=self.decode_threads)

  def held_out(self) -> RecordTable:
    if self._held_out is None:
      self._held_out = self.eval.held_out(holdout_fraction=self._eval_fraction,
                                          max_examples=self.eval_examples,
                                          skip_bad_records=self.skip_bad_records)
    return self._held_out

  def _check_held_out(self, batch_size: int) -> RecordTable:
    table = self.held_out()
    if len(table) < batch_size:
      raise spec_lib.SourceConfigError(
          f"data source {self.eval.spec}: {len(table)} held-out samples, fewer than one batch "
          f"of {batch_size}; raise data.holdout_fraction (now {self.holdout_fraction}) or "
          f"data.eval_examples (now {self.eval_examples}), or set data.eval_source")
    return table

  def train_dataset(self, *, global_batch_size: int, process_index: int = 0,
                    process_count: int = 1, num_epochs: int | None = None):
    return self.source.train_dataset(
        global_batch_size=global_batch_size, seed=self.seed, transform=self.transform(train=True),
        holdout_fraction=self.holdout_fraction, shuffle_buffer=self.shuffle_buffer,
        process_index=process_index, process_count=process_count, num_epochs=num_epochs)

  def train_iterator(self, *, global_batch_size: int, process_index: int = 0,
                     process_count: int = 1, num_epochs: int | None = None,
                     num_threads: int = 2, prefetch_buffer_size: int = 4, worker_count: int = 0
                     ) -> grain.DatasetIterator:
    """This host's training batches; `get_state`/`set_state` resume exactly; `worker_count`
    grain worker processes decode them (`to_iterator`), giving the same batches."""
    return to_iterator(self.train_dataset(global_batch_size=global_batch_size,
                                          process_index=process_index,
                                          process_count=process_count, num_epochs=num_epochs),
                       num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size,
                       worker_count=worker_count)

  def val_iterator(self, *, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
    """Full training-layout batches of the held-out samples, in order, unaugmented."""
    ds = table_batches(self._check_held_out(global_batch_size), self.transform(train=False),
                       batch_size=global_batch_size,
                       process_index=process_index, process_count=process_count, pad=False)
    return to_iterator(ds, num_threads=2, prefetch_buffer_size=2)

  def eval_batches(self, *, batch_size: int, process_index: int = 0, process_count: int = 1
                   ) -> grain.DatasetIterator:
    """One padded pass over the held-out samples (`valid` flags real rows)."""
    return to_iterator(table_batches(self._check_held_out(1), self.transform(train=False),
                                     batch_size=batch_size, process_index=process_index,
                                     process_count=process_count, pad=True),
                       num_threads=2, prefetch_buffer_size=2)
