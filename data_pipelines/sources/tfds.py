"""tensorflow-datasets builds with `file_format="array_record"`, read by random access through
`tfds.data_source` (no TensorFlow needed). The image feature is read undecoded (its encoded
bytes, `tfds.decode.SkipDecoding`), so every source feeds the same per-example transform.

tfds stores no per-example key, so a record is keyed by `<split>/<index>`: stable for a given
build of the dataset.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from data_pipelines.sources import columns as columns_lib
from data_pipelines.sources import spec as spec_lib


class TfdsRecords:
  """Random access to a tfds split: `read(indices)` → [{<column field>: value, ..., key} |
  BadRecordError].

  Args:
    spec: a parsed `tfds:` spec.
    image_field, caption_field: feature names of the encoded image and the caption text of the
      image–text default ({image, caption, key} records), when `columns` is not given.
    columns: what to read (`columns.Column`; the first of its names the build has is read).
  """

  def __init__(self, spec: spec_lib.SourceSpec, *, image_field: str = "image",
               caption_field: str = "caption",
               columns: Sequence[columns_lib.Column] | None = None):
    self.spec = spec
    self.columns = tuple(columns) if columns is not None else (
        columns_lib.Column("image", (image_field,), "image", "data.image_field"),
        columns_lib.Column("caption", (caption_field,), "text", "data.caption_field"))
    if not os.path.isdir(spec.location):
      raise FileNotFoundError(f"data source {spec}: tfds data_dir {spec.location} does not exist")
    builder = self._builder()
    info = builder.info
    file_format = str(getattr(info.file_format, "value", info.file_format))
    if file_format != "array_record":
      raise spec_lib.SourceConfigError(
          f"data source {spec}: the build is in {file_format}, random access needs "
          "file_format='array_record' (prepare it with download_and_prepare(file_format="
          "'array_record') or `tfds build --file_format=array_record`)")
    if spec.split not in info.splits:
      raise spec_lib.SourceConfigError(f"data source {spec}: no split {spec.split!r} (splits: "
                                       f"{sorted(info.splits)})")
    names = sorted(info.features.keys())
    self._chosen = columns_lib.match(self.columns, names, f"data source {spec}", "feature",
                                     "the dataset")
    self.path = str(builder.data_dir)
    self._num_records = int(info.splits[spec.split].num_examples)
    self.shard_lengths = [int(n) for n in info.splits[spec.split].shard_lengths]
    self._init_runtime()

  def _builder(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name = self.spec.name + (f"/{self.spec.config}" if self.spec.config else "")
    try:
      return tfds.builder(name, data_dir=self.spec.location)
    except Exception as e:  # tfds raises DatasetNotFoundError and others
      raise FileNotFoundError(f"data source {self.spec}: no tfds build of {name!r} in "
                              f"{self.spec.location} ({type(e).__name__}: {e})") from None

  def _init_runtime(self) -> None:
    self._source = None
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    del state["_source"], state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._init_runtime()

  def __repr__(self) -> str:
    return f"TfdsRecords({self.spec})"

  def __len__(self) -> int:
    return self._num_records

  def _data_source(self):
    if self._source is None:
      with self._lock:
        if self._source is None:
          import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
          images = [self._chosen[c.field] for c in self.columns if c.kind == "image"]
          self._source = self._builder().as_data_source(
              split=self.spec.split, decoders={n: tfds.decode.SkipDecoding() for n in images})
    return self._source

  def key(self, index: int) -> str:
    return f"{self.spec.split}/{int(index)}"

  def read(self, indices: Sequence[int]) -> list[dict | spec_lib.BadRecordError]:
    """The records at `indices` (split positions), in that order."""
    source = self._data_source()
    indices = [int(i) for i in indices]
    try:
      rows = source.__getitems__(indices)
    except Exception:  # locate the bad record(s): one batched read fails as a whole
      rows = []
      for i in indices:
        try:
          rows.append(source[i])
        except Exception as e:
          rows.append(e)
    out: list[dict | spec_lib.BadRecordError] = []
    for i, row in zip(indices, rows):
      key = self.key(i)
      bad = lambda field, reason: spec_lib.BadRecordError(  # noqa: E731
          path=self.path, key=key, position=i, field=field, reason=reason, split=self.spec.split)
      if isinstance(row, Exception):
        out.append(bad("<record>", f"{type(row).__name__}: {row}"))
        continue
      record: dict | spec_lib.BadRecordError = {}
      for col in self.columns:
        value, why = columns_lib.convert(col, row.get(self._chosen[col.field]))
        if why:
          record = bad(self._chosen[col.field], why)
          break
        record[col.field] = value
      if isinstance(record, dict):
        record["key"] = key
      out.append(record)
    return out


class TfdsShards:
  """A tfds split read as a stream (`stream.ShardReader`): its ArrayRecord shard files are the
  shards, each read in order from any position (random access, 256 records at a time), so a
  tfds build follows the same order contract, resume and worker rules as webdataset and parquet.

  Args:
    records: the split (`TfdsRecords`).
  """

  def __init__(self, records: TfdsRecords):
    self.records = records
    self.files = [f"{records.path}/{records.spec.split}-shard-{i:05d}"
                  for i in range(len(records.shard_lengths))]
    self._starts = np.concatenate([[0], np.cumsum(records.shard_lengths)]).astype(np.int64)

  def __repr__(self) -> str:
    return f"TfdsShards({self.records.spec}, {len(self.files)} shards)"

  def read(self, shard: int, start: int = 0, keep: Callable[[str], bool] | None = None
           ) -> Iterator[tuple[int, dict | spec_lib.BadRecordError]]:
    """(position in the shard, record or BadRecordError) from `start` on (records whose key
    `keep` rejects are not read)."""
    first, end = int(self._starts[shard]), int(self._starts[shard + 1])
    wanted = [i for i in range(first + start, end)
              if keep is None or keep(self.records.key(i))]
    for chunk in range(0, len(wanted), 256):
      indices = wanted[chunk:chunk + 256]
      for i, record in zip(indices, self.records.read(indices)):
        yield i - first, record
