"""Marqo-GS-10M (and files of the same columns) → `query_document` dataset.

Columns: `query`, `query_id`, `product_id`, `title`, `position`, `score_linear`,
`score_reciprocal`, and an image column (`image_column`, default: the first of `image_local`,
`image_path`, `image` present). An image cell is a path (relative to `image_root`; the image is
embedded when `image_root` is given, else only the path is kept) or, in the Hugging Face parquet
files, a struct `{"bytes", "path"}` whose bytes are embedded.

INPUT: a folder holding one file (or several `{split}-*.parquet` / `{split}_*.csv` parts) per
split — the split names are the file names' stems up to the first '-' or '_' that is followed by
digits (in_domain, novel_document, novel_query, zero_shot) — or one CSV/parquet file, whose rows go
to "train" unless `split_by` is 'column:NAME'. Parquet is read with `pyarrow` (batch by batch).
Tokenizer: BPE trained on the queries and titles of the first split in sorted order (or
"in_domain"/"train" when present), stored as tokenizer.json.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Any, Iterator

import numpy as np

from data_pipelines import schemas
from data_pipelines.converters import common
from data_pipelines.converters import image_captions

_LOG = logging.getLogger(__name__)
REQUIRED = ("query", "query_id", "product_id", "title", "position", "score_linear",
            "score_reciprocal")
IMAGE_COLUMNS = ("image_local", "image_path", "image")
_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")


def _iter_file(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
  if path.suffix == ".parquet":
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow); CSV works "
                        f"without it") from None
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
      for rec in batch.to_pylist():
        row += 1
        yield row, rec
  else:
    yield from common.read_rows(path)


def split_files(input: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  if input.is_file():
    return {"": [input]}
  out: dict[str, list[pathlib.Path]] = {}
  for p in sorted(input.iterdir()):
    if p.suffix not in _SUFFIXES or p.name.startswith("."):
      continue
    name = re.sub(r"[-_]\d+(-of-\d+)?$", "", p.stem)
    out.setdefault(name, []).append(p)
  if not out:
    raise FileNotFoundError(f"no {'/'.join(_SUFFIXES)} files in {input}")
  return out


def convert(input: str | os.PathLike, output: str | os.PathLike, *, split_by: str | None = None,
            num_shards: int = 4, image_root: str | None = None, image_column: str | None = None,
            vocab_size: int = 8192, skip_bad_records: bool = False,
            **unused: Any) -> dict[str, Any]:
  """`--format marqo-gs`: INPUT is the folder of split files or one CSV/parquet file."""
  input = pathlib.Path(input)
  if not input.exists():
    raise FileNotFoundError(f"expected a Marqo-GS folder or file at {input}")
  mode, arg = common.parse_split_by(split_by, "none")
  if mode not in ("none", "column"):
    raise ValueError(f"--split-by {split_by!r}: Marqo-GS keeps its own splits; use 'none' or "
                     f"'column:NAME'")
  files = split_files(input)
  all_files = [p for ps in files.values() for p in ps]
  root = pathlib.Path(image_root) if image_root else None
  source = {"converter": "marqo-gs", "input": str(input), "image_root": image_root,
            "image_column": image_column, "split_by": split_by, "vocab_size": vocab_size,
            "num_shards": num_shards, "skip_bad_records": skip_bad_records,
            "inputs": common.input_digest(all_files)}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  rows: dict[str, list[dict[str, Any]]] = {}
  skipped: list[dict[str, Any]] = []
  with_images = root is not None
  for split_name, paths in files.items():
    for path in paths:
      for row_no, row in _iter_file(path):
        col = image_column or next((c for c in IMAGE_COLUMNS if c in row), None)
        rec: dict[str, Any] = {}
        for name in REQUIRED:
          value = common.get_field(row, name, path, row_no)
          if name == "position":
            value = common.parse_int(value, path, row_no, name)
          elif name.startswith("score"):
            value = common.parse_float(value, path, row_no, name)
          else:
            value = "" if value is None else str(value)
          rec[name] = value
        image = row.get(col) if col else None
        image_bytes, reason = None, ""
        if isinstance(image, dict):  # Hugging Face Image feature: {"bytes", "path"}
          rec["image_path"] = str(image.get("path") or "")
          image_bytes = image.get("bytes")
          if image_bytes is None:
            reason = "image struct has no bytes"
          else:
            reason = image_captions.check_image(image_bytes)
          with_images = True
        else:
          rec["image_path"] = "" if image is None else str(image)
          if root is not None:
            if not rec["image_path"]:
              reason = f"no image path in column {col!r}"
            else:
              image_bytes, reason = image_captions.read_bad_or_bytes(root / rec["image_path"])
        if reason:
          if not skip_bad_records:
            raise common.ConversionError(path, row_no, col or "image", reason)
          _LOG.warning("skipping %s row %d (field %r): %s", path, row_no, col, reason)
          skipped.append({"file": str(path), "row": row_no, "field": col, "reason": reason})
          continue
        rec["image"] = image_bytes
        split = split_name or "train"
        if mode == "column":
          split = str(common.get_field(row, arg, path, row_no)).strip()
        rows.setdefault(split, []).append(rec)
  if not rows:
    raise common.ConversionError(input, None, None, "no rows")
  tok_split = next((s for s in ("in_domain", "train") if s in rows), sorted(rows)[0])
  tok = common.train_tokenizer(
      (t for r in rows[tok_split] for t in (r["query"], r["title"])), vocab_size)
  fields = schemas.query_document_schema(with_images=with_images)

  def examples(split: str):
    chunk = 1024
    data = rows[split]
    for start in range(0, len(data), chunk):
      part = data[start:start + chunk]
      q_ids = tok.encode_unpadded([r["query"] for r in part])
      t_ids = tok.encode_unpadded([r["title"] for r in part])
      for r, q, t in zip(part, q_ids, t_ids):
        yield dict(r, query_ids=np.asarray(q, np.int32), title_ids=np.asarray(t, np.int32))

  splits = {s: common.SplitSpec(fields, examples(s), len(rows[s])) for s in sorted(rows)}
  return common.write_dataset(
      output, kind=schemas.QUERY_DOCUMENT, schema=fields, splits=splits, source=source,
      num_shards=num_shards, tokenizer=tok,
      extra={"has_images": with_images,
             "num_queries": {s: len({r["query_id"] for r in v}) for s, v in rows.items()},
             "skipped": {"count": len(skipped), "examples": skipped[:20]}})
