"""Image folder + captions file (CSV/TSV with a header, or JSON Lines) → `image_text` dataset.

Each row names an image file (`image_column`, a path relative to `image_root`, which defaults to
the captions file's folder) and its caption (`caption_column`); `id_column` (default: the image
path) identifies the row. The encoded file is stored as is (no re-encoding: no quality loss, and
the pipeline crops while decoding). Every image is fully decoded once during conversion, so a
truncated or unreadable file is reported (file, line, field) or, with `skip_bad_records`,
logged, skipped and counted in `metadata["skipped"]`.

Splits (`split_by`): 'none' (all rows in "train"), 'holdout:F' (a stable hash of the row id sends
a fraction F to "test"), or 'column:NAME' (the column's value is the split name). The caption
tokenizer (BPE) is trained on the "train" captions (all captions when there is no "train").
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import numpy as np

from data_pipelines import image_ops
from data_pipelines import records
from data_pipelines import schemas
from data_pipelines.converters import common

_LOG = logging.getLogger(__name__)


def check_image(data: bytes) -> str:
  """'' when `data` is a decodable JPEG/PNG/WebP, else why not."""
  reason = records.check_magic(data, "image_bytes")
  if reason:
    return reason
  try:
    im = image_ops.open_image(data)
    if min(im.size) < 1:
      return f"empty image {im.size}"
    # Decoding every pixel row (at a reduced DCT scale for JPEG) finds truncated / corrupt data.
    image_ops.decode_crop_resize(im, (0, 0, *im.size), 8)
  except ValueError as e:  # from open_image, already worded
    return str(e)
  except Exception as e:  # decode errors of every kind
    return f"image decode failed ({type(e).__name__}: {e})"
  return ""


def read_bad_or_bytes(path: pathlib.Path) -> tuple[bytes | None, str]:
  if not path.is_file():
    return None, f"image file {path} not found"
  data = path.read_bytes()
  reason = check_image(data)
  return (None, reason) if reason else (data, "")


def convert(input: str | os.PathLike, output: str | os.PathLike, *, split_by: str | None = None,
            num_shards: int = 4, image_root: str | None = None, image_column: str = "image",
            caption_column: str = "caption", id_column: str | None = None, seed: int = 0,
            vocab_size: int = 8192, skip_bad_records: bool = False,
            **unused: Any) -> dict[str, Any]:
  """`--format image-captions`: INPUT is the captions CSV/TSV/JSONL file."""
  input = common.require_file(input, "a captions CSV/JSONL file")
  root = pathlib.Path(image_root) if image_root else input.parent
  mode, arg = common.parse_split_by(split_by, "none")
  if mode == "leave-one-out":
    raise ValueError("--split-by leave-one-out applies to interaction sequences only")
  rows = []
  for line_no, row in common.read_rows(input):
    rel = common.get_field(row, image_column, input, line_no)
    caption = common.get_field(row, caption_column, input, line_no)
    if not isinstance(rel, str) or not rel.strip():
      raise common.ConversionError(input, line_no, image_column, f"expected a path, found {rel!r}")
    if not isinstance(caption, str):
      raise common.ConversionError(input, line_no, caption_column,
                                   f"expected a string, found {type(caption).__name__}")
    rid = str(common.get_field(row, id_column, input, line_no)) if id_column else rel
    split = "train"
    if mode == "column":
      split = str(common.get_field(row, arg, input, line_no)).strip()
      if not split or not split.replace("_", "").replace("-", "").isalnum():
        raise common.ConversionError(input, line_no, arg, f"split name {split!r} is not a word")
    rows.append((line_no, rid, rel.strip(), caption.strip(), split))
  if not rows:
    raise common.ConversionError(input, None, None, "no rows")
  ids = [r[1] for r in rows]
  if len(set(ids)) != len(ids):
    dup = next(i for i in ids if ids.count(i) > 1)
    raise common.ConversionError(input, None, id_column or image_column,
                                 f"row ids must be unique; {dup!r} repeats")
  if mode == "holdout":
    rows = [r[:4] + (s,) for r, s in zip(rows, common.holdout_split(ids, arg, seed))]
  source = {"converter": "image-captions", "input": str(input), "image_root": str(root),
            "image_column": image_column, "caption_column": caption_column,
            "id_column": id_column, "split_by": split_by, "seed": seed, "vocab_size": vocab_size,
            "num_shards": num_shards, "skip_bad_records": skip_bad_records,
            "inputs": common.input_digest([input])}
  existing = common.existing_if_current(output, source)
  # Images are not hashed into `source` (that would read every file twice per run); their
  # sha256 per record would bloat the metadata. Re-run after changing images by deleting output.
  if existing is not None:
    return existing
  good, skipped = [], []
  for row in rows:
    line_no, _, rel, _, _ = row
    _, reason = read_bad_or_bytes(root / rel)
    if reason:
      if not skip_bad_records:
        raise common.ConversionError(input, line_no, image_column, reason)
      _LOG.warning("skipping %s:%d (field %r): %s", input, line_no, image_column, reason)
      skipped.append({"line": line_no, "field": image_column, "reason": reason})
      continue
    good.append(row)
  split_names = sorted({r[4] for r in good})
  train_caps = [r[3] for r in good if r[4] == "train"] or [r[3] for r in good]
  tok = common.train_tokenizer(train_caps, vocab_size)
  fields = schemas.image_text_schema()

  def examples(split: str):
    chosen = [r for r in good if r[4] == split]
    ids_list = tok.encode_unpadded([r[3] for r in chosen])
    for r, cap_ids in zip(chosen, ids_list):
      yield {"id": r[1], "image": (root / r[2]).read_bytes(), "caption": r[3],
             "caption_ids": np.asarray(cap_ids, np.int32)}

  splits = {s: common.SplitSpec(fields, examples(s), sum(r[4] == s for r in good))
            for s in split_names}
  return common.write_dataset(
      output, kind=schemas.IMAGE_TEXT, schema=fields, splits=splits, source=source,
      num_shards=num_shards, tokenizer=tok,
      extra={"skipped": {"count": len(skipped), "examples": skipped[:20]},
             "image_normalization": {"mean": list(image_ops.CLIP_MEAN),
                                     "std": list(image_ops.CLIP_STD)}})
