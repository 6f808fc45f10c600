"""Precomputed embeddings: compute them with a pretrained or trained tower, write and read them.

`compute_features` embeds one text or image field of every record of a dataset with a tower
(`mmcl.pretrained.towers`: a local Hugging Face BERT-family or open_clip ViT folder, a `mmcl train`
workdir's tower, or an `mmcl export` artifact) in batches sharded over all devices, and writes the
precomputed-embeddings format below, resumably. It is what `mmcl features` runs.

Format, for an output path PATH (a trailing ".npy" is dropped):
  PATH.npy       float32 [N, D], the standard NumPy format (`np.load(PATH.npy, mmap_mode="r")`);
  PATH.ids.txt   N lines, line i the id of row i (ids are strings without newlines, unique);
  PATH.json      the manifest: {"format": "mmcl.embeddings/1", "model", "tower" (what computed
                 it: source, path, tower name, step, dtype, input settings), "kind" ("text" |
                 "image"), "dim", "count", "sha256" (of PATH.npy), "ids_sha256" (of
                 PATH.ids.txt), "dtype": "float32", "field", "input", "input_sha256", "split",
                 "id_field", "duplicates_skipped", "max_length", "normalized"}.
The manifest is written last (by an atomic rename): the files are complete iff PATH.json exists.
`read_features(PATH)` returns ids, vectors and manifest, checking counts and (optionally) hashes.
The data pipelines read the same files: `mmcl data convert --format embeddings` (an `entity`
dataset) and `data_pipelines.pipelines.item_feature_table` (item features joined on `item_id`).

Resuming: rows are processed in chunks. While running, PATH.partial/ holds `vectors.npy` (the final
array, filled chunk by chunk) and `progress.json` ({"rows_done", plus the settings and input hash
the run started with}); `progress.json` is replaced atomically after each chunk's vectors are
flushed. A new call with the same settings continues after `rows_done`; different
settings or a changed input are refused (delete PATH.partial/ to start over). On completion the
arrays are renamed into place, the manifest is written and PATH.partial/ is removed.

Inputs:
  * a converted dataset (a folder with metadata.json, `data_pipelines.records`): the field is a
    `text` field (embedded by a text tower) or an `image_bytes` / `png_image` field (an image
    tower); every split whose schema has the field is read, in metadata order, unless `split`
    names one. Ids come from the record's id field: by default "query_id" for a query_document's
    query, "product_id" for its title / image, "item_id" for an interactions item's text, else
    "id"; a dataset without one (e.g. the built-in shapes set) uses the record index ("index":
    "I", or "SPLIT:I" over several splits, the ids `mmcl export --corpus` writes). Records whose
    id was seen before are skipped (a query_document repeats each product for every query).
    input_sha256 is the sha256 of metadata.json (which holds every shard's sha256).
  * a JSON Lines file (`.jsonl` / `.json`), one object per line with an id and the text field;
  * a plain text file (any other suffix), one text per line, id = line number (0-based), field
    ignored.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from data_pipelines import records as records_lib
from mmcl.eval.atomic import write_text_atomic

PathLike = str | os.PathLike
FORMAT = "mmcl.embeddings/1"


# --- input records --------------------------------------------------------------------------------
def read_text_records(path: PathLike, field: str, *, id_field: str = "id"
                      ) -> tuple[list[str], list[str]]:
  """Reads (ids, texts) from a JSON Lines or plain text file (see the module docstring).

  Raises:
    ValueError: naming file and line for invalid JSON, a missing or non-string field, an id that
      is empty or holds a newline, or a duplicate id.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"expected an input file at {path}; it does not exist")
  ids: list[str] = []
  texts: list[str] = []
  with path.open(encoding="utf-8") as f:
    if path.suffix in (".jsonl", ".json"):
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{line_no}"
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
          raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
        for key in (id_field, field):
          if key not in record:
            raise ValueError(f"{where}: record has no field {key!r} (fields: {sorted(record)})")
        text = record[field]
        if not isinstance(text, str):
          raise ValueError(
              f"{where}: field {field!r} is a {type(text).__name__}, expected a string")
        ids.append(_check_id(record[id_field], where))
        texts.append(text)
    else:
      for line_no, line in enumerate(f):
        ids.append(str(line_no))
        texts.append(line.rstrip("\n").rstrip("\r"))
  seen: set[str] = set()
  for i, record_id in enumerate(ids):
    if record_id in seen:
      raise ValueError(f"{path}: id {record_id!r} occurs more than once (again in record {i})")
    seen.add(record_id)
  return ids, texts


