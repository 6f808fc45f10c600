"""Precomputed embeddings: compute them with a pretrained tower, write and read them.

`compute_features` embeds one text field of every record of a dataset with a pretrained text tower
(a local Hugging Face BERT-family folder, see `mmcl.models.pretrained`) in batches sharded over
all devices, and writes the precomputed-embeddings format below, resumably.

Format, for an output path PATH (a trailing ".npy" is dropped):
  PATH.npy       float32 [N, D], the standard NumPy format (`np.load(PATH.npy, mmap_mode="r")`);
  PATH.ids.txt   N lines, line i the id of row i (ids are strings without newlines, unique);
  PATH.json      the manifest: {"format": "mmcl.embeddings/1", "model", "dim", "count",
                 "sha256" (of PATH.npy), "ids_sha256" (of PATH.ids.txt), "dtype": "float32",
                 "field", "input", "input_sha256", "max_length", "normalized"}.
The manifest is written last (by an atomic rename): the files are complete iff PATH.json exists.
`read_features(PATH)` returns ids, vectors and manifest, checking counts and (optionally) hashes.

Resuming: rows are processed in chunks. While running, PATH.partial/ holds `vectors.npy` (the final
array, filled chunk by chunk) and `progress.json` ({"rows_done", plus the settings and input hash
the run started with}); `progress.json` is replaced atomically after each chunk's vectors are
flushed. A new call with the same settings continues after `rows_done`; different
settings or a changed input are refused (delete PATH.partial/ to start over). On completion the
arrays are renamed into place, the manifest is written and PATH.partial/ is removed.

Inputs accepted now: a JSON Lines file (`.jsonl` / `.json`), one object per line with an "id" and
the text field; or a plain text file (any other suffix), one text per line, id = line number
(0-based), field ignored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PathLike = str | os.PathLike
FORMAT = "mmcl.embeddings/1"
_HASH_BLOCK = 1 << 20


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


# --- small file helpers ---------------------------------------------------------------------------
def sha256_file(path: PathLike) -> str:
  """Hex SHA-256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while block := f.read(_HASH_BLOCK):
      digest.update(block)
  return digest.hexdigest()


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(path)


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
      if sha256_file(paths[key]) != manifest[name]:
        raise ValueError(f"{paths[key]}: SHA-256 differs from the manifest's {name}")
  return Features(ids, vectors, manifest)


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
  start = time.monotonic()

  def report(done: int) -> None:
    if not enabled:
      return
    elapsed = max(time.monotonic() - start, 1e-9)
    rate = done / elapsed
    eta = (total - done) / rate if rate > 0 else float("inf")
    end = "\n" if done >= total else ""
    sys.stderr.write(f"\rfeatures {done}/{total} rows ({100 * done / max(total, 1):.0f}%) "
                     f"{rate:.0f} rows/s, ETA {eta:.0f}s   {end}")
    sys.stderr.flush()
  return report


def compute_features(tower: PathLike, input_dataset: PathLike, field: str, output: PathLike, *,
                     batch_size: int = 256, max_length: int = 256, chunk_size: int = 8192,
                     id_field: str = "id", overwrite: bool = False, progress: bool = True,
                     stop_after_chunks: int | None = None, mesh: Any = None) -> FeaturesResult:
  """Embeds `field` of every record of `input_dataset` with `tower`; writes the format at `output`.

  Args:
    tower: a local Hugging Face BERT-family folder (`mmcl.models.pretrained.load_text_tower`).
    input_dataset: a JSON Lines or plain text file (see the module docstring).
    field: the text field of the JSON records.
    output: PATH of the output files.
    batch_size: texts per forward pass (over all devices; rounded up to a multiple of the
      device count).
    max_length: tokens per text including [CLS] / [SEP]; longer texts are truncated.
    chunk_size: rows between progress records (the work an interruption can lose).
    id_field: the id field of the JSON records.
    overwrite: replace a complete output computed with other settings or input.
    progress: print a progress line with throughput and ETA to stderr.
    stop_after_chunks: stop after this many chunks of this call, leaving a resumable partial
      output (for tests of resuming).
    mesh: the `jax.sharding.Mesh` to shard batches over; default every device on its data axis.
      Single-process only: every row is written by this process.

  Returns:
    The `FeaturesResult`.
  """
  # Imported here, not at the top: reading precomputed features (data pipelines) must not need JAX.
  import jax

  from mmcl.models.pretrained import load_text_tower
  from mmcl.parallel import mesh as mesh_lib

  if chunk_size < 1 or batch_size < 1:
    raise ValueError(f"compute_features: chunk_size and batch_size must be ≥ 1, found "
                     f"{chunk_size} and {batch_size}")
  paths = output_paths(output)
  ids, texts = read_text_records(input_dataset, field, id_field=id_field)
  if not ids:
    raise ValueError(f"{input_dataset}: no records to embed")
  pretrained = load_text_tower(tower, max_length=max_length)
  settings = {"format": FORMAT, "model": str(pathlib.Path(tower).resolve()),
              "dim": pretrained.dim, "count": len(ids), "dtype": "float32", "field": field,
              "input": str(pathlib.Path(input_dataset).resolve()),
              "input_sha256": sha256_file(input_dataset), "max_length": pretrained.max_length,
              "normalized": bool(pretrained.tower.normalize)}

  if paths["manifest"].is_file():
    manifest = json.loads(paths["manifest"].read_text())
    if all(manifest.get(k) == v for k, v in settings.items()):
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
                              shape=(len(ids), pretrained.dim)).flush()
    _write_atomic(progress_file, json.dumps({**settings, "rows_done": 0}))

  if mesh is None:
    mesh = mesh_lib.make_mesh()
  sharding = mesh_lib.batch_sharding(mesh)
  params = jax.device_put(pretrained.params, mesh_lib.replicated(mesh))
  n_dev = mesh.shape[mesh_lib.DATA_AXIS]
  batch_size = -(-batch_size // n_dev) * n_dev
  report = _progress_printer(len(ids), progress)
  report(rows_done)
  computed, chunks = 0, 0
  # Absent only when a previous run was interrupted while committing, after all rows were done.
  vectors = (np.lib.format.open_memmap(vectors_file, mode="r+") if rows_done < len(ids) else None)
  while rows_done < len(ids):
    if stop_after_chunks is not None and chunks >= stop_after_chunks:
      return FeaturesResult({**settings, "rows_done": rows_done}, False, computed)
    end = min(rows_done + chunk_size, len(ids))
    vectors[rows_done:end] = pretrained.encode(texts[rows_done:end], batch_size=batch_size,
                                               sharding=sharding, params=params)
    vectors.flush()
    computed += end - rows_done
    rows_done = end
    chunks += 1
    _write_atomic(progress_file, json.dumps({**settings, "rows_done": rows_done}))
    report(rows_done)
  del vectors

  # Commit: data files first, manifest last (its presence marks a complete output). Every step
  # can be repeated, so a run interrupted here finishes the commit when called again.
  _write_atomic(paths["ids"], "".join(f"{i}\n" for i in ids))
  if vectors_file.exists():
    vectors_file.replace(paths["npy"])
  manifest = {**settings, "sha256": sha256_file(paths["npy"]),
              "ids_sha256": sha256_file(paths["ids"])}
  _write_atomic(paths["manifest"], json.dumps(manifest, indent=1))
  shutil.rmtree(partial)
  return FeaturesResult(manifest, True, computed)
