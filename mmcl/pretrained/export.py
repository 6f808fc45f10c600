"""Pretrained towers (local Hugging Face / open_clip folders) as serving functions.

`pretrained_towers(folder, scratch)` turns a folder into the same `TowerExport`s that a trained
task's `export_towers` returns, so `mmcl export --tower FOLDER` writes the same artifact kind as
`mmcl export --workdir DIR`, and `mmcl features` embeds with either alike.

  BERT family (config.json with `model_type` bert / distilbert / roberta / xlm-roberta, see
  `mmcl.pretrained.text`): one tower "text"; input token ids [b, max_len] int32, right-padded
  with pad_id (the attention mask is `ids != pad_id`); the folder's pooling and normalisation are
  inside the artifact. Its tokenizer is written as one tokenizer.json with the truncation to
  max_len built in (and no padding), so a client needs only `Tokenizer.from_file(...).encode`.
  ViT (open_clip_model.safetensors / open_clip_config.json, or a timm model.safetensors with
  `num_heads` given; see `mmcl.pretrained.vit`): one tower "image"; input [b, S, S, 3]
  float32 normalised with the folder's mean / std (open_clip_config.json `preprocess_cfg`,
  else open_clip's CLIP or timm's ImageNet defaults).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.export import exporter  # the artifact writer shared with `mmcl export --workdir`
from mmcl.pretrained import text as text_lib
from mmcl.pretrained import vit as vit_lib
from mmcl.train.task import TowerExport

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class PretrainedTowers:
  """A folder's towers ready to export or to embed with.

  Attributes:
    towers: {"text": ...} or {"image": ...}; each `fn(params, x)` reads `params[name]`.
    params: {name: float32 numpy parameter tree}.
    source: JSON description (folder, kind, model_type / layout, dtype) for manifests.
    config: the folder's model config (config.json or open_clip_config.json), {} if none.
  """
  towers: dict[str, TowerExport]
  params: dict[str, Any]
  source: dict[str, Any]
  config: dict[str, Any]


def folder_kind(folder: str | pathlib.Path) -> str | None:
  """"text" for a BERT-family folder, "image" for an open_clip / timm ViT folder, else None."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return None
  if (folder / "open_clip_model.safetensors").is_file() or (
      folder / "open_clip_config.json").is_file():
    return "image"
  if (folder / "config.json").is_file():
    config = text_lib.read_json(folder / "config.json")
    if isinstance(config, dict) and "model_type" in config:
      return "text"
  return None


def _image_preprocessing(size: int, channels: int, mean, std, layout: str) -> dict[str, Any]:
  mean, std = [float(m) for m in mean], [float(s) for s in std]
  return {
      "input": "image", "layout": "NHWC", "height": size, "width": size, "channels": channels,
      "channel_order": "RGB",
      "source": f"RGB image, shorter side resized to {size} (bilinear) then the central "
                f"{size} x {size} square",
      "formula": "x = (pixel / 255 - mean[c]) / std[c]", "mean": mean, "std": std,
      "as_computed": "x = float32(pixel) * scale[c] - shift[c] in float32",
      "scale": [float(np.float32(1.0 / (255.0 * s))) for s in std],
      "shift": [float(np.float32(m / s)) for m, s in zip(mean, std)],
      "weights_layout": layout}


