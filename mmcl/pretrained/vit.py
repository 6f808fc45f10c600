"""Pretrained ViT image towers: open_clip / timm safetensors state dicts → `mmcl.models.vit.ViT`.

Both layouts describe the same pre-LN ViT; they differ in names and a few options:

  open_clip (`VisionTransformer`, keys maybe under "visual." in a full CLIP checkpoint):
    conv1.weight [W, C, p, p] (no bias), class_embedding [W], positional_embedding [T, W],
    ln_pre, transformer.resblocks.{i}.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2,
    mlp.c_fc, mlp.c_proj}, ln_post, proj [W, D] (no bias). LayerNorm eps 1e-5; CLS-token pooling
    (open_clip's default pool_type "tok"); GELU, or QuickGELU for OpenAI's weights.
  timm (`VisionTransformer`):
    patch_embed.proj.{weight, bias}, cls_token [1, 1, W], pos_embed [1, T, W], norm_pre (only when
    pre-normed), blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm,
    head (a classifier). LayerNorm eps 1e-6; GELU.

Mapping onto `ViT`: a missing conv bias loads as zeros, `ln_pre` becomes `pre_norm=True`, and the
projection is open_clip's `proj`; timm's classifier head is dropped and the projection is the
identity (embed_dim = width), so the tower outputs timm's pre-logits features. The number of heads
is not recorded in a state dict: pass it, or keep an open_clip_config.json beside the weights.

Variants that `ViT` does not implement are refused with the offending keys named: layer scale
(ls_1 / ls1), attentional pooling, register tokens, q/k norm, timm's fc_norm (global-average pooling
with a norm after pooling), and position tables without the class token.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmcl.models.layers import Dtype
from mmcl.pretrained.text import Params, PathLike, check_params_match, load_safetensors, read_json
from mmcl.models.vit import ViT

FORMATS = ("open_clip", "timm")
# A key ending (after the prefix) that identifies each layout, and marks its prefix.
_MARKERS = {"open_clip": "conv1.weight", "timm": "patch_embed.proj.weight"}
_UNSUPPORTED = {
    "open_clip": (".ls_1.", ".ls_2.", "attn_pool", ".q_norm.", ".k_norm.", ".ln_inner.",
                  ".ln_attn."),
    "timm": (".ls1.", ".ls2.", "reg_token", ".q_norm.", ".k_norm.", "fc_norm.", "attn_pool"),
}


@dataclasses.dataclass(frozen=True)
class PretrainedViT:
  """A loaded image tower.

  Attributes:
    tower: the `ViT` module.
    params: its "params" collection (float32 numpy arrays).
    image_size: the side (pixels) of the square images the position table was trained for.
    format: "open_clip" or "timm".
  """
  tower: ViT
  params: Params
  image_size: int
  format: str


def detect_format(state: Mapping[str, np.ndarray]) -> tuple[str, str]:
  """Returns (format, key prefix) of a ViT state dict, e.g. ("open_clip", "visual.").

  Raises:
    ValueError: when neither layout's patch-embedding tensor is found exactly once.
  """
  found = []
  for fmt, marker in _MARKERS.items():
    for key in state:
      if key.endswith(marker) and (key == marker or key[: -len(marker)].endswith(".")):
        found.append((fmt, key[: -len(marker)]))
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one patch-embedding tensor ('*conv1.weight' for open_clip or "
        f"'*patch_embed.proj.weight' for timm), found {[p + _MARKERS[f] for f, p in found]}")
  return found[0]


def _f32(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, dtype=np.float32)


def _qkv(weight: np.ndarray, bias: np.ndarray | None, heads: int) -> dict[str, np.ndarray]:
  """Fused torch in-projection [3W, W] (+ [3W]) → kernel [W, 3, heads, Dh] and bias [3, heads, Dh].

  torch rows are (q | k | v), each W = heads·Dh rows head-major: the same order as the reshape.
  """
  width = weight.shape[1]
  if weight.shape != (3 * width, width):
    raise ValueError(f"qkv weight: expected shape {(3 * width, width)}, found {weight.shape}")
  if width % heads:
    raise ValueError(f"width {width} is not divisible by num_heads={heads}")
  dh = width // heads
  if bias is None:
    bias = np.zeros(3 * width, np.float32)
  return {"kernel": _f32(weight).T.reshape(width, 3, heads, dh),
          "bias": _f32(bias).reshape(3, heads, dh)}


def _out(weight: np.ndarray, bias: np.ndarray, heads: int) -> dict[str, np.ndarray]:
  """torch out-projection [W, W] → kernel [heads, Dh, W]."""
  width = weight.shape[0]
  return {"kernel": _f32(weight).T.reshape(heads, width // heads, width), "bias": _f32(bias)}


def _dense(weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
  return {"kernel": _f32(weight).T, "bias": _f32(bias)}


def _depth(keys: list[str], block_prefix: str) -> int:
  indices = {int(k[len(block_prefix):].split(".", 1)[0])
             for k in keys if k.startswith(block_prefix)}
  if not indices or indices != set(range(max(indices) + 1)):
    raise ValueError(f"expected blocks '{block_prefix}0.' … numbered without gaps, found "
                     f"{sorted(indices)}")
  return len(indices)


def vit_from_state_dict(state: Mapping[str, np.ndarray], *, num_heads: int,
                        activation: str | None = None, dtype: Dtype = jnp.float32,
                        where: str = "state dict", **overrides: Any) -> PretrainedViT:
  """Converts an open_clip or timm ViT state dict into a `ViT` and its parameters.

  Args:
    state: {name: array}, e.g. from `mmcl.pretrained.text.load_safetensors`; a full open_clip
      CLIP checkpoint works too (its "visual." tensors are used).
    num_heads: attention heads (not recorded in the weights).
    activation: feed-forward activation; default "gelu" ("quick_gelu" for OpenAI CLIP weights).
    dtype: compute dtype of the tower.
    where: the weights' file, for error messages.
    **overrides: further `ViT` attributes (dropout, remat, attention_implementation, ...).

  Returns:
    The `PretrainedViT`; `tower.apply({"params": params}, images)` takes images [B, S, S, C] with
    S = image_size (float, normalised as the checkpoint expects) and returns [B, D] float32.
  """
  fmt, prefix = detect_format(state)
  # Tensors outside the prefix (a full CLIP checkpoint's text tower, under no prefix, beside
  # "visual.") are not the image tower's.
  sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  bad = sorted(k for k in sub if any(u in "." + k for u in _UNSUPPORTED[fmt]))
  if bad:
    raise ValueError(f"{where}: ViT variant not supported by mmcl.models.vit.ViT (tensors "
                     f"{bad[:6]})")
  where = f"{where} ({fmt} layout, prefix {prefix!r})"
  try:
    if fmt == "open_clip":
      converted = _convert_open_clip(sub, num_heads, where)
    else:
      converted = _convert_timm(sub, num_heads, where)
  except KeyError as e:
    raise KeyError(f"{where}: tensor {e.args[0]!r} not found") from None
  params, config, used = converted
  unused = sorted(set(sub) - used)
  if unused:
    raise ValueError(f"{where}: tensors the ViT does not use: {unused[:8]}")
  config.update(overrides)
  if activation is not None:
    config["activation"] = activation
  tower = ViT(dtype=dtype, num_heads=num_heads, **config)
  tokens = params["pos_embed"]["pos_embedding"].shape[0]
  grid = math.isqrt(tokens - 1)
  if grid * grid != tokens - 1:
    raise ValueError(f"{where}: {tokens - 1} patch positions do not form a square grid")
  image_size = grid * tower.patch_size
  channels = params["patch_embed"]["kernel"].shape[2]
  check_params_match(tower, params, jnp.zeros((1, image_size, image_size, channels), jnp.float32),
                     where=where)
  return PretrainedViT(tower, params, image_size, fmt)


def _encoder_blocks(get, depth: int, heads: int, names: Mapping[str, str]) -> dict[str, Any]:
  blocks = {}
  for i in range(depth):
    n = {k: v.format(i=i) for k, v in names.items()}
    blocks[f"block_{i}"] = {
        "ln_attn": get.ln(n["ln1"]),
        "attn": {"qkv": _qkv(get(n["qkv_w"]), get.opt(n["qkv_b"]), heads),
                 "out": _out(get(n["out"] + ".weight"), get(n["out"] + ".bias"), heads)},
        "ln_mlp": get.ln(n["ln2"]),
        "mlp": {"fc1": _dense(get(n["fc1"] + ".weight"), get(n["fc1"] + ".bias")),
                "fc2": _dense(get(n["fc2"] + ".weight"), get(n["fc2"] + ".bias"))},
    }
  return blocks


class _Getter:
  """Reads tensors by name and records which were read."""

  def __init__(self, state: Mapping[str, np.ndarray]):
    self.state, self.used = state, set()

  def __call__(self, name: str) -> np.ndarray:
    value = self.state[name]
    self.used.add(name)
    return value

  def opt(self, name: str) -> np.ndarray | None:
    return self(name) if name in self.state else None

  def ln(self, name: str) -> dict[str, np.ndarray]:
    return {"scale": _f32(self(f"{name}.weight")), "bias": _f32(self(f"{name}.bias"))}


def _patch_embed(weight: np.ndarray, bias: np.ndarray | None) -> dict[str, np.ndarray]:
  """torch Conv2d weight [W, C, p, p] (NCHW) → Flax Conv kernel [p, p, C, W] (NHWC)."""
  if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
    raise ValueError(f"patch embedding: expected a square conv weight [W, C, p, p], found "
                     f"{weight.shape}")
  if bias is None:
    bias = np.zeros(weight.shape[0], np.float32)
  return {"kernel": _f32(weight).transpose(2, 3, 1, 0), "bias": _f32(bias)}


def _convert_open_clip(sub: Mapping[str, np.ndarray], heads: int, where: str):
  g = _Getter(sub)
  conv = g("conv1.weight")
  width = conv.shape[0]
  depth = _depth(list(sub), "transformer.resblocks.")
  params: Params = {
      "patch_embed": _patch_embed(conv, g.opt("conv1.bias")),
      "cls": _f32(g("class_embedding")).reshape(1, 1, width),
      "pos_embed": {"pos_embedding": _f32(g("positional_embedding"))},
      "encoder": _encoder_blocks(g, depth, heads, {
          "ln1": "transformer.resblocks.{i}.ln_1", "ln2": "transformer.resblocks.{i}.ln_2",
          "qkv_w": "transformer.resblocks.{i}.attn.in_proj_weight",
          "qkv_b": "transformer.resblocks.{i}.attn.in_proj_bias",
          "out": "transformer.resblocks.{i}.attn.out_proj",
          "fc1": "transformer.resblocks.{i}.mlp.c_fc",
          "fc2": "transformer.resblocks.{i}.mlp.c_proj"}),
  }
  pre_norm = "ln_pre.weight" in sub
  if pre_norm:
    params["ln_pre"] = g.ln("ln_pre")
  params["encoder"]["ln_final"] = g.ln("ln_post")
  proj = g.opt("proj")
  if proj is None:
    proj = np.eye(width, dtype=np.float32)
  params["head"] = {"proj": {"kernel": _f32(proj)}}
  mlp_dim = params["encoder"]["block_0"]["mlp"]["fc1"]["kernel"].shape[1]
  config = dict(patch_size=conv.shape[2], width=width, depth=depth, mlp_dim=mlp_dim,
                embed_dim=proj.shape[1], pool="cls", pre_norm=pre_norm, layer_norm_eps=1e-5)
  return params, config, g.used


def _convert_timm(sub: Mapping[str, np.ndarray], heads: int, where: str):
  g = _Getter(sub)
  conv = g("patch_embed.proj.weight")
  width = conv.shape[0]
  depth = _depth(list(sub), "blocks.")
  pos = _f32(g("pos_embed"))
  pos = pos.reshape(pos.shape[-2], width)
  has_cls = "cls_token" in sub
  n_patches = pos.shape[0] - (1 if has_cls else 0)
  if math.isqrt(n_patches) ** 2 != n_patches:
    raise ValueError(f"{where}: pos_embed has {pos.shape[0]} rows, which is not a square patch "
                     f"grid{' plus the class token' if has_cls else ''} (timm's no_embed_class "
                     "layout is not supported)")
  params: Params = {
      "patch_embed": _patch_embed(conv, g.opt("patch_embed.proj.bias")),
      "pos_embed": {"pos_embedding": pos},
      "encoder": _encoder_blocks(g, depth, heads, {
          "ln1": "blocks.{i}.norm1", "ln2": "blocks.{i}.norm2",
          "qkv_w": "blocks.{i}.attn.qkv.weight",
          "qkv_b": "blocks.{i}.attn.qkv.bias", "out": "blocks.{i}.attn.proj",
          "fc1": "blocks.{i}.mlp.fc1", "fc2": "blocks.{i}.mlp.fc2"}),
  }
  if has_cls:
    params["cls"] = _f32(g("cls_token")).reshape(1, 1, width)
  pre_norm = "norm_pre.weight" in sub
  if pre_norm:
    params["ln_pre"] = g.ln("norm_pre")
  params["encoder"]["ln_final"] = g.ln("norm")
  # The classifier is not an embedding projection: drop it, output the pre-logits features.
  for name in ("head.weight", "head.bias"):
    g.opt(name)
  params["head"] = {"proj": {"kernel": np.eye(width, dtype=np.float32)}}
  mlp_dim = params["encoder"]["block_0"]["mlp"]["fc1"]["kernel"].shape[1]
  config = dict(patch_size=conv.shape[2], width=width, depth=depth, mlp_dim=mlp_dim,
                embed_dim=width, pool="cls" if has_cls else "gap", pre_norm=pre_norm,
                layer_norm_eps=1e-6)
  return params, config, g.used


def load_vit(path: PathLike, *, num_heads: int | None = None, activation: str | None = None,
             dtype: Dtype = jnp.float32, **overrides: Any) -> PretrainedViT:
  """Loads an open_clip or timm ViT from a safetensors file or a folder holding one.

  Args:
    path: a `.safetensors` file, or a folder with `open_clip_model.safetensors` or
      `model.safetensors` (sharded index supported).
    num_heads: attention heads. Default: from `open_clip_config.json` beside the weights
      (`model_cfg.vision_cfg`: width / head_width, head_width 64 unless stated); required otherwise.
    activation: feed-forward activation; default from open_clip_config.json (`quick_gelu`) or
      "gelu".
    dtype: compute dtype.
    **overrides: further `ViT` attributes.

  Returns:
    The `PretrainedViT`.
  """
  path = pathlib.Path(path)
  folder = path if path.is_dir() else path.parent
  weights = path
  if path.is_dir() and (path / "open_clip_model.safetensors").is_file():
    weights = path / "open_clip_model.safetensors"
  state = load_safetensors(weights)
  oc_config = folder / "open_clip_config.json"
  if oc_config.is_file():
    model_cfg = read_json(oc_config).get("model_cfg", {})
    vision = model_cfg.get("vision_cfg", {})
    if num_heads is None and "width" in vision:
      num_heads = int(vision["width"]) // int(vision.get("head_width", 64))
    if activation is None and model_cfg.get("quick_gelu"):
      activation = "quick_gelu"
  if num_heads is None:
    raise ValueError(f"load_vit: {weights} does not record the number of attention heads; pass "
                     "num_heads (e.g. width // 64 for most ViTs, 16 for ViT-H/14)")
  return vit_from_state_dict(state, num_heads=num_heads, activation=activation, dtype=dtype,
                             where=str(weights), **overrides)
