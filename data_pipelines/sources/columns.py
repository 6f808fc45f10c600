"""What a reader takes from each record of a source: named columns with a kind.

A `Column` maps a field of the records a task reads (`field`) to the member, column or feature
that holds it in the source (`names`, tried in order) and says how its value is checked:

  image  encoded image bytes (a parquet struct with a `bytes` field, the Hugging Face `Image`
         feature, is unwrapped);
  text   a string (UTF-8 bytes are decoded; surrounding white space is stripped);
  int    an integer (webdataset text members and JSON numbers are parsed);
  float  a number.

Every reader (`webdataset`, `parquet`, `tfds`) yields records {field: value, ..., key: str}; a
value of the wrong kind or a missing member is a `spec.BadRecordError` naming the file, the
record and the source's field name, a column missing from a parquet file or a tfds build a
`spec.SourceConfigError` naming the config key (`config_key`) that named it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

from data_pipelines.sources import spec as spec_lib

KINDS = ("image", "text", "int", "float")


@dataclasses.dataclass(frozen=True)
class Column:
  """field: key in the records read; names: the source's names for it (tried in order);
  kind: one of KINDS; config_key: the config key that names it (for error messages)."""
  field: str
  names: tuple[str, ...]
  kind: str
  config_key: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"column {self.field!r}: kind must be one of {KINDS}, got {self.kind!r}")
    if not self.names or not all(self.names):
      raise ValueError(f"column {self.field!r}: needs at least one non-empty name, got "
                       f"{self.names!r}")

  @property
  def label(self) -> str:
    """How errors name the field in the source ('jpg/jpeg/png' for alternatives)."""
    return "/".join(self.names)


def columns(spec: Sequence[tuple[str, str, str, str]]) -> tuple[Column, ...]:
  """Columns from (field, names separated by ';', kind, config_key) tuples."""
  return tuple(Column(f, tuple(n for n in names.split(";") if n), kind, key)
               for f, names, kind, key in spec)


def match(columns_: Sequence[Column], names: Sequence[str], where: str, noun: str,
          holder: str) -> dict[str, str]:
  """{field: the first of its column's names found in `names`}, or SourceConfigError naming the
  missing one, e.g. "<where>: no column 'caption' (config key data.caption_field); <holder> has
  columns [...]" (noun "column", holder "the file")."""
  chosen = {}
  for col in columns_:
    found = next((n for n in col.names if n in names), None)
    if found is None:
      shown = col.names[0] if len(col.names) == 1 else f"any of {list(col.names)}"
      raise spec_lib.SourceConfigError(f"{where}: no {noun} {shown!r} (config key "
                                       f"{col.config_key or col.field}); {holder} has {noun}s "
                                       f"{list(names)}")
    chosen[col.field] = found
  return chosen


def convert(column: Column, value: Any) -> tuple[Any, str]:
  """(value as the column's kind, '') or (None, why it is not of that kind)."""
  kind = column.kind
  if kind == "image":
    if isinstance(value, dict):
      value = value.get("bytes")
    if isinstance(value, (bytes, bytearray)) and value:
      return bytes(value), ""
    return None, f"expected encoded image bytes, found {type(value).__name__}"
  if isinstance(value, (bytes, bytearray)) and kind != "image":
    try:
      value = bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      return None, f"not UTF-8 ({e})"
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
    value = value.item()
    if isinstance(value, bytes):
      return convert(column, value)
  if kind == "text":
    if isinstance(value, str):
      return value.strip(), ""
    return None, f"expected a string, found {type(value).__name__}"
  if isinstance(value, str):  # webdataset text members hold numbers as text
    try:
      value = json.loads(value.strip())
    except ValueError:
      return None, f"expected a number, found the text {value.strip()[:40]!r}"
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None, f"expected a number, found {type(value).__name__}"
  if kind == "int":
    if isinstance(value, float) and not value.is_integer():
      return None, f"expected an integer, found {value!r}"
    return int(value), ""
  if not math.isfinite(float(value)):
    return None, f"expected a finite number, found {value!r}"
  return float(value), ""