def pretrained_towers(folder: str | pathlib.Path, scratch: str | pathlib.Path, *,
                      max_length: int = 256, dtype: str = "float32",
                      num_heads: int | None = None) -> PretrainedTowers:
  """The serving towers of a pretrained folder (see the module docstring).

  Args:
    folder: a BERT-family Hugging Face folder or an open_clip / timm ViT folder.
    scratch: an existing folder where files the preprocessing needs are written (the text
      tower's tokenizer.json); keep it until the export is written.
    max_length: text tower: tokens per text (special tokens included), capped by the model.
    dtype: compute dtype, "float32" or "bfloat16" (outputs are float32).
    num_heads: ViT attention heads when open_clip_config.json does not give them.

  Returns:
    The `PretrainedTowers`.
  """
  folder = pathlib.Path(folder)
  kind = folder_kind(folder)
  compute = text_lib.as_dtype(dtype)
  if kind == "text":
    loaded = text_lib.load_text_tower(folder, max_length=max_length, dtype=compute)
    tower, length, pad = loaded.tower, loaded.max_length, loaded.tower.pad_id
    tokenizer_file = pathlib.Path(scratch) / TOKENIZER_FILE
    tokenizer_file.write_text(loaded.tokenizer.to_str(), encoding="utf-8")
    config = text_lib.read_json(folder / "config.json")
    text = TowerExport(
        fn=lambda p, ids: tower.apply({"params": p["text"]}, ids),
        input_spec=jax.ShapeDtypeStruct((1, length), jnp.int32),
        preprocessing={
            "input": "token_ids", "tokenizer": TOKENIZER_FILE,
            "library": "huggingface tokenizers",
            "encode": "Tokenizer.from_file(tokenizer).encode(text).ids: the file's "
                      "post-processor adds the special tokens and its truncation keeps at most "
                      "max_len ids",
            "truncation": "tokenizer", "max_len": length, "pad_id": int(pad),
            "padding": "right-pad with pad_id to max_len (positions holding pad_id are masked)",
            "pooling": tower.pool, "model_type": config["model_type"]},
        files=(str(tokenizer_file),), l2_normalized=bool(tower.normalize))
    source = {"kind": "pretrained", "folder": str(folder.resolve()), "tower": "text",
              "model_type": config["model_type"], "dtype": dtype, "max_length": length}
    return PretrainedTowers({"text": text}, {"text": jax.device_get(loaded.params)}, source,
                            config)
  if kind == "image":
    loaded = vit_lib.load_vit(folder, num_heads=num_heads, dtype=compute)
    config = {}
    mean, std = (CLIP_MEAN, CLIP_STD) if loaded.format == "open_clip" else (IMAGENET_MEAN,
                                                                            IMAGENET_STD)
    if (folder / "open_clip_config.json").is_file():
      config = text_lib.read_json(folder / "open_clip_config.json")
      pre = config.get("preprocess_cfg", {})
      mean, std = pre.get("mean", mean), pre.get("std", std)
    vit, size = loaded.tower, loaded.image_size
    channels = int(loaded.params["patch_embed"]["kernel"].shape[2])
    image = TowerExport(
        fn=lambda p, x: vit.apply({"params": p["image"]}, x),
        input_spec=jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32),
        preprocessing=_image_preprocessing(size, channels, mean, std, loaded.format),
        l2_normalized=False)
    source = {"kind": "pretrained", "folder": str(folder.resolve()), "tower": "image",
              "layout": loaded.format, "dtype": dtype, "image_size": size}
    return PretrainedTowers({"image": image}, {"image": loaded.params}, source, config)
  raise FileNotFoundError(
      f"{folder}: not a pretrained model folder: expected config.json with a 'model_type' "
      f"(BERT family: {text_lib.SUPPORTED_MODEL_TYPES}) or open_clip_model.safetensors / "
      "open_clip_config.json (ViT)")


def export_pretrained(folder: str | os.PathLike, out: str | os.PathLike, *,
                      max_length: int = 256, dtype: str = "float32",
                      num_heads: int | None = None,
                      platforms: Sequence[str] = exporter.DEFAULT_PLATFORMS,
                      overwrite: bool = False, fmt: str = "jax") -> dict[str, Any]:
  """Exports a pretrained folder's tower (`pretrained_towers`) as a serving artifact.

  The same artifact kind as `export_workdir`: `<tower>.jax_exported` with a symbolic batch,
  the files its preprocessing needs (the text tower's tokenizer.json, truncation built in) and
  manifest.json; "task" and "step" are null, "source" names the folder, "config" is its
  config.json (or open_clip_config.json).

  Args:
    folder: a BERT-family Hugging Face folder or an open_clip / timm ViT folder.
    out: output directory; must not exist unless `overwrite`.
    max_length: text tower: tokens per text (the artifact's fixed sequence length).
    dtype: compute dtype, "float32" or "bfloat16".
    num_heads: ViT heads when the folder does not record them.
    platforms: lowering platforms.
    overwrite: replace an existing `out` once the new export is complete.
    fmt: "jax" or "onnx" (as in `mmcl.export.exporter.export_workdir`).

  Returns:
    The manifest (also written to out/manifest.json).
  """
  import tempfile  # pylint: disable=g-import-not-at-top

  exporter._check_format(fmt)

  out = pathlib.Path(out)
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; pass overwrite=True (mmcl export --overwrite) to "
                          "replace it")
  with tempfile.TemporaryDirectory() as scratch:
    loaded = pretrained_towers(folder, scratch, max_length=max_length, dtype=dtype,
                               num_heads=num_heads)

    def write(stage: pathlib.Path) -> dict[str, Any]:
      entries = exporter._write_towers(stage, loaded.towers, loaded.params, platforms=platforms,
                                       owner=str(folder), fmt=fmt)
      return exporter._write_manifest(stage, {"task": None, "step": None, "source": loaded.source,
                                     "towers": entries, "corpus": {}, "config": loaded.config})

    return exporter._staged(out, overwrite, write)