def _check_id(value: Any, where: str) -> str:
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise ValueError(f"{where}: id must be a string or an integer, found {value!r}")
  text = str(value)
  if not text or "\n" in text or "\r" in text:
    raise ValueError(f"{where}: id {text!r} is empty or holds a line break")
  return text


def output_paths(output: PathLike) -> dict[str, pathlib.Path]:
  """The files of the format for `output`: {"npy", "ids", "manifest", "partial"}."""
  base = pathlib.Path(output)
  if base.suffix == ".npy":
    base = base.with_suffix("")
  return {"npy": base.with_name(base.name + ".npy"),
          "ids": base.with_name(base.name + ".ids.txt"),
          "manifest": base.with_name(base.name + ".json"),
          "partial": base.with_name(base.name + ".partial")}


# --- reading --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Features:
  """Precomputed embeddings.

  Attributes:
    ids: N ids, row order.
    vectors: [N, D] float32 (memory-mapped, read-only).
    manifest: the parsed PATH.json.
  """
  ids: list[str]
  vectors: np.ndarray
  manifest: dict[str, Any]


def read_features(output: PathLike, *, verify_hashes: bool = False) -> Features:
  """Reads the precomputed-embeddings files at `output` (see the module docstring).

  Args:
    output: PATH (or PATH.npy).
    verify_hashes: also check the SHA-256 of both data files against the manifest.

  Raises:
    FileNotFoundError: when PATH.json is missing (not written, or still being computed).
    ValueError: when the files disagree with the manifest.
  """
  paths = output_paths(output)
  if not paths["manifest"].is_file():
    hint = (" (an interrupted run left PATH.partial/; run it again)"
            if paths["partial"].exists() else "")
    raise FileNotFoundError(f"no precomputed embeddings at {paths['manifest']}{hint}")
  manifest = json.loads(paths["manifest"].read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{paths['manifest']}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  vectors = np.load(paths["npy"], mmap_mode="r")
  ids = paths["ids"].read_text(encoding="utf-8").splitlines()
  expected = (manifest["count"], manifest["dim"])
  if vectors.shape != expected or vectors.dtype != np.float32:
    raise ValueError(f"{paths['npy']}: shape {vectors.shape} {vectors.dtype}, the manifest says "
                     f"{expected} float32")
  if len(ids) != manifest["count"]:
    raise ValueError(f"{paths['ids']}: {len(ids)} ids, the manifest says {manifest['count']}")
  if verify_hashes:
    for key, name in (("npy", "sha256"), ("ids", "ids_sha256")):
      if records_lib.sha256_file(paths[key]) != manifest[name]:
        raise ValueError(f"{paths[key]}: SHA-256 differs from the manifest's {name}")
  return Features(ids, vectors, manifest)


# --- dataset input --------------------------------------------------------------------------------
# (kind, field) → the id field of the records that field describes.
DEFAULT_ID_FIELDS = {("query_document", "query"): "query_id",
                     ("query_document", "title"): "product_id",
                     ("query_document", "image"): "product_id",
                     ("interactions", "text"): "item_id"}
RECORD_INDEX = "index"
_READ_BLOCK = 4096
_FIELD_KINDS = {"text": "text", "image_bytes": "image", "png_image": "image"}


@dataclasses.dataclass(frozen=True)
class RecordInput:
  """The records to embed.

  Attributes:
    ids: N unique ids, row order.
    kind: "text" or "image": what the field holds.
    sha256: identifies the input (file hash, or a dataset's metadata.json hash).
    settings: JSON facts about the selection (split, id_field, duplicates_skipped).
    load: (start, end) → the raw values of rows start … end − 1 (str, bytes or uint8 arrays).
  """
  ids: list[str]
  kind: str
  sha256: str
  settings: dict[str, Any]
  load: Callable[[int, int], list[Any]]


def read_input(path: PathLike, field: str, *, id_field: str | None = None,
               split: str | None = None) -> RecordInput:
  """Opens a dataset folder, JSON Lines or text file (see the module docstring) for `field`."""
  path = pathlib.Path(path)
  if path.is_dir():
    return _read_dataset(path, field, id_field=id_field, split=split)
  if split is not None:
    raise ValueError(f"{path}: --split applies to converted datasets (folders), not to files")
  ids, texts = read_text_records(path, field, id_field=id_field or "id")
  settings = {"split": None, "id_field": (id_field or "id") if path.suffix in (
      ".jsonl", ".json") else "line", "duplicates_skipped": 0}
  return RecordInput(ids, "text", records_lib.sha256_file(path), settings,
                     lambda start, end: texts[start:end])


def _read_dataset(path: pathlib.Path, field: str, *, id_field: str | None,
                  split: str | None) -> RecordInput:

  meta = records_lib.load_metadata(path)
  schemas = {s: {f.name: f for f in records_lib.split_schema(meta, s)} for s in meta["splits"]}
  if split is not None:
    if split not in schemas:
      raise ValueError(f"{path}: no split {split!r} (splits: {sorted(schemas)})")
    splits = [split]
  else:
    splits = [s for s, fields in schemas.items() if field in fields]
  fields = {f"{s}": sorted(schemas[s]) for s in (splits or schemas)}
  if not splits or any(field not in schemas[s] for s in splits):
    raise ValueError(f"{path}: field {field!r} is not in the schema of the split(s) (fields: "
                     f"{fields})")
  field_kind = schemas[splits[0]][field].kind
  if field_kind not in _FIELD_KINDS:
    raise ValueError(f"{path}: field {field!r} is of kind {field_kind!r}; mmcl features embeds "
                     f"{sorted(_FIELD_KINDS)} fields")
  kind = meta.get("kind")
  if id_field is None:
    id_field = DEFAULT_ID_FIELDS.get((kind, field), "id")
    if any(id_field not in schemas[s] for s in splits):
      id_field = RECORD_INDEX
  for s in splits:
    if id_field != RECORD_INDEX and id_field not in schemas[s]:
      raise ValueError(f"{path}: id field {id_field!r} is not in split {s!r} (fields: "
                       f"{sorted(schemas[s])}); pass --id-field (or 'index' for record indices)")
  sources = {s: records_lib.ArrayRecordSource(path, s, fields=[field], metadata=meta)
             for s in splits}
  ids: list[str] = []
  refs: list[tuple[str, int]] = []
  seen: set[str] = set()
  duplicates = 0
  for s in splits:
    n = len(sources[s])
    if id_field == RECORD_INDEX:
      split_ids = [str(i) if len(splits) == 1 else f"{s}:{i}" for i in range(n)]
    else:
      reader = records_lib.ArrayRecordSource(path, s, fields=[id_field], metadata=meta)
      split_ids = []
      for start in range(0, n, _READ_BLOCK):
        for r in reader.read_many(list(range(start, min(start + _READ_BLOCK, n)))):
          split_ids.append(_check_id(r[id_field], f"{path} split {s!r} record {r['index']}, "
                                                  f"field {id_field!r}"))
      reader.close()
    for i, record_id in enumerate(split_ids):
      if record_id in seen:
        duplicates += 1
        continue
      seen.add(record_id)
      ids.append(record_id)
      refs.append((s, i))

  def load(start: int, end: int) -> list[Any]:
    values: list[Any] = [None] * (end - start)
    by_split: dict[str, list[int]] = {}
    for row in range(start, end):
      by_split.setdefault(refs[row][0], []).append(row)
    for s, rows in by_split.items():
      for row, r in zip(rows, sources[s].read_many([refs[row][1] for row in rows])):
        values[row - start] = r[field]
    return values

  settings = {"split": splits if len(splits) > 1 else splits[0], "id_field": id_field,
              "duplicates_skipped": duplicates}
  return RecordInput(ids, _FIELD_KINDS[field_kind],
                     records_lib.sha256_file(path / records_lib.METADATA_FILE), settings, load)


# --- computing ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeaturesResult:
  """What `compute_features` did.

  Attributes:
    manifest: the manifest (also in PATH.json once complete).
    complete: False when the run stopped early (`stop_after_chunks`).
    rows_computed: rows embedded by this call (0 when the output already existed).
  """
  manifest: dict[str, Any]
  complete: bool
  rows_computed: int


def _progress_printer(total: int, enabled: bool) -> Callable[[int], None]:
  """A one-line progress bar on stderr (rows, %, bar, rows/s, ETA), redrawn in place."""
  start = time.monotonic()
  first: list[int] = []

  def report(done: int) -> None:
    if not enabled:
      return
    if not first:
      first.append(done)  # rows a resumed run found done: not part of this run's rate
    elapsed = max(time.monotonic() - start, 1e-9)
    rate = (done - first[0]) / elapsed
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
    frac = done / max(total, 1)
    bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
    end = "\n" if done >= total else ""
    sys.stderr.write(f"\rfeatures [{bar}] {done}/{total} rows ({100 * frac:.0f}%) "
                     f"{rate:.0f} rows/s, ETA {eta}   {end}")
    sys.stderr.flush()
  return report


# The manifest keys of the first version (a text file or JSONL embedded by a pretrained folder
# in float32): a complete output written then still counts as done for the same settings.
_FIRST_VERSION_KEYS = ("format", "model", "dim", "count", "dtype", "field", "input",
                       "input_sha256", "max_length", "normalized")


def _same_output(manifest: dict[str, Any], settings: dict[str, Any]) -> bool:
  """Whether a complete output's manifest was computed with `settings`."""
  if "tower" not in manifest:
    return (settings["tower"]["source"] == "pretrained" and settings["tower"]["dtype"] == "float32"
            and settings["split"] is None and settings["id_field"] == "id"
            and all(manifest.get(k) == settings[k] for k in _FIRST_VERSION_KEYS))
  return all(manifest.get(k) == v for k, v in settings.items())


def compute_features(tower: PathLike, input_dataset: PathLike, field: str, output: PathLike, *,
                     tower_name: str | None = None, step: int | None = None,
                     split: str | None = None, batch_size: int = 256, max_length: int = 256,
                     dtype: str = "float32", param_sharding: str = "replicate",
                     chunk_size: int = 8192, id_field: str | None = None,
                     overwrite: bool = False, progress: bool = True,
                     stop_after_chunks: int | None = None, mesh: Any = None,
                     resolve_task: Any = None) -> FeaturesResult:
  """Embeds `field` of every record of `input_dataset` with `tower`; writes the format at `output`.

  Args:
    tower: a pretrained folder, a `mmcl train` workdir or an `mmcl export` directory, optionally
      "PATH:NAME" (see `mmcl.pretrained.towers.load_feature_tower`).
    input_dataset: a converted dataset folder, a JSON Lines or a plain text file (see the module
      docstring).
    field: the text or image field to embed.
    output: PATH of the output files.
    tower_name: the tower of a workdir / export ("text", "image", ...).
    step: the workdir checkpoint (default the newest).
    split: read only this split of a dataset (default every split with the field).
    batch_size: values per forward pass (over all devices; rounded up to a multiple of the
      device count).
    max_length: BERT-family folders: tokens per text including [CLS] / [SEP] (trained towers
      use their own max_len).
    dtype: compute dtype, "float32" or "bfloat16"; the output is float32 either way.
    param_sharding: pretrained weights on the mesh: "replicate" or "fsdp" (the trainer's
      strategies, `mmcl.parallel.sharding`).
    chunk_size: rows between progress records (the work an interruption can lose).
    id_field: the id field (default: see the module docstring; "id" for JSON Lines).
    overwrite: replace a complete output computed with other settings or input.
    progress: print a progress bar with throughput and ETA to stderr.
    resolve_task: task.name → `Task` subclass, for a workdir's tower (see
      `mmcl.pretrained.towers.load_feature_tower`).
    stop_after_chunks: stop after this many chunks of this call, leaving a resumable partial
      output (for tests of resuming).
    mesh: the `jax.sharding.Mesh` to shard batches over; default every device on its data axis.
      Single-process only: every row is written by this process.

  Returns:
    The `FeaturesResult`.
  """
  # Imported here, not at the top: reading precomputed features (data pipelines) must not need JAX.
  from mmcl.eval.finite import require_finite
  from mmcl.pretrained.towers import load_feature_tower

  if chunk_size < 1 or batch_size < 1:
    raise ValueError(f"compute_features: chunk_size and batch_size must be ≥ 1, found "
                     f"{chunk_size} and {batch_size}")
  paths = output_paths(output)
  records = read_input(input_dataset, field, id_field=id_field, split=split)
  ids = records.ids
  if not ids:
    raise ValueError(f"{input_dataset}: no records to embed")
  embedder = load_feature_tower(tower, mesh=mesh, tower_name=tower_name, step=step,
                                max_length=max_length, dtype=dtype,
                                param_sharding=param_sharding, resolve_task=resolve_task)
  if embedder.kind != records.kind:
    raise ValueError(f"{input_dataset}: field {field!r} holds {records.kind}s but --tower {tower} "
                     f"is a{'n' if embedder.kind == 'image' else ''} {embedder.kind} tower")
  settings = {"format": FORMAT, "model": embedder.description["path"],
              "tower": embedder.description, "kind": records.kind, "dim": embedder.dim,
              "count": len(ids), "dtype": "float32", "field": field,
              "input": str(pathlib.Path(input_dataset).resolve()),
              "input_sha256": records.sha256, **records.settings,
              "max_length": embedder.description.get("max_length"),
              "normalized": bool(embedder.normalized)}
  settings = json.loads(json.dumps(settings))  # as it reads back from JSON (lists, not tuples)

  if paths["manifest"].is_file():
    manifest = json.loads(paths["manifest"].read_text())
    if _same_output(manifest, settings):
      return FeaturesResult(manifest, True, 0)
    if not overwrite:
      raise FileExistsError(f"{paths['manifest']}: embeddings computed with other settings or "
                            "input already exist; pass overwrite=True (--overwrite) to replace "
                            "them")
    paths["manifest"].unlink()

  partial = paths["partial"]
  progress_file = partial / "progress.json"
  vectors_file = partial / "vectors.npy"
  rows_done = 0
  if progress_file.is_file():
    record = json.loads(progress_file.read_text())
    changed = sorted(k for k, v in settings.items() if record.get(k) != v)
    if changed:
      raise ValueError(f"{partial}: an interrupted run with different {changed} is there; delete "
                       "the folder to start over")
    rows_done = int(record["rows_done"])
  else:
    if partial.exists():
      shutil.rmtree(partial)
    partial.mkdir(parents=True)
    np.lib.format.open_memmap(vectors_file, mode="w+", dtype=np.float32,
                              shape=(len(ids), embedder.dim)).flush()
    write_text_atomic(progress_file, json.dumps({**settings, "rows_done": 0}))

  report = _progress_printer(len(ids), progress)
  report(rows_done)
  computed, chunks = 0, 0
  # Absent only when a previous run was interrupted while committing, after all rows were done.
  vectors = (np.lib.format.open_memmap(vectors_file, mode="r+") if rows_done < len(ids) else None)
  while rows_done < len(ids):
    if stop_after_chunks is not None and chunks >= stop_after_chunks:
      return FeaturesResult({**settings, "rows_done": rows_done}, False, computed)
    end = min(rows_done + chunk_size, len(ids))
    chunk = embedder.encode(
        records.load(rows_done, end), batch_size=batch_size,
        where=lambda i, start=rows_done: f"{input_dataset}: id {ids[start + i]!r}, field {field!r}")
    # Nothing non-finite is written; the partial output stays resumable up to this chunk.
    require_finite(chunk, f"--tower {tower}: embeddings of field {field!r}, rows "
                          f"{rows_done}..{end - 1} (e.g. id {ids[rows_done]!r})")
    vectors[rows_done:end] = chunk
    vectors.flush()
    computed += end - rows_done
    rows_done = end
    chunks += 1
    write_text_atomic(progress_file, json.dumps({**settings, "rows_done": rows_done}))
    report(rows_done)
  del vectors

  # Commit: data files first, manifest last (its presence marks a complete output). Every step
  # can be repeated, so a run interrupted here finishes the commit when called again.
  write_text_atomic(paths["ids"], "".join(f"{i}\n" for i in ids))
  if vectors_file.exists():
    vectors_file.replace(paths["npy"])
  manifest = {**settings, "sha256": records_lib.sha256_file(paths["npy"]),
              "ids_sha256": records_lib.sha256_file(paths["ids"])}
  write_text_atomic(paths["manifest"], json.dumps(manifest, indent=1))
  shutil.rmtree(partial)
  return FeaturesResult(manifest, True, computed)
