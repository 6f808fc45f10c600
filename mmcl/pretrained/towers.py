"""The towers `mmcl features` embeds with, behind one interface, placed on a device mesh.

`load_feature_tower(spec, mesh=...)` accepts:
  * a BERT-family Hugging Face folder (`mmcl.pretrained.text`): a text tower, batches sorted by
    length and padded to a multiple of 32 tokens;
  * an open_clip / timm ViT folder (`mmcl.pretrained.export`): an image tower;
  * a `mmcl train` workdir, `WORKDIR` with `tower_name=` or `WORKDIR:NAME` (NAME one of the
    task's `export_towers`, e.g. "text" / "image"; `step` default the newest checkpoint): the
    trained tower with the preprocessing its export describes (the dataset's tokenizer.json and
    max_len for text, the image size and normalisation for images);
  * an `mmcl export` directory (`DIR` or `DIR:NAME`): the serialized artifact, run per device
    with `shard_map` (weights as exported; `dtype` cannot change).
Pretrained and trained weights are placed on the mesh by the trainer's sharding rules
(`mmcl.parallel.sharding`, strategy `param_sharding`); every batch is sharded over the mesh's data
axis. `dtype="bfloat16"` computes in bf16 (pretrained folders and trained workdirs); outputs are
float32 [N, D].

Raw values: texts are str; images are encoded bytes (JPEG / PNG / WebP, the `image_bytes`
record kind) or uint8 [H, W, C] arrays (the `png_image` kind); both are resized so the shorter side
is the tower's size, centre-cropped (as the evaluation pipelines do) and normalised with the
tower's mean / std.
"""

from __future__ import annotations

import abc
import json
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mmcl.parallel import mesh as mesh_lib

KINDS = ("text", "image")


class FeatureTower(abc.ABC):
  """A tower that embeds raw values in batches over a mesh.

  Attributes:
    kind: "text" (values are str) or "image" (encoded bytes or uint8 [H, W, C] arrays).
    dim: output width D.
    normalized: whether output rows have unit L2 norm.
    description: JSON description of the tower (source, path, name, step, dtype, input settings)
      that identifies its outputs (a resumed `mmcl features` run must match it).
  """
  kind: str
  dim: int
  normalized: bool
  description: dict[str, Any]

  @abc.abstractmethod
  def encode(self, values: Sequence[Any], *, batch_size: int,
             where: Callable[[int], str] = str) -> np.ndarray:
    """values: N raw values → [N, D] float32, in order; `where(i)` names value i in errors."""


