"""Parquet tables with encoded image bytes (Hugging Face dataset exports and the like), read as
a stream, one row group at a time.

The image column holds the encoded file (binary), or a struct with a `bytes` field (the Hugging
Face `Image` feature); the caption column holds strings; the key column (optional) identifies the
row, else the key is `<file name>/<row>`. Column names come from config keys; a wrong one is
reported with the file and the columns it has.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

from data_pipelines.sources import spec as spec_lib


class ParquetShards:
  """Reads rows {image: bytes, caption: str, key: str} of parquet files, from any row.

  Args:
    files: the parquet paths in their natural (sorted) order.
    image_column, caption_column: column names; key_column: '' = the column `key` when the
      first file has one (img2dataset writes it), else `<file name>/<row>`.
  """

  def __init__(self, files: Sequence[str], *, image_column: str = "image",
               caption_column: str = "caption", key_column: str = ""):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (optional dependency)
    self._pq = pq
    self.files = list(files)
    self.image_column, self.caption_column, self.key_column = (image_column, caption_column,
                                                               key_column)
    if not key_column and "key" in self._names(self.files[0]):
      self.key_column = "key"
    self._check_columns(self.files[0])

  def __repr__(self) -> str:
    return f"ParquetShards({len(self.files)} files from {self.files[0]!r})"

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_pq"]
    return state

  def __setstate__(self, state):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.__dict__.update(state)
    self._pq = pq

  def _columns(self) -> list[str]:
    return [c for c in (self.image_column, self.caption_column, self.key_column) if c]

  def _names(self, path: str) -> list[str]:
    try:
      return self._pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
      raise spec_lib.BadRecordError(path=path, key="", position=0, field="<file>",
                                    reason=f"cannot read as parquet ({type(e).__name__}: {e})"
                                    ) from None

  def _check_columns(self, path: str) -> None:
    names = self._names(path)
    for what, column in (("data.image_field", self.image_column),
                         ("data.caption_field", self.caption_column),
                         ("data.key_field", self.key_column)):
      if column and column not in names:
        raise spec_lib.SourceConfigError(f"{path}: no column {column!r} (config key {what}); "
                                         f"the file has columns {names}")

  def read(self, shard: int, start: int = 0, keep: Callable[[str], bool] | None = None
           ) -> Iterator[tuple[int, dict | spec_lib.BadRecordError]]:
    """(row, sample or BadRecordError) for the rows of file `shard` from row `start` on (only
    the rows whose key `keep` accepts, when given)."""
    path = self.files[shard]
    base = os.path.basename(path)
    try:
      f = self._pq.ParquetFile(path)
      if shard:
        self._check_columns(path)
      row0 = 0
      groups = []
      for g in range(f.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if row0 + n > start:
          groups.append((g, row0))
        row0 += n
    except spec_lib.SourceConfigError:
      raise
    except Exception as e:
      yield start, spec_lib.BadRecordError(path=path, key="", position=start, field="<file>",
                                           reason=f"cannot read as parquet ({type(e).__name__}: {e})")
      return
    for g, first in groups:
      try:
        table = f.read_row_group(g, columns=self._columns())
        images = table.column(self.image_column).to_pylist()
        captions = table.column(self.caption_column).to_pylist()
        keys = table.column(self.key_column).to_pylist() if self.key_column else None
      except Exception as e:
        yield max(first, start), spec_lib.BadRecordError(
            path=path, key="", position=max(first, start), field="<row group>",
            reason=f"row group {g} unreadable ({type(e).__name__}: {e})")
        return
      for i in range(max(0, start - first), len(images)):
        row = first + i
        key = str(keys[i]) if keys is not None and keys[i] is not None else f"{base}/{row}"
        if keep is not None and not keep(key):
          continue
        image = images[i]
        if isinstance(image, dict):
          image = image.get("bytes")
        if not isinstance(image, (bytes, bytearray)) or not image:
          yield row, spec_lib.BadRecordError(
              path=path, key=key, position=row, field=self.image_column,
              reason=f"expected encoded image bytes, found {type(image).__name__}")
          continue
        caption = captions[i]
        if not isinstance(caption, str):
          yield row, spec_lib.BadRecordError(
              path=path, key=key, position=row, field=self.caption_column,
              reason=f"expected a string, found {type(caption).__name__}")
          continue
        yield row, {"image": bytes(image), "caption": caption.strip(), "key": key}
