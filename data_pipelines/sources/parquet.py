"""Parquet tables with encoded image bytes (Hugging Face dataset exports and the like), read as
a stream, one row group at a time.

The image column holds the encoded file (binary), or a struct with a `bytes` field (the Hugging
Face `Image` feature); the caption column holds strings; the key column (optional) identifies the
row, else the key is `<file name>/<row>`. Other tasks read other columns (`columns.Column`).
Column names come from config keys; a wrong one is reported with the file, the config key and the
columns the file has.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

from data_pipelines.sources import columns as columns_lib
from data_pipelines.sources import spec as spec_lib


class ParquetShards:
  """Reads rows {<column field>: value, ..., key: str} of parquet files, from any row.

  Args:
    files: the parquet paths in their natural (sorted) order.
    image_column, caption_column: column names of the image–text default ({image: bytes,
      caption: str, key} rows), when `columns` is not given.
    columns: what to read (`columns.Column`; the first of its names the file has is read).
    key_column: '' = the column `key` when the first file has one (img2dataset writes it), else
      `<file name>/<row>`.
  """

  def __init__(self, files: Sequence[str], *, image_column: str = "image",
               caption_column: str = "caption", key_column: str = "",
               columns: Sequence[columns_lib.Column] | None = None):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (optional dependency)
    self._pq = pq
    self.files = list(files)
    self.columns = tuple(columns) if columns is not None else (
        columns_lib.Column("image", (image_column,), "image", "data.image_field"),
        columns_lib.Column("caption", (caption_column,), "text", "data.caption_field"))
    self.key_column = key_column
    if not key_column and "key" in self._names(self.files[0]):
      self.key_column = "key"
    self._chosen = self._check_columns(self.files[0])

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

  def _names(self, path: str) -> list[str]:
    try:
      return self._pq.ParquetFile(path).schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on damaged files
      raise spec_lib.BadRecordError(path=path, key="", position=0, field="<file>",
                                    reason=f"cannot read as parquet ({type(e).__name__}: {e})"
                                    ) from None

  def _check_columns(self, path: str) -> dict[str, str]:
    """{field: the column of `path` that holds it}; SourceConfigError for a missing one."""
    names = self._names(path)
    chosen = columns_lib.match(self.columns, names, path, "column", "the file")
    if self.key_column and self.key_column not in names:
      raise spec_lib.SourceConfigError(f"{path}: no column {self.key_column!r} (config key "
                                       f"data.key_field); the file has columns {names}")
    return chosen

  def read(self, shard: int, start: int = 0, keep: Callable[[str], bool] | None = None
           ) -> Iterator[tuple[int, dict | spec_lib.BadRecordError]]:
    """(row, sample or BadRecordError) for the rows of file `shard` from row `start` on (only
    the rows whose key `keep` accepts, when given)."""
    path = self.files[shard]
    base = os.path.basename(path)
    try:
      f = self._pq.ParquetFile(path)
      chosen = self._check_columns(path) if shard else self._chosen
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
    wanted = list(dict.fromkeys(list(chosen.values()) + ([self.key_column] if self.key_column
                                                         else [])))
    for g, first in groups:
      try:
        table = f.read_row_group(g, columns=wanted)
        values = {field: table.column(name).to_pylist() for field, name in chosen.items()}
        keys = table.column(self.key_column).to_pylist() if self.key_column else None
      except Exception as e:
        yield max(first, start), spec_lib.BadRecordError(
            path=path, key="", position=max(first, start), field="<row group>",
            reason=f"row group {g} unreadable ({type(e).__name__}: {e})")
        return
      for i in range(max(0, start - first), table.num_rows):
        row = first + i
        key = str(keys[i]) if keys is not None and keys[i] is not None else f"{base}/{row}"
        if keep is not None and not keep(key):
          continue
        sample, bad = {}, None
        for col in self.columns:
          value, why = columns_lib.convert(col, values[col.field][i])
          if why:
            bad = spec_lib.BadRecordError(path=path, key=key, position=row,
                                          field=chosen[col.field], reason=why)
            break
          sample[col.field] = value
        if bad is not None:
          yield row, bad
          continue
        sample["key"] = key
        yield row, sample
