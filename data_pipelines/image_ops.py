"""Image transforms for encoded images (JPEG/PNG/WebP bytes): decode + random-resized-crop (or
center crop) + horizontal flip on the host, as uint8; the mean/std normalisation runs on the device
(`normalize` is its host reference, used where features are computed on the host).

Decoders, chosen by measurement (BENCHMARKS.md, "Decoders"; `experiments/bench/decoders.py`):
  * JPEG (baseline or progressive; grayscale, YCbCr or RGB): libjpeg-turbo through `simplejpeg`,
    with DCT-domain scaling — the decoder outputs the image at the smallest of the scales 1/8,
    1/4, 1/2, 1 that keeps the crop at >= S pixels on both sides, so a web-size photo whose crop
    is resized to 224 px is never decoded at full size — and the fast integer IDCT (as tf.data
    decodes). Only these four scales: libjpeg-turbo has SIMD code for them, while the others
    (3/8, 5/8, 6/8, 7/8) run scalar C and take longer than a full-size decode (BENCHMARKS.md,
    "Host input pipeline").
  * anything else Pillow opens (PNG, WebP, CMYK JPEG, ...): Pillow (with `draft` scaling, the same
    four scales, for JPEG), the "pillow" path; `open_image(..., decoder="pillow")` forces it.
Both paths then cut the crop box out of the decoded pixels (edges rounded to whole decoded
pixels) and resize it with OpenCV (`crop_resize`): bilinear when the crop is less than twice S on
both sides (always the case after DCT scaling; bilinear's 2 × 2 footprints then cover every
input pixel, so none is skipped), `INTER_AREA` — the average over each output pixel's footprint
— when it is larger (images decoded at full size, e.g. PNG). Training and the evaluator's center
crop use this same function, so their resize quality is the same. The crop box (the
augmentation's meaning) does not depend on the decoder.

Random-resized-crop follows torchvision's `RandomResizedCrop.get_params` (Szegedy et al. 2015,
"Going deeper with convolutions", §6): up to 10 tries of an area fraction uniform in `scale` and
an aspect ratio log-uniform in `ratio`; the first box that fits is placed uniformly; if none fits,
the central crop with the ratio clamped to `ratio`. Every draw is a pure function of (seed,
epoch, record index) (`permutation.uniform`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import os
from typing import Callable, Sequence, TypeVar

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from data_pipelines import permutation

T = TypeVar("T")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DECODERS = ("auto", "pillow")
_CROP_STREAM = 0x43726F70
_FLIP_STREAM = 0x466C6970
_ATTEMPTS = 10
# JPEG colour spaces libjpeg-turbo converts to RGB itself (CMYK / YCCK go through Pillow).
_TURBO_COLORSPACES = ("Gray", "YCbCr", "RGB")
# DCT scales n/8 the JPEG path decodes at: the ones libjpeg-turbo runs with SIMD code.
_JPEG_SCALES = (1, 2, 4, 8)
cv2.setNumThreads(1)  # one decode per input thread: OpenCV's own pool would only oversubscribe


@dataclasses.dataclass
class OpenedImage:
  """An encoded image whose header has been parsed (pixels not yet decoded).

  Attributes:
    data: the encoded bytes.
    size: (width, height) in full-resolution pixels.
    pil: the lazily decoded Pillow image on the Pillow path; None on the libjpeg-turbo path.
  """
  data: bytes
  size: tuple[int, int]
  pil: Image.Image | None = None


def open_image(data: bytes, *, decoder: str = "auto") -> OpenedImage:
  """Parses the header of an encoded image; ValueError naming the problem otherwise.

  decoder: "auto" (libjpeg-turbo for the JPEGs it can convert to RGB, Pillow for the rest) or
  "pillow" (Pillow for every image).
  """
  if decoder not in DECODERS:
    raise ValueError(f"open_image: decoder must be one of {DECODERS}, got {decoder!r}")
  data = bytes(data)
  if decoder == "auto" and data[:3] == b"\xff\xd8\xff":
    try:
      height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception as e:  # noqa: BLE001 — libjpeg-turbo refuses the header: report it
      raise ValueError(f"image decode failed ({type(e).__name__}: {e})") from None
    if colorspace in _TURBO_COLORSPACES:
      return OpenedImage(data, (int(width), int(height)))
  try:
    im = Image.open(io.BytesIO(data))
    size = im.size  # header parsed by open(); fail early on garbage
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
    raise ValueError(f"image decode failed ({type(e).__name__}: {e})") from None
  return OpenedImage(data, size, im)


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


def _decode_pixels(im: OpenedImage, box: Sequence[float], size: int
                   ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
  """Decodes at the smallest DCT scale that keeps the box >= size px; returns the [h, w, 3] uint8
  pixels and the box in their coordinates."""
  left, top, right, bottom = (float(v) for v in box)
  full_w, full_h = im.size
  # The smallest decoded size that keeps the crop at >= `size` pixels on each side.
  need_w = min(full_w, max(1, math.ceil(full_w * size / max(right - left, 1))))
  need_h = min(full_h, max(1, math.ceil(full_h * size / max(bottom - top, 1))))
  if im.pil is None:
    # The smallest of the SIMD-accelerated scales n/8, n in (1, 2, 4, 8), that gives that size
    # (libjpeg rounds scaled sides up). fastdct: libjpeg-turbo's fast integer IDCT (JDCT_IFAST,
    # tf.data's default as well); chroma upsampling stays the smooth one.
    n = next((n for n in _JPEG_SCALES if math.ceil(full_w * n / 8) >= need_w
              and math.ceil(full_h * n / 8) >= need_h), 8)
    arr = simplejpeg.decode_jpeg(im.data, colorspace="RGB", min_height=math.ceil(full_h * n / 8),
                                 min_width=math.ceil(full_w * n / 8), fastdct=True)
  else:
    pil = im.pil
    if pil.format == "JPEG":
      pil.draft("RGB", (need_w, need_h))
    if pil.mode != "RGB":
      pil = pil.convert("RGB")
    arr = np.asarray(pil)
  sx, sy = arr.shape[1] / full_w, arr.shape[0] / full_h
  return arr, (left * sx, top * sy, right * sx, bottom * sy)


def crop_resize(pixels: np.ndarray, box: Sequence[float], size: int, *,
                flip: bool = False) -> np.ndarray:
  """Cuts `box` out of decoded pixels and resizes it to size × size.

  Bilinear (OpenCV INTER_LINEAR) when the crop is less than 2S on both sides: each output pixel
  then blends the 2 × 2 pixels around its centre and the centres are under 2 pixels apart, so
  every input pixel contributes — what an area average adds over it at these ratios is small
  (BENCHMARKS.md, "Host input pipeline") and costs 6-9× the time. INTER_AREA (the average over
  each output pixel's footprint) when the crop is 2S or more on a side.

  Args:
    pixels: [h, w, 3] uint8.
    box: (left, top, right, bottom) in the pixels' coordinates; edges are rounded to whole pixels
      (at least one pixel wide and high).
    size: output side S.
    flip: mirror the result left–right.

  Returns:
    [S, S, 3] uint8.
  """
  h, w = pixels.shape[:2]
  left, top, right, bottom = (int(round(float(v))) for v in box)
  left, top = min(max(left, 0), w - 1), min(max(top, 0), h - 1)
  right, bottom = min(max(right, left + 1), w), min(max(bottom, top + 1), h)
  large = max(right - left, bottom - top) >= 2 * size
  out = cv2.resize(pixels[top:bottom, left:right], (size, size),
                   interpolation=cv2.INTER_AREA if large else cv2.INTER_LINEAR)
  return cv2.flip(out, 1) if flip else out


def decode_crop_resize(im: OpenedImage, box: Sequence[float], size: int, *,
                       flip: bool = False) -> np.ndarray:
  """Decodes the `box` region of an opened image and resizes it to size × size RGB.

  Args:
    im: from `open_image` (not yet decoded), or a PIL image.
    box: (left, top, right, bottom) in the image's full-resolution pixels.
    size: output side S.
    flip: mirror the result left–right.

  Returns:
    [S, S, 3] uint8. Raises ValueError when the pixel data is corrupt or truncated.
  """
  if isinstance(im, Image.Image):
    im = OpenedImage(b"", im.size, im)
  try:
    pixels, scaled = _decode_pixels(im, box, size)
    arr = crop_resize(pixels, scaled, size, flip=flip)
  except Exception as e:  # Truncated / corrupt data surfaces here, when pixels are decoded.
    raise ValueError(f"image decode failed ({type(e).__name__}: {e})") from None
  if arr.shape != (size, size, 3) or arr.dtype != np.uint8:
    raise ValueError(f"decoded image has {arr.dtype} {list(arr.shape)}, expected uint8 "
                     f"[{size}, {size}, 3]")
  return arr


def decode_threads(requested: int, *, worker_count: int = 0) -> int:
  """Threads that decode one batch's images: `requested` when > 0; else (0 = auto) one per CPU
  core this process may run on, at most 16; with grain worker processes (`worker_count` = W > 0)
  each worker's share, ceil(cores / W), but at least 2 — with one thread per batch the workers
  kept fewer cores busy than the threads of W = 0 did (BENCHMARKS.md, "Host input pipeline")."""
  if requested < 0:
    raise ValueError(f"decode_threads must be >= 0 (0 = auto), got {requested}")
  if requested:
    return requested
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  cores = max(1, min(cores or 1, 16))
  return max(2, -(-cores // worker_count)) if worker_count > 0 else cores


def map_threaded(fn: Callable[[int], T], rows: Sequence[int], threads: int) -> list[T]:
  """[fn(r) for r in rows], run in `threads` threads when that is > 1 (results in row order).

  For per-image work that releases the GIL (libjpeg-turbo, Pillow, OpenCV); the pool lives for
  one call (starting a thread costs ~0.1 ms, a batch's decode tens of ms)."""
  if threads <= 1 or len(rows) <= 1:
    return [fn(r) for r in rows]
  with concurrent.futures.ThreadPoolExecutor(min(threads, len(rows))) as pool:
    return list(pool.map(fn, rows))


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
