"""Decode + random-resized-crop + resize of JPEG photos with each candidate library, one thread.

  PYTHONPATH=. .venv/bin/python experiments/bench/decoders.py [--cache /tmp/mmcl_peers] [--rounds 5]

Every candidate turns (JPEG bytes, crop box, flip) into the same [224, 224, 3] uint8 crop, with
the crop boxes of `data_pipelines.image_ops.random_resized_crop_boxes` (scale 0.08-1, ratio 3/4-4/3)
over the two photo sets of `photo_sets.py`; the candidates run in alternated order each round and
the script prints the median examples/s per core of each, the machine's load, and the mean
absolute pixel difference of each candidate's crops from Pillow's (same boxes; a check that all of
them compute the same crop):

  pillow          PIL.Image.draft (DCT scaling to 1/2, 1/4, 1/8) + resize(box=...) bilinear with
                  antialiasing (mmcl's decoder before this comparison)
  mmcl            `image_ops.open_image` + `decode_crop_resize` as the pipelines call them now
                  (simplejpeg with DCT scaling to 1/8, 1/4, 1/2 or 1 + cv2.resize, bilinear
                  below a 2x shrink, INTER_AREA above)
  mmcl-any-scale-area  the same before: DCT scaling to any n/8, then INTER_AREA always
  simplejpeg      simplejpeg.decode_jpeg with min_height/min_width (libjpeg-turbo DCT scaling to
                  any n/8) + cv2.resize (INTER_AREA when shrinking, INTER_LINEAR when enlarging)
  turbojpeg       PyTurboJPEG decode with scaling_factor (n/8) + cv2.resize as above
  turbojpeg-crop  PyTurboJPEG lossless crop to the box (MCU-aligned) + scaled decode + cv2.resize
  opencv          cv2.imdecode with IMREAD_REDUCED_COLOR_2/4/8 + cv2.resize as above
"""
from __future__ import annotations

import argparse
import io
import json
import math
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from data_pipelines import image_ops  # noqa: E402

SIZE = 224


def _resize_cv2(arr, box, size):
  import cv2  # pylint: disable=g-import-not-at-top
  left, top, right, bottom = box
  crop = arr[int(round(top)):max(int(round(bottom)), int(round(top)) + 1),
             int(round(left)):max(int(round(right)), int(round(left)) + 1)]
  shrink = crop.shape[0] > size or crop.shape[1] > size
  return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if shrink else
                    cv2.INTER_LINEAR)


def _scaled_box(box, full_w, full_h, w, h):
  sx, sy = w / full_w, h / full_h
  left, top, right, bottom = box
  return left * sx, top * sy, right * sx, bottom * sy


