"""`mmcl data convert --format F --input PATH --output DIR [--split-by ...] [options]`.

Turns the files users hold into mmcl datasets: ArrayRecord shards + tokenizer.json (when the
kind has text) + metadata.json (schema, counts, per-shard sha256, the source's digests and
options), written by `array_record` directly (see `converters.common` for why not tfds) so that
an interrupted conversion never leaves a dataset a reader accepts, and a re-run with the same
inputs returns at once. `python -m data_pipelines.convert --help` lists the formats.

Python: `convert(format, input, output, **options)` → the metadata dict; `main(argv)` → exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Callable, Mapping, Sequence

# format → ("module:function" under data_pipelines.converters, description). The converter module
# is imported when a conversion runs, so `mmcl --help` and every other command start without the
# converters' dependencies (scipy.signal for audio, pyarrow, ...).
FORMATS: Mapping[str, tuple[str, str]] = {
    "image-captions": ("image_captions:convert",
                       "image_text: captions CSV/TSV/JSONL naming image files "
                       "(--image-root, --image-column, --caption-column, --id-column)"),
    "marqo-gs": ("marqo:convert",
                 "query_document: Marqo-GS-10M folder of split CSV/parquet files, or one file "
                 "(--image-root, --image-column)"),
    "movielens": ("movielens:convert",
                  "interactions: MovieLens ratings.dat (+ movies.dat) folder (--min-rating)"),
    "sasrec": ("sasrec:convert", "interactions: SASRec `user item` text file"),
    "s3rec": ("s3rec:convert",
              "interactions: S3-Rec one-line-per-user file (+ item2attributes JSON, --attributes)"),
    "recbole": ("recbole:convert_atomic",
                "interactions: RecBole atomic .inter (+ .item) folder (--text-fields, --k-core)"),
    "unisrec": ("recbole:convert_unisrec",
                "interactions: RecBole/UniSRec .train/.valid/.test.inter + .text folder"),
    "amazon": ("amazon:convert",
               "interactions: Amazon reviews JSONL/ratings CSV (--metadata meta JSONL, --k-core)"),
    "lastfm-hetrec": ("lastfm:convert",
                      "entity: hetrec2011-lastfm-2k folder → CF + tag embeddings per artist "
                      "(--cf-dim, --tag-dim)"),
    "embeddings": ("entities:convert",
                   "entity: precomputed embeddings [name=]X.npy|X.parquet[,...] "
                   "(--id-column, --embedding-column)"),
    "audio-folder": ("audio_folder:convert",
                     "audio_clip: annotations CSV/JSONL naming audio files with key/tempo/tags "
                     "(--audio-root, --audio-column, --tag-separator)"),
}


def converter(format: str) -> Callable[..., dict[str, Any]]:
  """The conversion function of `format` (a FORMATS key)."""
  if format not in FORMATS:
    raise ValueError(f"unknown format {format!r}; known formats: {sorted(FORMATS)}")
  module, fn = FORMATS[format][0].split(":")
  return getattr(importlib.import_module(f"data_pipelines.converters.{module}"), fn)


def convert(format: str, input: str | os.PathLike, output: str | os.PathLike,
            **options: Any) -> dict[str, Any]:
  """Converts `input` (format `format`, see FORMATS) into the dataset directory `output`.

  Options are the converter's keyword arguments (split_by, num_shards, image_root, ...); unknown
  options are ignored by converters that do not use them. Returns the metadata dict.
  """
  fn = converter(format)
  return fn(input, output, **{k: v for k, v in options.items() if v is not None})


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
  """The `convert` arguments (on `parser` when given, e.g. a `mmcl data convert` subparser)."""
  p = parser or argparse.ArgumentParser(
      prog="mmcl data convert", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="formats:\n" + "\n".join(f"  {k:15s} {d}" for k, (_, d) in FORMATS.items()))
  p.add_argument("--format", required=True, choices=sorted(FORMATS))
  p.add_argument("--input", required=True, help="input file or folder (see the format)")
  p.add_argument("--output", required=True, help="dataset directory to write")
  p.add_argument("--split-by", dest="split_by", default=None,
                 help="none | holdout:FRACTION | column:NAME | leave-one-out (sequences)")
  p.add_argument("--num-shards", dest="num_shards", type=int, default=4)
  p.add_argument("--seed", type=int, default=None, help="seed of holdout splits")
  p.add_argument("--vocab-size", dest="vocab_size", type=int, default=None,
                 help="BPE vocabulary size of the dataset's tokenizer")
  p.add_argument("--skip-bad-records", dest="skip_bad_records", action="store_true",
                 default=None, help="log, skip and count undecodable images/audio")
  for flag in ("image-root", "image-column", "caption-column", "id-column", "audio-root",
               "audio-column", "tag-separator", "attributes", "metadata", "text-fields",
               "embedding-column", "encoding"):
    p.add_argument(f"--{flag}", dest=flag.replace("-", "_"), default=None)
  for flag in ("k-core", "cf-dim", "tag-dim"):
    p.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=int, default=None)
  p.add_argument("--min-rating", dest="min_rating", type=float, default=None)
  p.add_argument("--allow-negative-ratings", dest="allow_negative_ratings", action="store_true",
                 default=None, help="accept negative ratings (an error otherwise)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; prints a one-line summary (split counts) and returns 0."""
  args = vars(build_parser().parse_args(argv))
  fmt, inp, out = args.pop("format"), args.pop("input"), args.pop("output")
  meta = convert(fmt, inp, out, **args)
  counts = {k: v["num_examples"] for k, v in meta["splits"].items()}
  print(f"{fmt} → {out}: kind {meta['kind']}, splits {json.dumps(counts)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
