"""Image transforms for encoded images (JPEG/PNG/WebP bytes): decode + random-resized-crop (or
center crop) + horizontal flip + normalisation, on the host.

Cost model: decoding dominates, so crop and resize happen inside the decode — PIL's JPEG `draft`
mode decodes at 1/2, 1/4 or 1/8 scale when the crop allows it, and `Image.resize(box=...)` crops
and resizes in one pass. Box sampling, flips and normalisation are vectorised over the batch.

Random-resized-crop follows torchvision's `RandomResizedCrop.get_params` (Szegedy et al. 2015,
"Going deeper with convolutions", §6): up to 10 tries of an area fraction uniform in `scale` and
an aspect ratio log-uniform in `ratio`; the first box that fits is placed uniformly; if none fits,
the central crop with the ratio clamped to `ratio`. Every draw is a pure function of (seed,
epoch, record index) (`permutation.uniform`).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

from data_pipelines import permutation

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_CROP_STREAM = 0x43726F70
_FLIP_STREAM = 0x466C6970
_ATTEMPTS = 10
_RESAMPLE = Image.Resampling.BILINEAR


def open_image(data: bytes) -> Image.Image:
  """A lazily decoded PIL image (header parsed); ValueError naming the problem otherwise."""
  try:
    im = Image.open(io.BytesIO(data))
    im.size  # noqa: B018 — header parsed by open(); fail early on garbage
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
    raise ValueError(f"image decode failed ({type(e).__name__}: {e})") from None
  return im


def random_resized_crop_boxes(heights: np.ndarray, widths: np.ndarray, *, seed: int, epoch: int,
                              indices: np.ndarray, scale: tuple[float, float] = (0.08, 1.0),
                              ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Crop boxes of torchvision's RandomResizedCrop, vectorised over a batch.

  Args:
    heights, widths: [b] int image sizes.
    seed, epoch: randomness key; indices: [b] int64 record indices.
    scale: range of the crop's area fraction; ratio: range of its aspect ratio w/h.

  Returns:
    boxes: [b, 4] float64 (left, top, right, bottom) in pixels, integer-valued.
  """
  h = np.asarray(heights, np.float64)[:, None]
  w = np.asarray(widths, np.float64)[:, None]
  u = permutation.uniform(seed, _CROP_STREAM, epoch, np.asarray(indices, np.int64)[:, None, None],
                          np.arange(_ATTEMPTS)[None, :, None], np.arange(4)[None, None, :])
  area = h * w * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
  log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
  aspect = np.exp(log_r)
  cw = np.round(np.sqrt(area * aspect))
  ch = np.round(np.sqrt(area / aspect))
  fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
  first = np.argmax(fits, axis=1)
  rows = np.arange(len(first))
  ok = fits[rows, first]
  cw, ch = cw[rows, first], ch[rows, first]
  top = np.floor(u[rows, first, 2] * (h[:, 0] - ch + 1))
  left = np.floor(u[rows, first, 3] * (w[:, 0] - cw + 1))
  # Fallback: central crop with the aspect ratio clamped into `ratio`.
  in_ratio = w[:, 0] / h[:, 0]
  fw = np.where(in_ratio < ratio[0], w[:, 0], np.where(in_ratio > ratio[1],
                                                        np.round(h[:, 0] * ratio[1]), w[:, 0]))
  fh = np.where(in_ratio < ratio[0], np.round(w[:, 0] / ratio[0]), h[:, 0])
  cw, ch = np.where(ok, cw, fw), np.where(ok, ch, fh)
  top = np.where(ok, top, (h[:, 0] - ch) // 2)
  left = np.where(ok, left, (w[:, 0] - cw) // 2)
  return np.stack([left, top, left + cw, top + ch], axis=1)


def center_crop_boxes(heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
  """The central square of side min(H, W) — "resize shorter side, then center crop".

  Returns: boxes [b, 4] float64 (left, top, right, bottom)."""
  h = np.asarray(heights, np.float64)
  w = np.asarray(widths, np.float64)
  side = np.minimum(h, w)
  left, top = (w - side) // 2, (h - side) // 2
  return np.stack([left, top, left + side, top + side], axis=1)


def decode_crop_resize(im: Image.Image, box: Sequence[float], size: int, *,
                       flip: bool = False) -> np.ndarray:
  """Decodes the `box` region of an opened image and resizes it to size × size RGB.

  Args:
    im: from `open_image` (not yet decoded).
    box: (left, top, right, bottom) in the image's full-resolution pixels.
    size: output side S.
    flip: mirror the result left–right (cheaper here than on the batch array).

  Returns:
    [S, S, 3] uint8. Raises ValueError when the pixel data is corrupt or truncated.
  """
  left, top, right, bottom = (float(v) for v in box)
  try:
    if im.format == "JPEG":
      full_w, full_h = im.size
      # Ask for the smallest DCT scale that keeps the crop at >= S pixels on each side.
      req = (max(1, math.ceil(full_w * size / max(right - left, 1))),
             max(1, math.ceil(full_h * size / max(bottom - top, 1))))
      im.draft("RGB", req)
      sx, sy = im.size[0] / full_w, im.size[1] / full_h
      left, right, top, bottom = left * sx, right * sx, top * sy, bottom * sy
    if im.mode != "RGB":
      im = im.convert("RGB")
    out = im.resize((size, size), _RESAMPLE, box=(left, top, right, bottom))
    if flip:
      out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(out)
  except Exception as e:  # Truncated / corrupt data surfaces here, when pixels are decoded.
    raise ValueError(f"image decode failed ({type(e).__name__}: {e})") from None
  if arr.shape != (size, size, 3) or arr.dtype != np.uint8:
    raise ValueError(f"decoded image has {arr.dtype} {list(arr.shape)}, expected uint8 "
                     f"[{size}, {size}, 3]")
  return arr


def flip_mask(*, seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
  """[b] bool: flip example b horizontally (probability 1/2, keyed per record)."""
  return permutation.uniform(seed, _FLIP_STREAM, epoch, np.asarray(indices, np.int64)) < 0.5


def flip_horizontal(images: np.ndarray, flip: np.ndarray) -> np.ndarray:
  """images: [b, H, W, C]; flip: [b] bool → images with the flagged rows mirrored left–right."""
  out = images.copy()
  out[flip] = images[flip, :, ::-1]
  return out


def normalize(images: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """images: [b, H, W, 3] uint8 → [b, H, W, 3] float32, (x / 255 - mean) / std per channel.

  A 256-entry table per channel, gathered with `np.take` into the output: one pass over the
  output instead of convert + multiply + subtract (~20% faster at 224 px).
  """
  if images.dtype != np.uint8 or images.ndim < 1 or images.shape[-1] != len(mean):
    raise ValueError(f"normalize expects uint8 [..., {len(mean)}], got {images.dtype} "
                     f"{list(images.shape)}")
  scale = np.asarray([1.0 / (255.0 * s) for s in std], np.float32)
  shift = np.asarray([m / s for m, s in zip(mean, std)], np.float32)
  table = np.arange(256, dtype=np.float32)[:, None] * scale - shift  # [256, C]
  out = np.empty(images.shape, np.float32)
  for c in range(images.shape[-1]):
    np.take(table[:, c], images[..., c], out=out[..., c])
  return out
