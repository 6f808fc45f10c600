"""Per-entity multimodal embeddings (`entity` kind, see `data_pipelines.schemas`): the writer, and
the precomputed-embeddings converter.

Precomputed embeddings, one or more modalities (INPUT: comma-separated paths; modality name =
the file's stem, or `name=path`):
  * `X.npy` (float [N, D]) + `X.ids.txt` (N lines, one id each) — the format
    `mmcl.pretrained.features` writes; its manifest `X.json` (when present) is checked: format, count, dim
    and the sha256 of both files;
  * `X.parquet` with an id column (`id_column`, default "id") and either one list-valued column
    (`embedding_column`, default "embedding") or, when that is absent, every other numeric
    column as one dimension each.
Entities are the union of all ids (in first-seen order); an entity missing from a modality gets
a zero vector and `has_{m}` = 0. A NaN/inf value, a row of the wrong length, a duplicate or empty
id raises an error naming file, row and field.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipelines import records
from data_pipelines import schemas
from data_pipelines.converters import common


def write_entities(output: str | os.PathLike, *, ids: Sequence[str], names: Sequence[str],
                   modalities: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   source: Mapping[str, Any], num_shards: int = 4,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes an `entity` dataset with one split "entities".

  Args:
    ids, names: E entity ids (unique) and names.
    modalities: name → (vectors [E, D_m] float32, available [E] bool); unavailable rows are
      stored as zeros.
  """
  e = len(ids)
  if len(set(ids)) != e:
    raise ValueError("entity ids must be unique")
  dims = {}
  for m, (vec, avail) in modalities.items():
    if vec.shape[0] != e or vec.ndim != 2 or avail.shape != (e,):
      raise ValueError(f"modality {m!r}: expected vectors [{e}, D] and availability [{e}], "
                       f"found {list(vec.shape)} and {list(avail.shape)}")
    dims[m] = int(vec.shape[1])
  fields = schemas.entity_schema(dims)

  def examples():
    for i in range(e):
      ex = {"id": ids[i], "name": names[i]}
      for m, (vec, avail) in modalities.items():
        ex[m] = vec[i] if avail[i] else np.zeros(dims[m], np.float32)
        ex[f"has_{m}"] = int(bool(avail[i]))
      yield ex

  counts = {m: int(avail.sum()) for m, (_, avail) in modalities.items()}
  meta_extra = {"modalities": dims, "num_entities": e, "available": counts}
  meta_extra.update(extra or {})
  return common.write_dataset(output, kind=schemas.ENTITY, schema=fields,
                              splits={"entities": common.SplitSpec(fields, examples(), e)},
                              source=source, num_shards=num_shards, extra=meta_extra)


def _check_matrix(vec: np.ndarray, path: os.PathLike, ids: Sequence[str]) -> np.ndarray:
  if vec.ndim != 2:
    raise common.ConversionError(path, None, "embedding", f"expected [N, D], found {list(vec.shape)}")
  if vec.dtype.kind not in "fiu":
    raise common.ConversionError(path, None, "embedding", f"expected numbers, found {vec.dtype}")
  bad = ~np.isfinite(vec)
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise common.ConversionError(path, f"row {row}, id {ids[row]!r}", "embedding",
                                 f"non-finite value {vec[row, col]} at dimension {col}")
  return vec.astype(np.float32)


def _check_ids(ids: list[str], path: os.PathLike) -> list[str]:
  seen: dict[str, int] = {}
  for row, i in enumerate(ids):
    if not i:
      raise common.ConversionError(path, f"row {row}", "id", "empty id")
    if i in seen:
      raise common.ConversionError(path, f"row {row}", "id",
                                   f"duplicate id {i!r} (first at row {seen[i]})")
    seen[i] = row
  return ids


def read_npy(path: pathlib.Path) -> tuple[list[str], np.ndarray]:
  """(ids, vectors [N, D] float32) of X.npy + X.ids.txt (+ X.json manifest when present)."""
  base = path.with_suffix("") if path.suffix == ".npy" else path
  npy = base.with_name(base.name + ".npy")
  ids_path = base.with_name(base.name + ".ids.txt")
  manifest_path = base.with_name(base.name + ".json")
  common.require_file(npy, "an embeddings .npy file")
  common.require_file(ids_path, f"the ids file of {npy}")
  try:
    vec = np.load(npy, mmap_mode="r", allow_pickle=False)
  except ValueError as e:
    raise common.ConversionError(npy, None, None, f"not a NumPy array file ({e})") from None
  ids = _check_ids(common.read_text(ids_path).splitlines(), ids_path)
  if len(ids) != vec.shape[0]:
    raise common.ConversionError(ids_path, None, "id", f"{len(ids)} ids for {vec.shape[0]} "
                                                       f"rows in {npy}")
  if manifest_path.is_file():
    manifest = json.loads(common.read_text(manifest_path))
    if str(manifest.get("format", "")).startswith("mmcl.embeddings"):
      for key, want in (("count", vec.shape[0]), ("dim", vec.shape[1] if vec.ndim == 2 else None)):
        if key in manifest and manifest[key] != want:
          raise common.ConversionError(manifest_path, None, key,
                                       f"manifest says {manifest[key]}, {npy} has {want}")
      for key, p in (("sha256", npy), ("ids_sha256", ids_path)):
        if key in manifest and records.sha256_file(p) != manifest[key]:
          raise common.ConversionError(manifest_path, None, key, f"sha256 of {p} differs")
  return ids, _check_matrix(np.asarray(vec), npy, ids)


