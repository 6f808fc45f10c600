"""`mmcl export`: a trained checkpoint's (or a pretrained folder's) towers as serving artifacts.

For each tower the task names (`Task.export_towers`), the tower's forward pass with the weights
embedded is lowered with `jax.export` to a serialized StableHLO module whose batch dimension is
symbolic ("b"), so one artifact serves any batch size. A serving stack needs only `jax` (or any
StableHLO runtime that reads `jax.export` serializations) to call it:

  exported = jax.export.deserialize(open("image.jax_exported", "rb").read())
  embeddings = exported.call(x)          # x: the manifest's input shape with any b

`mmcl.pretrained.export.export_pretrained` does the same for a local pretrained folder (`mmcl
export --tower FOLDER`): the same files, with "task" and "step" null and "source" naming
the folder.

Output directory (written under a temporary name, renamed into place when complete):

  manifest.json          format "mmcl.export/1": per tower its artifact, inputs (name, shape with
                         "b", dtype), output (dim, dtype, L2 normalisation), preprocessing and
                         the files it needs; the training config; sha256 and size of every file
  <tower>.jax_exported   serialized jax.export.Exported (`Exported.serialize()`)
  <tower>.onnx           with --format onnx: the same tower as an ONNX model (symbolic batch "b"),
                         checked against JAX with ONNX Runtime (`mmcl.export.onnx_artifacts`)
  tokenizer.json, ...    files named by a tower's preprocessing (copied)
  corpus/<name>.npy      with --corpus: [N, D] float32 embeddings of the task's corpus
  corpus/<name>.ids.txt  N lines, line i the id of row i
  corpus/<name>.faiss    with --index faiss[:flat|ivf|hnsw]: a FAISS index of the rows, checked
                         against the evaluator's exact top-k (`mmcl.export.index`)
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import uuid
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mmcl.train.task import CorpusExport, Task, TowerExport

FORMAT = "mmcl.export/1"
MANIFEST = "manifest.json"
ARTIFACT_SUFFIX = ".jax_exported"
DEFAULT_PLATFORMS = ("cpu", "cuda")
BATCH_DIM = "b"
FORMATS = ("jax", "onnx")


class ExportError(ValueError):
  """An export that cannot be made as asked (format, index, conversion); `mmcl export` exits 2."""


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def export_tower(tower: TowerExport, params: Any, *,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
  """Lowers `tower.fn(params, x)` with the weights embedded and a symbolic batch dimension.

  Args:
    tower: the tower; `tower.input_spec` is an example input [1, ...].
    params: parameters closed over (so embedded as constants), e.g. host numpy arrays.
    platforms: lowering platforms; the artifact runs on any of them.

  Returns:
    The `jax.export.Exported`; its input is [b, ...] with b symbolic, its output [b, D].
  """
  spec = tower.input_spec
  if len(spec.shape) < 1:
    raise ValueError(f"export_tower: input_spec must have a leading batch axis, got shape "
                     f"{spec.shape}")
  dims = ", ".join([BATCH_DIM] + [str(int(d)) for d in spec.shape[1:]])
  arg = jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), spec.dtype)
  exported = jax.export.export(jax.jit(lambda x: tower.fn(params, x)),
                               platforms=tuple(platforms))(arg)
  if len(exported.out_avals) != 1 or len(exported.out_avals[0].shape) != 2:
    raise ValueError(f"export_tower: the tower must return one [b, D] array, got "
                     f"{[a.shape for a in exported.out_avals]}")
  return exported


def _shape_json(shape) -> list:
  """Symbolic dims as their names ("b"), fixed ones as ints."""
  return [d if isinstance(d, int) else str(d) for d in shape]


def _restore(workdir: pathlib.Path, step: int | None, resolve_task):
  """(config, task, step, params on this process's mesh) of a `mmcl train` workdir."""
  # Imported here: the export of a task module pulls in only what it needs.
  from mmcl.workdir import TrainedWorkdir
  from mmcl.eval import finite as finite_lib
  wd = TrainedWorkdir(workdir, resolve_task=resolve_task)
  try:
    step, params = wd.restore_usable_params(step)
    finite_lib.require_finite_params(params, f"checkpoint step {step}: parameters")
  finally:
    wd.close()
  return wd.config, wd.task, step, params


def _check_corpus(name: str, corpus: CorpusExport, towers: dict[str, dict]) -> np.ndarray:
  from mmcl.eval import finite as finite_lib
  emb = np.asarray(corpus.embeddings, np.float32)
  finite_lib.require_scorable({f"corpus {name!r} ({corpus.tower} tower)": emb})
  if corpus.tower not in towers:
    raise ValueError(f"export_corpus()[{name!r}]: tower {corpus.tower!r} is not among the "
                     f"exported towers {sorted(towers)}")
  dim = towers[corpus.tower]["output"]["dim"]
  if emb.ndim != 2 or emb.shape[1] != dim:
    raise ValueError(f"export_corpus()[{name!r}]: expected embeddings [N, {dim}] (the "
                     f"{corpus.tower} tower's output), got {emb.shape}")
  if len(corpus.ids) != emb.shape[0]:
    raise ValueError(f"export_corpus()[{name!r}]: {len(corpus.ids)} ids for {emb.shape[0]} rows")
  if len(set(corpus.ids)) != len(corpus.ids) or any("\n" in i for i in corpus.ids):
    raise ValueError(f"export_corpus()[{name!r}]: ids must be unique and contain no newline")
  return emb


def _staged(out: pathlib.Path, overwrite: bool, write) -> dict[str, Any]:
  """Runs `write(stage)` in a temporary sibling of `out`, then renames it to `out`."""
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite=True (mmcl export --overwrite) to "
                          "replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  stage = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  stage.mkdir()
  try:
    manifest = write(stage)
    if out.exists():
      shutil.rmtree(out)
    os.replace(stage, out)
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    raise
  return manifest


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike, *,
                   step: int | None = None, corpus: bool = False,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS,
                   overwrite: bool = False, fmt: str = "jax",
                   index: str | None = None, resolve_task=None) -> dict[str, Any]:
  """Exports every tower of a `mmcl train` workdir's checkpoint (and optionally its corpus).

  `resolve_task(task.name)` is the workdir's `Task` subclass (the CLI passes
  `mmcl.tasks.get_task_class`); required.

  Args:
    workdir: the training workdir (config.json + checkpoints/).
    out: output directory (see the module docstring); must not exist unless `overwrite`.
    step: checkpoint step; default the newest finished one.
    corpus: also write the task's corpus embeddings (`Task.export_corpus`) with their ids.
    platforms: platforms the artifacts are lowered for (any subset of cpu, cuda, rocm, tpu).
    overwrite: replace an existing `out` once the new export is complete.
    fmt: "jax" (the `jax.export` artifacts) or "onnx" (those plus `<tower>.onnx`, each checked
      against JAX with ONNX Runtime at batch 1 and 7).
    index: with `corpus`, "faiss" or "faiss:flat|ivf|hnsw": a FAISS index of each corpus.

  Returns:
    The manifest (also written to out/manifest.json).
  """
  from mmcl.export import index as index_lib  # pylint: disable=g-import-not-at-top
  workdir, out = pathlib.Path(workdir), pathlib.Path(out)
  _check_format(fmt)
  index_kind = index_lib.parse_index_spec(index)
  if index_kind is not None and not corpus:
    raise ExportError("--index builds an index of the exported corpus: pass --corpus with it")
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite=True (mmcl export --overwrite) to "
                          "replace it")
  if resolve_task is None:
    raise ValueError("export_workdir: pass resolve_task (e.g. mmcl.tasks.get_task_class), the "
                     "function that names the workdir's Task class")
  config, task, step, params = _restore(workdir, step, resolve_task)
  return export_task(task, params, out, step=step, corpus=corpus, platforms=platforms,
                     overwrite=overwrite, fmt=fmt, index=index,
                     source={"source_workdir": str(workdir.absolute())})


