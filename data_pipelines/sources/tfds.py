"""tensorflow-datasets builds with `file_format="array_record"`, read by random access through
`tfds.data_source` (no TensorFlow needed). The image feature is read undecoded (its encoded
bytes, `tfds.decode.SkipDecoding`), so every source feeds the same per-example transform.

tfds stores no per-example key, so a record is keyed by `<split>/<index>`: stable for a given
build of the dataset.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

from data_pipelines.sources import spec as spec_lib


class TfdsRecords:
  """Random access to a tfds split: `read(indices)` → [{image, caption, key} | BadRecordError].

  Args:
    spec: a parsed `tfds:` spec.
    image_field, caption_field: feature names of the encoded image and the caption text.
  """

  def __init__(self, spec: spec_lib.SourceSpec, *, image_field: str = "image",
               caption_field: str = "caption"):
    self.spec = spec
    self.image_field, self.caption_field = image_field, caption_field
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
    for what, name in (("data.image_field", image_field), ("data.caption_field", caption_field)):
      if name not in names:
        raise spec_lib.SourceConfigError(f"data source {spec}: no feature {name!r} (config key "
                                         f"{what}); the dataset has features {names}")
    self.path = str(builder.data_dir)
    self._num_records = int(info.splits[spec.split].num_examples)
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
          self._source = self._builder().as_data_source(
              split=self.spec.split, decoders={self.image_field: tfds.decode.SkipDecoding()})
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
      if isinstance(row, Exception):
        out.append(spec_lib.BadRecordError(path=self.path, key=key, position=i, field="<record>",
                                           reason=f"{type(row).__name__}: {row}",
                                           split=self.spec.split))
        continue
      image, caption = row.get(self.image_field), row.get(self.caption_field)
      if isinstance(caption, bytes):
        try:
          caption = caption.decode("utf-8")
        except UnicodeDecodeError as e:
          caption = spec_lib.BadRecordError(path=self.path, key=key, position=i,
                                            field=self.caption_field, reason=f"not UTF-8 ({e})",
                                            split=self.spec.split)
      if isinstance(caption, spec_lib.BadRecordError):
        out.append(caption)
      elif not isinstance(image, (bytes, bytearray)) or not image:
        out.append(spec_lib.BadRecordError(
            path=self.path, key=key, position=i, field=self.image_field,
            reason=f"expected encoded image bytes, found {type(image).__name__}",
            split=self.spec.split))
      elif not isinstance(caption, str):
        out.append(spec_lib.BadRecordError(
            path=self.path, key=key, position=i, field=self.caption_field,
            reason=f"expected text, found {type(caption).__name__}", split=self.spec.split))
      else:
        out.append({"image": bytes(image), "caption": caption.strip(), "key": key})
    return out
