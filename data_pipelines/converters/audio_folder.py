"""Audio folder + annotations CSV → `audio_clip` dataset.

The annotations file (CSV/TSV with a header, or JSON Lines) has one row per clip:
  path   (`audio_column`) the audio file, relative to `audio_root` (default: the file's folder);
  key    optional, e.g. "D minor" / "F# maj" ('' = unknown; see `schemas.parse_key`);
  tempo  optional, BPM ('' = unknown);
  tags   optional, tags separated by `tag_separator` (default ';'), e.g. "country" or "Waltz;ballroom".
Other columns are ignored (a `split` column can choose splits with `--split-by column:split`).
Each file is decoded once during conversion (`soundfile`: WAV/FLAC/OGG/MP3) to record its sample
rate, channels and length and to catch undecodable files, which raise an error naming the
annotations file, line and field — or, with `skip_bad_records`, are logged, skipped and counted in
`metadata["skipped"]`. The encoded file is stored unchanged.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import numpy as np

from data_pipelines import audio
from data_pipelines import records
from data_pipelines import schemas
from data_pipelines.converters import common

_LOG = logging.getLogger(__name__)


def probe(data: bytes) -> tuple[dict[str, int] | None, str]:
  """({sample_rate, num_channels, num_frames}, '') of a decodable file, else (None, reason)."""
  reason = records.check_magic(data, "audio_bytes")
  if reason:
    return None, reason
  try:
    wave, sr = audio.decode_audio(data)
  except ValueError as e:
    return None, str(e)
  if not np.isfinite(wave).all():
    return None, "decoded samples hold NaN/inf"
  return {"sample_rate": sr, "num_channels": wave.shape[0], "num_frames": wave.shape[1]}, ""


def convert(input: str | os.PathLike, output: str | os.PathLike, *, split_by: str | None = None,
            num_shards: int = 4, audio_root: str | None = None, audio_column: str = "path",
            tag_separator: str = ";", seed: int = 0, skip_bad_records: bool = False,
            **unused: Any) -> dict[str, Any]:
  """`--format audio-folder`: INPUT is the annotations CSV/TSV/JSONL file."""
  input = common.require_file(input, "an annotations CSV/JSONL file")
  root = pathlib.Path(audio_root) if audio_root else input.parent
  mode, arg = common.parse_split_by(split_by, "none")
  if mode == "leave-one-out":
    raise ValueError("--split-by leave-one-out applies to interaction sequences only")
  source = {"converter": "audio-folder", "input": str(input), "audio_root": str(root),
            "audio_column": audio_column, "tag_separator": tag_separator, "split_by": split_by,
            "seed": seed, "num_shards": num_shards, "skip_bad_records": skip_bad_records,
            "inputs": common.input_digest([input])}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  rows, skipped, tag_vocab = [], [], {}
  for line, row in common.read_rows(input):
    rel = str(common.get_field(row, audio_column, input, line) or "").strip()
    if not rel:
      raise common.ConversionError(input, line, audio_column, "empty path")
    key_label = str(row.get("key") or "").strip()
    try:
      key = schemas.parse_key(key_label) if key_label else -1
    except ValueError as e:
      raise common.ConversionError(input, line, "key", str(e)) from None
    tempo_cell = str(row.get("tempo") or "").strip()
    tempo = common.parse_float(tempo_cell, input, line, "tempo") if tempo_cell else -1.0
    if tempo_cell and tempo <= 0:
      raise common.ConversionError(input, line, "tempo", f"tempo must be > 0, found {tempo}")
    tags = [t.strip() for t in str(row.get("tags") or "").split(tag_separator) if t.strip()]
    path = root / rel
    if not path.is_file():
      info, reason = None, f"audio file {path} not found"
    else:
      info, reason = probe(path.read_bytes())
    if reason:
      if not skip_bad_records:
        raise common.ConversionError(input, line, audio_column, reason)
      _LOG.warning("skipping %s:%d (field %r): %s", input, line, audio_column, reason)
      skipped.append({"line": line, "field": audio_column, "reason": reason})
      continue
    tag_ids = [tag_vocab.setdefault(t, len(tag_vocab)) for t in tags]
    split = "train"
    if mode == "column":
      split = str(common.get_field(row, arg, input, line)).strip()
    rows.append({"id": rel, "path": path, "key": key, "tempo": tempo,
                 "tags": np.asarray(tag_ids, np.int32), "split": split, **info})
  if mode == "holdout":
    for r, s in zip(rows, common.holdout_split([r["id"] for r in rows], arg, seed)):
      r["split"] = s
  if not rows:
    raise common.ConversionError(input, None, None, "no usable rows")
  if len({r["id"] for r in rows}) != len(rows):
    raise common.ConversionError(input, None, audio_column, "duplicate audio paths")
  fields = schemas.audio_clip_schema()

  def examples(split: str):
    for r in rows:
      if r["split"] == split:
        yield {**{k: r[k] for k in ("id", "key", "tempo", "tags", "sample_rate",
                                    "num_channels", "num_frames")},
               "audio": r["path"].read_bytes()}

  names = sorted({r["split"] for r in rows})
  splits = {s: common.SplitSpec(fields, examples(s), sum(r["split"] == s for r in rows))
            for s in names}
  return common.write_dataset(
      output, kind=schemas.AUDIO_CLIP, schema=fields, splits=splits, source=source,
      num_shards=num_shards,
      extra={"tag_names": list(tag_vocab), "key_names": list(schemas.KEY_NAMES),
             "skipped": {"count": len(skipped), "examples": skipped[:20]},
             "total_seconds": float(sum(r["num_frames"] / r["sample_rate"] for r in rows))})