def export_task(task: Task, params: Any, out: str | os.PathLike, *, step: int | None = None,
                corpus: bool = False, platforms: Sequence[str] = DEFAULT_PLATFORMS,
                overwrite: bool = False, fmt: str = "jax", index: str | None = None,
                source: dict[str, Any] | None = None) -> dict[str, Any]:
  """Exports a task's towers (and corpus) for given parameters: what `export_workdir` writes after
  restoring the checkpoint, also callable on parameters held in memory.

  Args:
    task: the task (its config is recorded in the manifest).
    params: its parameters (device or host arrays).
    out, corpus, platforms, overwrite, fmt, index: as in `export_workdir`.
    step: the checkpoint step recorded in the manifest (None: not from a checkpoint).
    source: extra manifest fields naming where the parameters came from.

  Returns:
    The manifest (also written to out/manifest.json).
  """
  from mmcl.export import index as index_lib  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(out)
  _check_format(fmt)
  index_kind = index_lib.parse_index_spec(index)
  if index_kind is not None and not corpus:
    raise ExportError("--index builds an index of the exported corpus: pass --corpus with it")
  config = task.config
  host_params = jax.device_get(params)
  towers = task.export_towers(host_params)
  if not towers:
    raise ValueError(f"{type(task).__name__}.export_towers() returned no tower")

  def write(stage: pathlib.Path) -> dict[str, Any]:
    entries = _write_towers(stage, towers, host_params, platforms=platforms,
                            owner=f"{type(task).__name__}.export_towers()", fmt=fmt)
    corpus_entries = (_write_corpus(stage, task, params, entries, index_kind=index_kind,
                                    seed=int(config.seed)) if corpus else {})
    return _write_manifest(stage, {
        "task": config.task.name, "step": None if step is None else int(step),
        **(source or {}), "towers": entries,
        "corpus": corpus_entries, "config": json.loads(config.to_json())})

  return _staged(out, overwrite, write)


