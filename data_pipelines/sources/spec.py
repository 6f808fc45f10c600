"""`data.source` specs: parsing, brace and glob expansion, and the errors every reader raises.

  arrayrecord:DIR                           a dataset directory of `data_pipelines.records`
  webdataset:PATTERN                        tar shards; brace ranges expand (`/d/{00000..00099}.tar`),
                                            globs too (`/d/*.tar`)
  tfds:NAME[/CONFIG][:SPLIT]@DATA_DIR       a tensorflow-datasets build with file_format
                                            array_record, read by `tfds.data_source` (SPLIT
                                            defaults to train)
  parquet:GLOB                              parquet files (brace ranges and globs expand)

A bare path (no scheme) is taken as `arrayrecord:PATH`.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import braceexpand

from data_pipelines import records

SCHEMES = ("arrayrecord", "webdataset", "tfds", "parquet")


class SourceConfigError(records.MetadataError):
  """A source spec, a column/field name or a setting that does not fit the data (the message
  names them). A `MetadataError`, so the command line reports it in one line (exit code 2)."""


class BadRecordError(records.CorruptRecordError):
  """A sample of a streamed source that cannot be used: a corrupt or missing member, an
  undecodable image. Names the file, the sample (key and position) and the field."""

  def __init__(self, *, path: str, key: str, position: int, field: str, reason: str,
               split: str = "train"):
    ValueError.__init__(self, f"bad sample in {path}: sample {key!r} (record {position} of that "
                              f"file), field {field!r}: {reason}")
    self.path, self.split, self.index, self.position, self.field = (path, split, position,
                                                                    position, field)
    self.key = key


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """A parsed `data.source`.

  scheme: one of SCHEMES; location: DIR, PATTERN, GLOB or the tfds DATA_DIR;
  name/config/split: tfds only (config '' when none).
  """
  scheme: str
  location: str
  name: str = ""
  config: str = ""
  split: str = ""

  def __str__(self) -> str:
    if self.scheme == "tfds":
      cfg = f"/{self.config}" if self.config else ""
      return f"tfds:{self.name}{cfg}:{self.split}@{self.location}"
    return f"{self.scheme}:{self.location}"


def parse(spec: str) -> SourceSpec:
  """Parses a `data.source` string (see the module docstring); SourceConfigError if malformed."""
  if not isinstance(spec, str) or not spec.strip():
    raise SourceConfigError(f"data source spec is empty: expected one of "
                            f"{', '.join(s + ':...' for s in SCHEMES)}")
  spec = spec.strip()
  scheme, sep, rest = spec.partition(":")
  if not sep or "/" in scheme or scheme == "" or os.path.sep in scheme:
    return SourceSpec("arrayrecord", spec)
  if scheme not in SCHEMES:
    raise SourceConfigError(f"data source {spec!r}: unknown scheme {scheme!r}; expected one of "
                            f"{', '.join(s + ':' for s in SCHEMES)}")
  if not rest:
    raise SourceConfigError(f"data source {spec!r}: nothing after '{scheme}:'")
  if scheme != "tfds":
    return SourceSpec(scheme, os.path.expanduser(rest))
  head, at, data_dir = rest.rpartition("@")
  if not at or not head or not data_dir:
    raise SourceConfigError(f"data source {spec!r}: expected tfds:NAME[/CONFIG][:SPLIT]@DATA_DIR")
  name_config, _, split = head.partition(":")
  name, _, config = name_config.partition("/")
  if not name:
    raise SourceConfigError(f"data source {spec!r}: the tfds dataset name is empty")
  return SourceSpec("tfds", os.path.expanduser(data_dir), name=name, config=config,
                    split=split or "train")


def expand_files(spec: SourceSpec) -> list[str]:
  """The files a webdataset PATTERN or parquet GLOB names, brace ranges and globs expanded, in
  sorted order (the source's natural order). FileNotFoundError naming what is missing."""
  files: list[str] = []
  missing: list[str] = []
  for part in braceexpand.braceexpand(spec.location):
    if glob.has_magic(part):
      found = sorted(glob.glob(part))
      if not found:
        missing.append(part)
      files.extend(found)
    elif os.path.isfile(part):
      files.append(part)
    else:
      missing.append(part)
  if missing:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    raise FileNotFoundError(f"data source {spec}: no such file(s): {shown}")
  if not files:
    raise FileNotFoundError(f"data source {spec}: the pattern names no files")
  return sorted(dict.fromkeys(files))
