"""SASRec's interaction format: one `user item` pair per line (both 1-based integers), each
user's lines in chronological order (e.g. `kang205/SASRec data/Video.txt`, `ml-1m.txt`).

Users keep their order of first appearance and their items keep file order, as SASRec's own
loader does. Item index = the file's item number, so `num_items` = the largest item number.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from data_pipelines.converters import common
from data_pipelines.converters import interactions


def read(path: str | os.PathLike) -> interactions.InteractionData:
  path = common.require_file(path, "a SASRec `user item` file")
  users: dict[str, list[int]] = {}
  with common.open_text(path, "utf-8") as fp:
    for line_no, line in enumerate(fp, 1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2:
        raise common.ConversionError(path, line_no, None,
                                     f"expected 'user item' (2 integers), found {line.strip()!r}")
      common.parse_int(parts[0], path, line_no, "user")
      item = common.parse_int(parts[1], path, line_no, "item")
      if item < 1:
        raise common.ConversionError(path, line_no, "item", f"item ids start at 1, found {item}")
      users.setdefault(parts[0], []).append(item)
  if not users:
    raise common.ConversionError(path, None, None, "no interactions")
  num_items = max(max(s) for s in users.values())
  return interactions.InteractionData(
      user_ids=list(users), sequences=[np.asarray(s, np.int32) for s in users.values()],
      item_ids=[str(i) for i in range(1, num_items + 1)])


def convert(input: str | os.PathLike, output: str | os.PathLike, *, split_by: str | None = None,
            num_shards: int = 4, **unused: Any) -> dict[str, Any]:
  """`--format sasrec`: INPUT is the `user item` text file."""
  common.parse_split_by(split_by, "leave-one-out")
  source = {"converter": "sasrec", "input": str(input), "num_shards": num_shards,
            "inputs": common.input_digest([input])}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  return interactions.write_interactions(output, read(input), source=source,
                                         num_shards=num_shards)
