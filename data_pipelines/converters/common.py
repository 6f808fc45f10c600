"""What every converter shares: input errors, the dataset writer, split assignment.

Writing goes through `array_record` directly (via `records.write_split`), not a tfds builder:
tfds writers encode numpy features through TensorFlow, which mmcl does not install, and our
records (msgpack maps with encoded images/audio kept as given) need no tfds feature encoding. The
result is restartable: shards are renamed into place only when complete, and `metadata.json` is
deleted before the first shard is rewritten and written last, so an interrupted conversion leaves
no dataset a reader would accept. Re-running a conversion with the same inputs and options on a
complete output returns at once (the metadata's `source` matches and every shard's sha256 checks).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from data_pipelines import records
from data_pipelines import tokenizer as tokenizer_lib

TOKENIZER_FILE = "tokenizer.json"
PathLike = str | os.PathLike


class ConversionError(ValueError):
  """Bad input: names the file, the record (line/row) and the field."""

  def __init__(self, path: PathLike, where: str | int | None, field: str | None, reason: str):
    self.path, self.where, self.field = str(path), where, field
    loc = str(path)
    if where is not None:
      loc += f":{where}" if isinstance(where, int) else f" ({where})"
    if field is not None:
      loc += f", field {field!r}"
    super().__init__(f"{loc}: {reason}")


class TextFile:
  """A text file read line by line whose undecodable bytes are a ConversionError naming the file,
  the line, the column and the encoding (instead of a UnicodeDecodeError naming nothing).

  Use as `open()` in text mode: `with open_text(path, "utf-8") as fp: for line in fp: ...`;
  `line_no` is the number of the line last read. Lines keep their end-of-line characters.
  """

  def __init__(self, path: PathLike, encoding: str = "utf-8"):
    self.path, self.encoding, self.line_no = pathlib.Path(path), encoding, 0
    self._fp = open(self.path, "rb")

  def _decode(self, raw: bytes) -> str:
    try:
      return raw.decode(self.encoding)
    except UnicodeDecodeError as e:
      raise ConversionError(
          self.path, self.line_no, None,
          f"bytes {raw[e.start:e.end]!r} at column {e.start + 1} are not valid {self.encoding} "
          f"(re-encode the file as {self.encoding}, or pass its encoding where the converter "
          f"takes one)") from None

  def readline(self) -> str:
    raw = self._fp.readline()
    if raw:
      self.line_no += 1
    return self._decode(raw)

  def __iter__(self) -> Iterator[str]:
    for raw in self._fp:
      self.line_no += 1
      yield self._decode(raw)

  def close(self) -> None:
    self._fp.close()

  def __enter__(self) -> "TextFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def open_text(path: PathLike, encoding: str = "utf-8") -> TextFile:
  """`open(path, encoding=encoding)` for reading, with decode errors naming file and line."""
  return TextFile(path, encoding)


def read_text(path: PathLike, encoding: str = "utf-8") -> str:
  """The whole file as text; undecodable bytes are a ConversionError naming file and line."""
  with open_text(path, encoding) as fp:
    return "".join(fp)


def require_file(path: PathLike, what: str) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"expected {what} at {path}; it does not exist")
  return path


def read_table(path: PathLike, *, delimiter: str | None = None,
               encoding: str = "utf-8") -> Iterator[tuple[int, dict[str, str]]]:
  """Rows of a CSV/TSV file with a header: (line number, {column: value}).

  The delimiter defaults to tab for .tsv/.tab files and comma otherwise. A row with a different
  number of cells than the header raises ConversionError naming file and line.
  """
  path = require_file(path, "a CSV file")
  if delimiter is None:
    delimiter = "\t" if path.suffix in (".tsv", ".tab") else ","
  with open_text(path, encoding) as fp:
    reader = csv.reader(fp, delimiter=delimiter)
    try:
      header = next(reader)
    except StopIteration:
      raise ConversionError(path, 1, None, "empty file (expected a header line)") from None
    header = [h.strip() for h in header]
    for row in reader:
      if not row or (len(row) == 1 and not row[0].strip()):
        continue
      if len(row) != len(header):
        raise ConversionError(path, reader.line_num, None,
                              f"{len(row)} cells, the header has {len(header)} ({header})")
      yield reader.line_num, dict(zip(header, row))


def read_jsonl(path: PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, object) of a JSON Lines file; errors name file and line."""
  path = require_file(path, "a JSON Lines file")
  with open_text(path, "utf-8") as fp:
    for line_no, line in enumerate(fp, 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConversionError(path, line_no, None, f"not valid JSON ({e})") from None
      if not isinstance(obj, dict):
        raise ConversionError(path, line_no, None,
                              f"expected a JSON object, found {type(obj).__name__}")
      yield line_no, obj


def read_rows(path: PathLike, **kwargs) -> Iterator[tuple[int, dict[str, Any]]]:
  """Rows of a CSV/TSV (header) or JSON Lines (.jsonl/.json) file."""
  if pathlib.Path(path).suffix in (".jsonl", ".json"):
    return read_jsonl(path)
  return read_table(path, **kwargs)


def get_field(row: Mapping[str, Any], name: str, path: PathLike, where: int | str,
              *, required: bool = True) -> Any:
  if name not in row:
    if not required:
      return None
    raise ConversionError(path, where, name, f"missing (columns: {sorted(row)})")
  return row[name]


def parse_int(value: Any, path: PathLike, where: int | str, field: str) -> int:
  try:
    if isinstance(value, str):
      value = value.strip()
    out = int(value)
  except (TypeError, ValueError):
    raise ConversionError(path, where, field, f"expected an integer, found {value!r}") from None
  return out


def parse_float(value: Any, path: PathLike, where: int | str, field: str) -> float:
  try:
    out = float(value.strip() if isinstance(value, str) else value)
  except (TypeError, ValueError):
    raise ConversionError(path, where, field, f"expected a number, found {value!r}") from None
  if not np.isfinite(out):
    raise ConversionError(path, where, field, f"expected a finite number, found {value!r}")
  return out


def holdout_split(ids: Sequence[str], fraction: float, seed: int,
                  names: tuple[str, str] = ("train", "test")) -> list[str]:
  """Assigns each id to names[1] with probability `fraction`, else names[0].

  The draw is a hash of (seed, id), so a row keeps its split when other rows are added or
  removed, and rows sharing an id (e.g. one product's several captions) share a split.
  """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
  out = []
  for i in ids:
    digest = hashlib.blake2b(f"{seed}\0{i}".encode("utf-8"), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2.0**64
    out.append(names[1] if u < fraction else names[0])
  return out


def parse_split_by(split_by: str | None, default: str | None = None) -> tuple[str, Any]:
  """`--split-by` values: None/'none' → ('none', None); 'column:NAME' → ('column', NAME);
  'holdout:FRACTION' → ('holdout', float); 'leave-one-out' → ('leave-one-out', None)."""
  value = split_by if split_by not in (None, "") else default
  if value in (None, "none"):
    return "none", None
  if value == "leave-one-out":
    return "leave-one-out", None
  kind, _, arg = value.partition(":")
  if kind == "column" and arg:
    return "column", arg
  if kind == "holdout":
    try:
      frac = float(arg)
    except ValueError:
      frac = -1.0
    if 0.0 < frac < 1.0:
      return "holdout", frac
  raise ValueError(f"--split-by {value!r}: expected 'none', 'column:NAME', 'holdout:FRACTION' "
                   f"(0 < FRACTION < 1) or 'leave-one-out'")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizer_lib.TextTokenizer:
  return tokenizer_lib.TextTokenizer.train(texts, vocab_size=vocab_size)


def existing_if_current(output: PathLike, source: Mapping[str, Any]) -> dict[str, Any] | None:
  """The complete dataset at `output` when it was converted from the same `source` (inputs'
  sha256 and options) and its files check out; else None."""
  try:
    meta = records.load_metadata(output)
  except (FileNotFoundError, ValueError):
    return None
  if meta.get("source") != json.loads(json.dumps(source)):
    return None
  if records.verify_files(output, meta, checksums=True):
    return None
  tok = meta.get("tokenizer")
  if tok and (not (pathlib.Path(output) / tok).is_file()
              or records.sha256_file(pathlib.Path(output) / tok) != meta.get("tokenizer_sha256")):
    return None
  return meta


def input_digest(paths: Iterable[PathLike]) -> dict[str, str]:
  """file name → sha256, for the metadata's `source` (so a changed input triggers a rebuild)."""
  return {str(p): records.sha256_file(p) for p in paths}


class SplitSpec:
  """One split to write: its schema, its examples (an iterable of dicts) and their count."""

  def __init__(self, fields: Sequence[records.Field], examples: Iterable[Mapping[str, Any]],
               num_examples: int, *, own_schema: bool = False):
    self.fields, self.examples, self.num_examples = tuple(fields), examples, int(num_examples)
    self.own_schema = own_schema


def write_dataset(output: PathLike, *, kind: str, schema: Sequence[records.Field],
                  splits: Mapping[str, SplitSpec], source: Mapping[str, Any],
                  num_shards: int = 4, tokenizer: tokenizer_lib.TextTokenizer | None = None,
                  extra: Mapping[str, Any] | None = None,
                  before_write: Callable[[pathlib.Path], None] | None = None) -> dict[str, Any]:
  """Writes a dataset directory: shards per split, tokenizer.json, then metadata.json last.

  Args:
    output: dataset directory (created; an earlier incomplete or different build is replaced).
    kind: one of `schemas.KINDS`.
    schema: the dataset schema (splits with `own_schema` store theirs in their metadata entry).
    splits: split name → SplitSpec (examples are encoded lazily, in order).
    source: the converter's name, options and input digests (compared on re-runs).
    num_shards: shards per split (capped at the split size).
    tokenizer: saved as tokenizer.json when given.
    extra: more metadata keys (vocabularies, statistics, ...).
    before_write: called with the directory after `begin_rewrite` (e.g. to write side files).

  Returns:
    the metadata dict.
  """
  if num_shards < 1:
    raise ValueError(f"num_shards must be >= 1, got {num_shards}")
  out = pathlib.Path(output)
  records.begin_rewrite(out)
  if before_write is not None:
    before_write(out)
  meta: dict[str, Any] = {"format": records.FORMAT_NAME, "format_version": records.FORMAT_VERSION,
                          "kind": kind, "schema": records.schema_to_json(schema),
                          "source": json.loads(json.dumps(source)), "splits": {}}
  if tokenizer is not None:
    tokenizer.save(out / TOKENIZER_FILE)
    meta.update(tokenizer=TOKENIZER_FILE,
                tokenizer_sha256=records.sha256_file(out / TOKENIZER_FILE),
                vocab_size=tokenizer.vocab_size,
                special_token_ids={"pad": tokenizer_lib.PAD_ID, "unk": tokenizer_lib.UNK_ID,
                                   "bos": tokenizer_lib.BOS_ID, "eos": tokenizer_lib.EOS_ID})
  for name, spec in splits.items():
    where = f"{kind} {name} example"
    stream = (records.encode_record(ex, spec.fields, where=f"{where} {i}")
              for i, ex in enumerate(spec.examples))
    n = spec.num_examples
    entry: dict[str, Any] = {
        "num_examples": n,
        "shards": records.write_split(out, name, stream, num_records=n,
                                      num_shards=max(1, min(num_shards, n)))}
    if spec.own_schema:
      entry["schema"] = records.schema_to_json(spec.fields)
    meta["splits"][name] = entry
  meta.update(extra or {})
  records.remove_unlisted_shards(out, meta)
  records.write_metadata(out, meta)
  return meta

