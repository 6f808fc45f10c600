"""Amazon review dumps (McAuley lab, 2014 and 2018 releases) with item metadata.

Reviews: JSON Lines with `reviewerID`, `asin`, `unixReviewTime` (the 5-core/review files), or a
CSV of `item,user,rating,timestamp` (the 2018 "ratings only" files; no header, or a header with
those names). Metadata (optional): JSON Lines with `asin` and any of `title`, `category` (2018,
list of str) / `categories` (2014, list of lists), `brand`; the 2014 files hold Python dict
literals rather than JSON, which are read with `ast.literal_eval`.

Each review is an implicit interaction; each user's items are sorted by time (ties keep file
order). `k_core` >= 2 iteratively drops users and items with fewer interactions (5 gives the
usual "5-core"). Item text = "title. categories. brand" (UniSRec's recipe). With metadata, an
item it does not describe gets empty text (counted in `stats.items_without_metadata`).
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
from typing import Any

from data_pipelines.converters import common
from data_pipelines.converters import interactions


def _reviews(path: pathlib.Path):
  """(line, user, asin, time) of a reviews JSONL or ratings CSV file."""
  if path.suffix in (".json", ".jsonl"):
    for line_no, obj in common.read_jsonl(path):
      user = common.get_field(obj, "reviewerID", path, line_no)
      asin = common.get_field(obj, "asin", path, line_no)
      t = common.get_field(obj, "unixReviewTime", path, line_no)
      yield line_no, str(user), str(asin), common.parse_float(t, path, line_no, "unixReviewTime")
    return
  with common.open_text(path, "utf-8") as fp:
    for line_no, line in enumerate(fp, 1):
      cells = [c.strip() for c in line.rstrip("\r\n").split(",")]
      if not line.strip():
        continue
      if line_no == 1 and cells[:2] == ["item", "user"]:
        continue
      if len(cells) != 4:
        raise common.ConversionError(path, line_no, None,
                                     f"expected item,user,rating,timestamp, found {len(cells)} cells")
      yield line_no, cells[1], cells[0], common.parse_float(cells[3], path, line_no, "timestamp")


def _meta_text(obj: dict[str, Any]) -> str:
  title = str(obj.get("title", "") or "").strip()
  cats = obj.get("category", obj.get("categories", []))
  flat: list[str] = []
  for c in cats if isinstance(cats, list) else []:
    for x in c if isinstance(c, list) else [c]:
      if isinstance(x, str) and x.strip() and x.strip() not in flat:
        flat.append(x.strip())
  brand = str(obj.get("brand", "") or "").strip()
  return ". ".join(p for p in (title, " ".join(flat), brand) if p)


def _metadata(path: pathlib.Path) -> dict[str, str]:
  out: dict[str, str] = {}
  with common.open_text(path, "utf-8") as fp:
    for line_no, line in enumerate(fp, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        try:
          obj = ast.literal_eval(line)
        except (ValueError, SyntaxError) as e:
          raise common.ConversionError(path, line_no, None,
                                       f"neither JSON nor a Python dict literal ({e})") from None
      if not isinstance(obj, dict):
        raise common.ConversionError(path, line_no, None, "expected an object")
      asin = common.get_field(obj, "asin", path, line_no)
      out[str(asin)] = _meta_text(obj)
  return out


def read(reviews: str | os.PathLike, metadata: str | os.PathLike | None = None, *,
         k_core: int = 0) -> tuple[interactions.InteractionData, int]:
  """Returns the data and the number of items without metadata."""
  reviews = common.require_file(reviews, "an Amazon reviews file")
  vocab = interactions.ItemVocabulary()
  rows = [(user, vocab.add(asin), t, line_no) for line_no, user, asin, t in _reviews(reviews)]
  if not rows:
    raise common.ConversionError(reviews, None, None, "no reviews")
  users, seqs = interactions.k_core(*interactions.group_by_user(rows), k_core)
  texts, missing = None, 0
  if metadata is not None:
    table = _metadata(common.require_file(metadata, "an Amazon metadata file"))
    texts = [table.get(a, "") for a in vocab.ids]
  data = interactions.reindex(users, seqs, vocab.ids, texts, None)
  if data.item_text is not None:
    missing = sum(1 for a in data.item_ids if a not in table)
  return data, missing


def convert(input: str | os.PathLike, output: str | os.PathLike, *, split_by: str | None = None,
            num_shards: int = 4, metadata: str | None = None, k_core: int = 0,
            **unused: Any) -> dict[str, Any]:
  """`--format amazon`: INPUT is the reviews file; `--metadata` the item metadata file."""
  common.parse_split_by(split_by, "leave-one-out")
  inputs = [input] + ([metadata] if metadata else [])
  source = {"converter": "amazon", "input": str(input), "num_shards": num_shards,
            "k_core": k_core, "inputs": common.input_digest(inputs)}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  data, missing = read(input, metadata, k_core=k_core)
  meta = interactions.write_interactions(output, data, source=source, num_shards=num_shards,
                                         extra={"items_without_metadata": missing})
  return meta