def _write_towers(stage: pathlib.Path, towers: dict[str, TowerExport], host_params, *,
                  platforms: Sequence[str], owner: str, fmt: str = "jax") -> dict[str, dict]:
  """Writes `<tower>.jax_exported` (and `<tower>.onnx` for fmt "onnx") and the preprocessing
  files; returns the manifest entries."""
  tower_entries: dict[str, dict] = {}
  copied: dict[str, str] = {}  # base name -> source, so two towers cannot clash on a name
  for name, tower in towers.items():
    if not isinstance(tower, TowerExport):
      raise TypeError(f"{owner}[{name!r}] must be a TowerExport, got {type(tower).__name__}")
    exported = export_tower(tower, host_params, platforms=platforms)
    artifact = f"{name}{ARTIFACT_SUFFIX}"
    (stage / artifact).write_bytes(exported.serialize())
    files = []
    for src in tower.files:
      src = pathlib.Path(src)
      if not src.is_file():
        raise FileNotFoundError(f"{src} (a preprocessing file of tower {name!r}) not found")
      if src.name in copied and sha256_file(copied[src.name]) != sha256_file(src):
        raise ValueError(f"towers need two different files named {src.name}: {copied[src.name]} "
                         f"and {src}")
      copied[src.name] = str(src)
      shutil.copyfile(src, stage / src.name)
      files.append(src.name)
    (out_aval,) = exported.out_avals
    (in_aval,) = exported.in_avals
    tower_entries[name] = {
        "artifact": artifact,
        "serialization": "jax.export.Exported.serialize() (StableHLO); load with "
                         "jax.export.deserialize(bytes) and call .call(x)",
        "calling_convention_version": exported.calling_convention_version,
        "platforms": list(exported.platforms),
        "inputs": [{"name": tower.preprocessing.get("input", name),
                    "shape": _shape_json(in_aval.shape), "dtype": str(in_aval.dtype)}],
        "output": {"shape": _shape_json(out_aval.shape), "dim": int(out_aval.shape[1]),
                   "dtype": str(out_aval.dtype), "l2_normalized": bool(tower.l2_normalized),
                   "similarity": "inner product" + (" (= cosine)" if tower.l2_normalized
                                                    else "")},
        "preprocessing": tower.preprocessing,
        "files": files,
    }
    if fmt == "onnx":
      from mmcl.export import onnx_artifacts  # pylint: disable=g-import-not-at-top
      model, entry = onnx_artifacts.onnx_entry(name, tower, host_params,
                                               tower_entries[name]["inputs"][0]["name"])
      (stage / entry["artifact"]).write_bytes(model)
      tower_entries[name]["onnx"] = entry
  return tower_entries