# --- image preprocessing --------------------------------------------------------------------------
def images_to_uint8(values: Sequence[Any], size: int, *, channels: int = 3,
                    where: Callable[[int], str] = str) -> np.ndarray:
  """Decodes, resizes (shorter side → size) and centre-crops images.

  Args:
    values: N encoded images (bytes) or uint8 arrays [H, W, C] (C = 1 or 3).
    size: output side S.
    channels: C of the output (3: RGB).
    where: row → a name for error messages (e.g. the record id).

  Returns:
    [N, S, S, C] uint8.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from data_pipelines import image_ops  # pylint: disable=g-import-not-at-top

  out = np.empty((len(values), size, size, channels), np.uint8)
  for row, value in enumerate(values):
    try:
      if isinstance(value, (bytes, bytearray, memoryview)):
        im = image_ops.open_image(bytes(value))
      elif isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        if value.shape[:2] == (size, size) and value.ndim == 3 and value.shape[2] == channels:
          out[row] = value
          continue
        im = Image.fromarray(value[..., 0] if value.ndim == 3 and value.shape[2] == 1 else value)
      else:
        raise ValueError(f"expected encoded image bytes or a uint8 [H, W, C] array, found "
                         f"{type(value).__name__} {getattr(value, 'shape', '')}")
      box = image_ops.center_crop_boxes(np.asarray([im.size[1]]), np.asarray([im.size[0]]))[0]
      out[row] = image_ops.decode_crop_resize(im, box, size)
    except ValueError as e:
      raise ValueError(f"{where(row)}: {e}") from None
  return out


def normalize_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float]
                     ) -> np.ndarray:
  """images: [N, S, S, C] uint8 → float32 (pixel / 255 - mean[c]) / std[c] (as the pipelines)."""
  from data_pipelines import image_ops  # pylint: disable=g-import-not-at-top
  return image_ops.normalize(images, mean, std)


# --- token preprocessing for fixed-length towers --------------------------------------------------
class _Preprocess:
  """Raw values → the fixed-shape input array a `TowerExport` describes (its `preprocessing`)."""

  def __init__(self, preprocessing: dict[str, Any], input_shape: Sequence[int],
               files: dict[str, pathlib.Path], where: str):
    self.pre, self.shape = preprocessing, tuple(int(d) for d in input_shape)
    kind = preprocessing.get("input")
    if kind == "image":
      self.kind = "image"
    elif kind == "token_ids":
      from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
      self.kind = "text"
      name = preprocessing["tokenizer"]
      if name not in files:
        raise FileNotFoundError(f"{where}: the tokenizer file {name!r} its preprocessing names "
                                f"is not among its files {sorted(files)}")
      self.tokenizer = Tokenizer.from_file(str(files[name]))
      self.tokenizer.no_padding()
      self.eos_id = None if preprocessing.get("truncation") == "tokenizer" else int(
          preprocessing["eos_id"])
    else:
      raise ValueError(f"{where}: preprocessing input {kind!r} is not supported by mmcl "
                       "features (expected 'image' or 'token_ids')")

  def settings(self) -> dict[str, Any]:
    if self.kind == "image":
      return {"image_size": self.shape[0], "mean": list(self.pre["mean"]),
              "std": list(self.pre["std"])}
    return {"max_length": int(self.pre["max_len"])}

  def __call__(self, values: Sequence[Any], where: Callable[[int], str] = str) -> np.ndarray:
    if self.kind == "image":
      size, channels = self.shape[0], self.shape[2]
      pixels = images_to_uint8(values, size, channels=channels, where=where)
      if self.pre.get("normalized_in_model"):  # the tower normalises uint8 pixels itself
        return pixels
      return normalize_images(pixels, self.pre["mean"], self.pre["std"])
    for i, text in enumerate(values):
      if not isinstance(text, str):
        raise TypeError(f"{where(i)}: a {type(text).__name__}, expected a str")
    ids = [e.ids for e in self.tokenizer.encode_batch(list(values))]
    from data_pipelines import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    # A longer list keeps its first L − 1 ids and the tower's EOS (mmcl's trained text towers), or
    # is cut after L ids when there is none (a tokenizer that truncates by itself).
    return tokenizer_lib.pad_or_truncate(ids, self.shape[0], pad_id=int(self.pre["pad_id"]),
                                         last_id=self.eos_id)


class _FixedShapeTower(FeatureTower):
  """fn(x [B, ...]) → [B, D] over inputs of one fixed shape, batches sharded on the mesh."""

  def __init__(self, fn: Callable[[jax.Array], jax.Array], preprocess: _Preprocess, *,
               dim: int, normalized: bool, mesh: Mesh, description: dict[str, Any]):
    self.fn, self.preprocess, self.mesh = fn, preprocess, mesh
    self.kind, self.dim, self.normalized = preprocess.kind, dim, normalized
    self.description = {**description, **preprocess.settings()}

  def encode(self, values: Sequence[Any], *, batch_size: int,
             where: Callable[[int], str] = str) -> np.ndarray:
    n_dev = self.mesh.shape[mesh_lib.DATA_AXIS]
    batch_size = -(-batch_size // n_dev) * n_dev
    sharding = mesh_lib.batch_sharding(self.mesh)
    out = np.zeros((len(values), self.dim), np.float32)
    for start in range(0, len(values), batch_size):
      x = self.preprocess(values[start:start + batch_size],
                          lambda row, start=start: where(start + row))
      n = x.shape[0]
      # Every batch has the same shape (one compilation): the last one is padded with copies
      # of its first row, whose outputs are dropped.
      if n < batch_size:
        x = np.concatenate([x, np.repeat(x[:1], batch_size - n, axis=0)])
      out[start:start + n] = np.asarray(self.fn(jax.device_put(x, sharding)))[:n]
    return out


class _BertFeatureTower(FeatureTower):
  """A BERT-family folder: length-sorted batches (`PretrainedTextTower.encode`)."""

  def __init__(self, folder: pathlib.Path, *, max_length: int, dtype: str, mesh: Mesh,
               param_sharding: str):
    from mmcl.pretrained import text as pretrained  # pylint: disable=g-import-not-at-top
    self.pretrained = pretrained.load_text_tower(folder, max_length=max_length, dtype=dtype)
    self.params = pretrained.place_params(self.pretrained.params, mesh, param_sharding)
    self.sharding = mesh_lib.batch_sharding(mesh)
    self.kind, self.dim = "text", self.pretrained.dim
    self.normalized = bool(self.pretrained.tower.normalize)
    self.description = {"source": "pretrained", "path": str(folder.resolve()), "tower": "text",
                        "dtype": dtype, "max_length": self.pretrained.max_length}

  def encode(self, values: Sequence[Any], *, batch_size: int,
             where: Callable[[int], str] = str) -> np.ndarray:
    del where  # texts cannot fail to tokenise
    n_dev = len(self.sharding.device_set)
    return self.pretrained.encode(values, batch_size=-(-batch_size // n_dev) * n_dev,
                                  sharding=self.sharding, params=self.params)


# --- resolving a --tower argument -----------------------------------------------------------------
def split_spec(spec: str | pathlib.Path, tower_name: str | None) -> tuple[pathlib.Path, str | None]:
  """"PATH:NAME" → (PATH, NAME) when PATH exists; a plain PATH keeps `tower_name`."""
  text = str(spec)
  path = pathlib.Path(text)
  if not path.exists() and ":" in text:
    head, name = text.rsplit(":", 1)
    if pathlib.Path(head).exists() and name:
      if tower_name is not None and tower_name != name:
        raise ValueError(f"--tower {text!r} names tower {name!r} but --tower-name is "
                         f"{tower_name!r}")
      return pathlib.Path(head), name
  return path, tower_name


def _choose(names: Sequence[str], name: str | None, where: str) -> str:
  if name is None:
    if len(names) != 1:
      raise ValueError(f"{where} has towers {sorted(names)}: choose one with --tower-name NAME "
                       "(or PATH:NAME)")
    return names[0]
  if name not in names:
    raise ValueError(f"{where} has no tower {name!r}; its towers: {sorted(names)}")
  return name


def load_feature_tower(spec: str | pathlib.Path, *, mesh: Mesh | None = None,
                       tower_name: str | None = None, step: int | None = None,
                       max_length: int = 256, dtype: str = "float32",
                       param_sharding: str = "replicate", resolve_task=None) -> FeatureTower:
  """Resolves a `--tower` argument (see the module docstring) into a `FeatureTower`.

  Args:
    spec: folder / workdir / export directory, optionally ":NAME".
    mesh: devices to run on; default every device on the data axis (a workdir's tower runs on
      the mesh its parameters are restored to: every local device).
    tower_name: which tower of a workdir or export ("text", "image", ...).
    step: workdir checkpoint step (default the newest).
    max_length: BERT-family folders: tokens per text (trained towers use their own max_len).
    dtype: "float32" or "bfloat16" compute (not for export directories, which are fixed).
    param_sharding: "replicate" or "fsdp" for pretrained weights (trained ones keep the
      workdir's rules).
    resolve_task: task.name → `Task` subclass (`mmcl.tasks.get_task_class`); needed for a
      workdir's tower only.

  Returns:
    The `FeatureTower`.
  """
  from mmcl.pretrained import export as pretrained_export  # pylint: disable=g-import-not-at-top
  from mmcl.pretrained.text import as_dtype  # pylint: disable=g-import-not-at-top

  as_dtype(dtype)  # validates the spelling
  path, name = split_spec(spec, tower_name)
  if not path.is_dir():
    raise FileNotFoundError(f"--tower {spec}: expected a model folder, a `mmcl train` workdir or "
                            "an `mmcl export` directory; not a directory")
  if mesh is None:
    mesh = mesh_lib.make_mesh()
  if (path / "manifest.json").is_file():
    return _export_tower(path, name, mesh, dtype)
  if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
    if resolve_task is None:
      raise ValueError(f"--tower {spec} is a `mmcl train` workdir: pass resolve_task (e.g. "
                       "mmcl.tasks.get_task_class) to build its task")
    return _workdir_tower(path, name, step, dtype, resolve_task)
  kind = pretrained_export.folder_kind(path)
  if kind is not None and name is not None and name != kind:
    raise ValueError(f"{path} holds one {kind} tower; --tower-name {name!r} does not name it")
  if kind == "text":
    return _BertFeatureTower(path, max_length=max_length, dtype=dtype, mesh=mesh,
                             param_sharding=param_sharding)
  if kind == "image":
    from mmcl.pretrained.text import place_params  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as scratch:
      loaded = pretrained_export.pretrained_towers(path, scratch, dtype=dtype)
    tower = loaded.towers["image"]
    params = place_params(loaded.params, mesh, param_sharding)
    fn = jax.jit(tower.fn)
    out_dim = jax.eval_shape(tower.fn, loaded.params, tower.input_spec).shape[1]
    return _FixedShapeTower(lambda x: fn(params, x),
                            _Preprocess(tower.preprocessing, tower.input_spec.shape[1:], {},
                                        str(path)),
                            dim=out_dim, normalized=tower.l2_normalized, mesh=mesh,
                            description={**loaded.source, "source": "pretrained",
                                         "path": loaded.source["folder"]})
  raise FileNotFoundError(
      f"--tower {path}: not a model folder (config.json with 'model_type', or open_clip "
      "weights), a `mmcl train` workdir (config.json + checkpoints/) or an `mmcl export` "
      "directory (manifest.json)")


def _workdir_tower(path: pathlib.Path, name: str | None, step: int | None,
                   dtype: str, resolve_task) -> FeatureTower:
  """A trained tower: the workdir's checkpoint, its task's `export_towers` entry."""
  from mmcl.workdir import TrainedWorkdir  # pylint: disable=g-import-not-at-top

  wd = TrainedWorkdir(path, resolve_task=resolve_task)
  try:
    # sharded by the workdir's own rules on wd.mesh; the newest usable step when step is None
    step, params = wd.restore_usable_params(step)
  finally:
    wd.close()
  task = wd.task
  if dtype != wd.config.train.compute_dtype:
    wd.config.override(f"train.compute_dtype={dtype}")
    task = wd.task_class(wd.config, wd.mesh)
  towers = task.export_towers(params)
  name = _choose(list(towers), name, f"workdir {path} (task {wd.config.task.name!r})")
  tower = towers[name]
  files = {pathlib.Path(f).name: pathlib.Path(f) for f in tower.files}
  preprocess = _Preprocess(tower.preprocessing, tower.input_spec.shape[1:], files,
                           f"{path} tower {name!r}")
  fn = jax.jit(tower.fn)
  dim = jax.eval_shape(tower.fn, params, tower.input_spec).shape[1]
  # The parameters live on the workdir's mesh (every local device), so the batches go there too.
  return _FixedShapeTower(lambda x: fn(params, x), preprocess, dim=dim,
                          normalized=tower.l2_normalized, mesh=wd.mesh,
                          description={"source": "workdir", "path": str(path.resolve()),
                                       "tower": name, "step": int(step),
                                       "task": wd.config.task.name, "dtype": dtype})


def _export_tower(path: pathlib.Path, name: str | None, mesh: Mesh, dtype: str
                  ) -> FeatureTower:
  """An `mmcl export` artifact, checked against its manifest, run per device under shard_map."""
  from mmcl.export import verify_export  # pylint: disable=g-import-not-at-top

  manifest = verify_export(path)
  name = _choose(list(manifest["towers"]), name, f"export {path}")
  entry = manifest["towers"][name]
  exported_dtype = (manifest.get("source") or {}).get("dtype") or (
      (manifest.get("config") or {}).get("train", {}).get("compute_dtype", "float32"))
  if dtype != exported_dtype:
    raise ValueError(f"{path}: the {name!r} artifact computes in {exported_dtype}; its dtype "
                     f"cannot change (asked for {dtype}): export again with that dtype")
  exported = jax.export.deserialize(bytearray((path / entry["artifact"]).read_bytes()))
  (spec,) = entry["inputs"]
  files = {f: path / f for f in entry["files"]}
  preprocess = _Preprocess(entry["preprocessing"], spec["shape"][1:], files,
                           f"{path} tower {name!r}")
  # The artifact is lowered for one device with a symbolic batch: each device runs it on its
  # slice of the batch.
  per_device = jax.jit(jax.shard_map(exported.call, mesh=mesh,
                                     in_specs=P(mesh_lib.DATA_AXIS),
                                     out_specs=P(mesh_lib.DATA_AXIS)))
  return _FixedShapeTower(per_device, preprocess, dim=int(entry["output"]["dim"]),
                          normalized=bool(entry["output"]["l2_normalized"]), mesh=mesh,
                          description={"source": "export", "path": str(path.resolve()),
                                       "tower": name, "dtype": exported_dtype,
                                       "sha256": manifest["files"][entry["artifact"]]["sha256"]})


def description_json(tower: FeatureTower) -> str:
  """A canonical JSON string of `tower.description` (for comparisons)."""
  return json.dumps(tower.description, sort_keys=True)
