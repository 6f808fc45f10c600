"""S3-Rec's interaction format: one line per user, `user item_1 ... item_n` (space-separated
integers, oldest first), plus an optional `{name}_item2attributes.json` = `{"item": [attr, ...]}`
(e.g. `aHuiWang/CIKM2020-S3Rec data/Beauty.txt`).

Item index = the file's item number. Attribute ids are kept as given.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from data_pipelines.converters import common
from data_pipelines.converters import interactions


def default_attributes_path(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  return path.with_name(f"{path.stem}_item2attributes.json")


def read(path: str | os.PathLike, attributes: str | os.PathLike | None = None
         ) -> interactions.InteractionData:
  """Reads the sequences file and (when it exists) the item → attributes JSON."""
  path = common.require_file(path, "an S3-Rec one-line-per-user file")
  user_ids, seqs = [], []
  seen = set()
  with common.open_text(path, "utf-8") as fp:
    for line_no, line in enumerate(fp, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) < 2:
        raise common.ConversionError(path, line_no, None,
                                     f"expected 'user item_1 ... item_n', found {line.strip()!r}")
      if parts[0] in seen:
        raise common.ConversionError(path, line_no, "user", f"user {parts[0]} appears twice")
      seen.add(parts[0])
      common.parse_int(parts[0], path, line_no, "user")
      items = [common.parse_int(p, path, line_no, f"item {k + 1}") for k, p in
               enumerate(parts[1:])]
      if min(items) < 1:
        raise common.ConversionError(path, line_no, "items", "item ids start at 1")
      user_ids.append(parts[0])
      seqs.append(np.asarray(items, np.int32))
  if not seqs:
    raise common.ConversionError(path, None, None, "no users")
  num_items = int(max(s.max() for s in seqs))
  attrs = None
  attr_path = pathlib.Path(attributes) if attributes else default_attributes_path(path)
  if attributes is not None or attr_path.is_file():
    common.require_file(attr_path, "an item2attributes JSON file")
    try:
      table = json.loads(common.read_text(attr_path))
    except json.JSONDecodeError as e:
      raise common.ConversionError(attr_path, None, None, f"not valid JSON ({e})") from None
    if not isinstance(table, dict):
      raise common.ConversionError(attr_path, None, None, "expected a JSON object item → list")
    attrs = [[] for _ in range(num_items)]
    for key, values in table.items():
      item = common.parse_int(key, attr_path, f"item {key!r}", "item id")
      if not 1 <= item <= num_items:
        raise common.ConversionError(attr_path, f"item {key!r}", "item id",
                                     f"unknown item id {item}: the sequences use 1..{num_items}")
      if not isinstance(values, list) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise common.ConversionError(attr_path, f"item {key!r}", "attributes",
                                     f"expected a list of non-negative ints, found {values!r}")
      attrs[item - 1] = values
  return interactions.InteractionData(user_ids=user_ids, sequences=seqs,
                                      item_ids=[str(i) for i in range(1, num_items + 1)],
                                      item_attributes=attrs)


def convert(input: str | os.PathLike, output: str | os.PathLike, *, split_by: str | None = None,
            num_shards: int = 4, attributes: str | None = None, **unused: Any) -> dict[str, Any]:
  """`--format s3rec`: INPUT is the sequences file; `--attributes` defaults to
  `{stem}_item2attributes.json` beside it (used when present)."""
  common.parse_split_by(split_by, "leave-one-out")
  attr_path = pathlib.Path(attributes) if attributes else default_attributes_path(input)
  inputs = [input] + ([attr_path] if attr_path.is_file() else [])
  source = {"converter": "s3rec", "input": str(input), "num_shards": num_shards,
            "inputs": common.input_digest(inputs)}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  data = read(input, attributes)
  return interactions.write_interactions(output, data, source=source, num_shards=num_shards)