def _write_corpus(stage: pathlib.Path, task: Task, params, tower_entries: dict[str, dict], *,
                  index_kind: str | None = None, seed: int = 0) -> dict[str, dict]:
  corpus_entries: dict[str, dict] = {}
  (stage / "corpus").mkdir()
  for name, item in task.export_corpus(params).items():
    emb = _check_corpus(name, item, tower_entries)
    query_tower = item.query_tower or item.tower
    if query_tower not in tower_entries:
      raise ValueError(f"export_corpus()[{name!r}]: query tower {query_tower!r} is not among the "
                       f"exported towers {sorted(tower_entries)}")
    np.save(stage / "corpus" / f"{name}.npy", emb)
    (stage / "corpus" / f"{name}.ids.txt").write_text("".join(f"{i}\n" for i in item.ids),
                                                      encoding="utf-8")
    corpus_entries[name] = {"tower": item.tower, "query_tower": query_tower,
                            "embeddings": f"corpus/{name}.npy",
                            "ids": f"corpus/{name}.ids.txt", "count": int(emb.shape[0]),
                            "dim": int(emb.shape[1]), "dtype": "float32",
                            "description": item.description}
    if index_kind is not None:
      corpus_entries[name]["index"] = _write_index(stage, name, emb, item, index_kind, seed)
  return corpus_entries


def _write_index(stage: pathlib.Path, name: str, emb: np.ndarray, item: CorpusExport,
                 kind: str, seed: int) -> dict[str, Any]:
  """Builds, checks and writes corpus/<name>.faiss; returns its manifest entry."""
  from mmcl.eval import finite as finite_lib  # pylint: disable=g-import-not-at-top
  from mmcl.export import index as index_lib  # pylint: disable=g-import-not-at-top
  index, params = index_lib.build_index(emb, kind, seed=seed)
  if item.queries is not None:
    queries = np.asarray(item.queries, np.float32)
    finite_lib.require_scorable({f"test queries of corpus {name!r}": queries})
    if queries.ndim != 2 or queries.shape[1] != emb.shape[1]:
      raise ValueError(f"export_corpus()[{name!r}]: queries must be [Q, {emb.shape[1]}], got "
                       f"{queries.shape}")
    source = f"the task's test queries ({item.query_tower or item.tower} tower)"
  else:
    queries, source = emb, "the corpus's own rows"
  check = index_lib.check_index(index, kind, emb, queries)
  check["queries_source"] = source
  path = f"corpus/{name}{index_lib.INDEX_SUFFIX}"
  index_lib.write_index(index, stage / path)
  return {"library": "faiss", "kind": kind, "file": path, "metric": "inner_product",
          "params": params, "check": check}


def _write_manifest(stage: pathlib.Path, fields: dict[str, Any]) -> dict[str, Any]:
  """Adds format, versions and every file's sha256 to `fields`; writes stage/manifest.json."""
  files = {}
  for path in sorted(p for p in stage.rglob("*") if p.is_file()):
    rel = path.relative_to(stage).as_posix()
    files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
  manifest = {"format": FORMAT, "jax_version": jax.__version__, "batch_dimension": BATCH_DIM,
              **fields, "files": files}
  tmp = stage / f".{MANIFEST}.tmp"
  tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  os.replace(tmp, stage / MANIFEST)
  return manifest


def verify_export(out: str | os.PathLike) -> dict[str, Any]:
  """Checks an export directory against its manifest (format, every file's size and sha256).

  Returns:
    The manifest.

  Raises:
    FileNotFoundError / ValueError naming the file that is missing or differs.
  """
  out = pathlib.Path(out)
  path = out / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: not a (complete) `mmcl export` directory")
  manifest = json.loads(path.read_text(encoding="utf-8"))
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  for rel, entry in manifest["files"].items():
    file = out / rel
    if not file.is_file():
      raise FileNotFoundError(f"{file} (listed in {path}) not found")
    if file.stat().st_size != entry["bytes"] or sha256_file(file) != entry["sha256"]:
      raise ValueError(f"{file}: size or sha256 differs from {path}")
  return manifest