def pillow(data, box, flip):
  """mmcl's decoder before the comparison: PIL draft + resize(box=...) bilinear (antialiased)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = Image.open(io.BytesIO(data))
  left, top, right, bottom = (float(v) for v in box)
  full_w, full_h = im.size
  im.draft("RGB", (max(1, math.ceil(full_w * SIZE / max(right - left, 1))),
                   max(1, math.ceil(full_h * SIZE / max(bottom - top, 1)))))
  sx, sy = im.size[0] / full_w, im.size[1] / full_h
  im = im.convert("RGB") if im.mode != "RGB" else im
  out = im.resize((SIZE, SIZE), Image.Resampling.BILINEAR,
                  box=(left * sx, top * sy, right * sx, bottom * sy))
  if flip:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def mmcl(data, box, flip):
  return image_ops.decode_crop_resize(image_ops.open_image(data), box, SIZE, flip=flip)


def mmcl_any_scale_area(data, box, flip):
  """mmcl's JPEG path before it kept to the SIMD DCT scales: the smallest of all eight n/8
  scales (fast IDCT), then INTER_AREA whatever the ratio."""
  import cv2  # pylint: disable=g-import-not-at-top
  import simplejpeg  # pylint: disable=g-import-not-at-top
  h, w, _, _ = simplejpeg.decode_jpeg_header(data)
  left, top, right, bottom = box
  arr = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True,
                               min_height=min(h, math.ceil(h * SIZE / max(bottom - top, 1))),
                               min_width=min(w, math.ceil(w * SIZE / max(right - left, 1))))
  l, t, r, b = (int(round(v)) for v in _scaled_box(box, w, h, arr.shape[1], arr.shape[0]))
  out = cv2.resize(arr[t:max(b, t + 1), l:max(r, l + 1)], (SIZE, SIZE),
                   interpolation=cv2.INTER_AREA)
  return out[:, ::-1] if flip else out


def _tj_factor(full, crop, factors):
  """Smallest n/8 (among `factors`) keeping the crop >= SIZE on both sides."""
  best = (1, 1)
  for num, den in sorted(factors, key=lambda f: f[0] / f[1]):
    if num / den <= 1 and all(c * num / den >= SIZE for c in crop):
      return num, den
  return best


def simplejpeg_(data, box, flip):
  import simplejpeg  # pylint: disable=g-import-not-at-top
  h, w, _, _ = simplejpeg.decode_jpeg_header(data)
  left, top, right, bottom = box
  # min_height/min_width: the largest DCT downscale that keeps the crop >= SIZE pixels.
  min_w = math.ceil(w * SIZE / max(right - left, 1))
  min_h = math.ceil(h * SIZE / max(bottom - top, 1))
  arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=min(min_h, h),
                               min_width=min(min_w, w))
  out = _resize_cv2(arr, _scaled_box(box, w, h, arr.shape[1], arr.shape[0]), SIZE)
  return out[:, ::-1] if flip else out


_TJ = None


def _tj():
  global _TJ  # pylint: disable=global-statement
  if _TJ is None:
    import turbojpeg  # pylint: disable=g-import-not-at-top
    _TJ = turbojpeg.TurboJPEG()
  return _TJ


def turbojpeg_(data, box, flip):
  import turbojpeg  # pylint: disable=g-import-not-at-top
  tj = _tj()
  w, h, _, _ = tj.decode_header(data)
  left, top, right, bottom = box
  factor = _tj_factor((w, h), (right - left, bottom - top), tj.scaling_factors)
  arr = tj.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=factor)
  out = _resize_cv2(arr, _scaled_box(box, w, h, arr.shape[1], arr.shape[0]), SIZE)
  return out[:, ::-1] if flip else out


def turbojpeg_crop(data, box, flip):
  import turbojpeg  # pylint: disable=g-import-not-at-top
  tj = _tj()
  w, h, sub, _ = tj.decode_header(data)
  left, top, right, bottom = (int(round(v)) for v in box)
  # Lossless crops start on an MCU boundary: widen the box to it, keep the offset.
  mcu_w, mcu_h = {turbojpeg.TJSAMP_444: (8, 8), turbojpeg.TJSAMP_422: (16, 8),
                  turbojpeg.TJSAMP_420: (16, 16), turbojpeg.TJSAMP_GRAY: (8, 8),
                  turbojpeg.TJSAMP_440: (8, 16), turbojpeg.TJSAMP_411: (32, 8)}.get(sub, (16, 16))
  x0, y0 = left // mcu_w * mcu_w, top // mcu_h * mcu_h
  cropped = tj.crop(data, x0, y0, right - x0, bottom - y0)
  factor = _tj_factor((right - x0, bottom - y0), (right - left, bottom - top), tj.scaling_factors)
  arr = tj.decode(cropped, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=factor)
  f = factor[0] / factor[1]
  local = ((left - x0) * f, (top - y0) * f, (right - x0) * f, (bottom - y0) * f)
  out = _resize_cv2(arr, local, SIZE)
  return out[:, ::-1] if flip else out


def opencv(data, box, flip):
  import cv2  # pylint: disable=g-import-not-at-top
  import simplejpeg  # header parse only  # pylint: disable=g-import-not-at-top
  h, w, _, _ = simplejpeg.decode_jpeg_header(data)
  left, top, right, bottom = box
  scale = 1
  for s in (8, 4, 2):
    if (right - left) / s >= SIZE and (bottom - top) / s >= SIZE:
      scale = s
      break
  flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
          8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
  arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
  arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
  out = _resize_cv2(arr, _scaled_box(box, w, h, arr.shape[1], arr.shape[0]), SIZE)
  return out[:, ::-1] if flip else out


CANDIDATES = {"pillow": pillow, "mmcl": mmcl, "mmcl-any-scale-area": mmcl_any_scale_area,
              "simplejpeg": simplejpeg_, "turbojpeg": turbojpeg_,
              "turbojpeg-crop": turbojpeg_crop, "opencv": opencv}


def _inputs(root: pathlib.Path, count: int):
  files = sorted((root / "images").glob("*.jpg"))[:count]
  datas = [f.read_bytes() for f in files]
  sizes = [image_ops.open_image(d).size for d in datas]
  boxes = image_ops.random_resized_crop_boxes(np.asarray([s[1] for s in sizes]),
                                              np.asarray([s[0] for s in sizes]), seed=0, epoch=0,
                                              indices=np.arange(len(datas)))
  flips = image_ops.flip_mask(seed=0, epoch=0, indices=np.arange(len(datas)))
  return datas, boxes, flips


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cache", default="/tmp/mmcl_peers")
  p.add_argument("--count", type=int, default=256)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--only", nargs="*", default=None)
  args = p.parse_args()
  names = args.only or list(CANDIDATES)
  for photo_set in ("small", "web"):
    datas, boxes, flips = _inputs(pathlib.Path(args.cache) / photo_set, args.count)
    ref = [pillow(d, b, bool(f)) for d, b, f in zip(datas, boxes, flips)]
    diffs = {}
    for name in names:  # warm-up + agreement with Pillow
      got = [CANDIDATES[name](d, b, bool(f)) for d, b, f in zip(datas, boxes, flips)]
      assert all(g.shape == (SIZE, SIZE, 3) and g.dtype == np.uint8 for g in got), name
      diffs[name] = round(float(np.mean([np.abs(g.astype(np.int16) - r).mean()
                                         for g, r in zip(got, ref)])), 2)
    times = {n: [] for n in names}
    loads = []
    for r in range(args.rounds):
      for name in (names if r % 2 == 0 else names[::-1]):
        fn = CANDIDATES[name]
        start = time.perf_counter()
        for d, b, f in zip(datas, boxes, flips):
          fn(d, b, bool(f))
        times[name].append(time.perf_counter() - start)
      loads.append(open("/proc/loadavg").read().split()[0])
    for name in names:
      t = statistics.median(times[name])
      print(json.dumps({"set": photo_set, "decoder": name,
                        "examples_per_s_per_core": round(len(datas) / t, 1),
                        "rounds_per_s": [round(len(datas) / x, 1) for x in times[name]],
                        "mean_abs_diff_vs_pillow": diffs[name], "loadavg": loads}), flush=True)


if __name__ == "__main__":
  main()