def read_parquet(path: pathlib.Path, *, id_column: str = "id",
                 embedding_column: str = "embedding") -> tuple[list[str], np.ndarray]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
  table = pq.read_table(path)
  if id_column not in table.column_names:
    raise common.ConversionError(path, None, id_column,
                                 f"missing id column (columns: {table.column_names})")
  ids = _check_ids([str(x) for x in table.column(id_column).to_pylist()], path)
  if embedding_column in table.column_names:
    rows = table.column(embedding_column).to_pylist()
    dim = None
    for r, v in enumerate(rows):
      if not isinstance(v, list):
        raise common.ConversionError(path, f"row {r}, id {ids[r]!r}", embedding_column,
                                     f"expected a list of numbers, found {type(v).__name__}")
      if dim is None:
        dim = len(v)
      if len(v) != dim or dim == 0:
        raise common.ConversionError(path, f"row {r}, id {ids[r]!r}", embedding_column,
                                     f"length {len(v)}, expected {dim} (row 0's length)")
      if any(x is None for x in v):
        raise common.ConversionError(path, f"row {r}, id {ids[r]!r}", embedding_column,
                                     "null value")
    vec = np.asarray(rows, np.float64).reshape(len(rows), dim or 0)
  else:
    cols = [c for c in table.column_names if c != id_column]
    if not cols:
      raise common.ConversionError(path, None, embedding_column, "no embedding columns")
    vec = np.stack([np.asarray(table.column(c).to_numpy(zero_copy_only=False), np.float64)
                    for c in cols], axis=1)
  return ids, _check_matrix(vec, path, ids)


def parse_inputs(input: str | os.PathLike) -> dict[str, pathlib.Path]:
  out: dict[str, pathlib.Path] = {}
  for part in str(input).split(","):
    if not part.strip():
      continue
    name, sep, p = part.partition("=")
    path = pathlib.Path(p if sep else name)
    m = name if sep else (path.stem.split(".")[0] if path.suffix in (".npy", ".parquet")
                          else path.name)
    if m in out:
      raise ValueError(f"modality {m!r} given twice in --input {input!r}")
    out[m] = path
  if not out:
    raise ValueError("--input: no embedding file given")
  return out


def convert(input: str | os.PathLike, output: str | os.PathLike, *, split_by: str | None = None,
            num_shards: int = 4, id_column: str = "id", embedding_column: str = "embedding",
            **unused: Any) -> dict[str, Any]:
  """`--format embeddings`: INPUT = `[name=]X.npy|X.parquet[,...]`."""
  if common.parse_split_by(split_by, "none")[0] != "none":
    raise ValueError("--split-by: entity datasets have one split, 'entities'")
  paths = parse_inputs(input)
  digests = []
  for p in paths.values():
    if p.suffix == ".parquet":
      digests.append(p)
    else:
      base = p.with_suffix("") if p.suffix == ".npy" else p
      digests += [base.with_name(base.name + ".npy"), base.with_name(base.name + ".ids.txt")]
  source = {"converter": "embeddings", "input": str(input), "num_shards": num_shards,
            "id_column": id_column, "embedding_column": embedding_column,
            "inputs": common.input_digest([d for d in digests if d.is_file()])}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  loaded = {m: (read_parquet(p, id_column=id_column, embedding_column=embedding_column)
                if p.suffix == ".parquet" else read_npy(p)) for m, p in paths.items()}
  all_ids: dict[str, int] = {}
  for ids, _ in loaded.values():
    for i in ids:
      all_ids.setdefault(i, len(all_ids))
  e = len(all_ids)
  modalities = {}
  for m, (ids, vec) in loaded.items():
    full = np.zeros((e, vec.shape[1]), np.float32)
    avail = np.zeros(e, bool)
    rows = np.asarray([all_ids[i] for i in ids], np.int64)
    full[rows], avail[rows] = vec, True
    modalities[m] = (full, avail)
  return write_entities(output, ids=list(all_ids), names=[""] * e, modalities=modalities,
                        source=source, num_shards=num_shards)
