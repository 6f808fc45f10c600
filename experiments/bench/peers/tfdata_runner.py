"""A big_vision-style tf.data input pipeline over the photo set's TFRecords, timed.

Runs in its own virtual environment (tensorflow-cpu), created by `experiments/bench/data.py
--peers`:

  python tfdata_runner.py PHOTO_SET_DIR --batches 40 --warmup 3 [--uint8]

The pipeline is big_vision's `decode_jpeg_and_inception_crop` + `flip_lr` + `value_range` (with
CLIP mean/std here, matching mmcl's normalisation), as its configs run it: sample_distorted_bounding_box
(area 0.08-1, aspect 3/4-4/3) on the JPEG's header shape, `decode_and_crop_jpeg` (only the crop
window is decoded), bilinear resize to 224 (big_vision's default, no antialiasing), random flip,
then batch and prefetch, every map with num_parallel_calls=AUTOTUNE. With --uint8 the batch stays
uint8 (the resize result rounded), for comparison with mmcl's uint8 batches. The TFRecords
(`image/encoded`, `text`) are written on the first run into PHOTO_SET_DIR/tfrecord.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cputime  # noqa: E402
import tensorflow as tf  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def write_tfrecords(root: pathlib.Path, shards: int = 4) -> list[str]:
  out = root / "tfrecord"
  files = [str(out / f"train-{i:05d}-of-{shards:05d}.tfrecord") for i in range(shards)]
  if all(os.path.exists(f) for f in files):
    return files
  out.mkdir(exist_ok=True)
  import csv  # pylint: disable=g-import-not-at-top
  with open(root / "styles.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  writers = [tf.io.TFRecordWriter(f + ".tmp") for f in files]
  for i, r in enumerate(rows):
    ex = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[(root / "images" / r["image"]).read_bytes()])),
        "text": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[r["productDisplayName"].encode()]))}))
    writers[i % shards].write(ex.SerializeToString())
  for w, f in zip(writers, files):
    w.close()
    os.replace(f + ".tmp", f)
  return files


def pipeline(files: list[str], batch: int, uint8: bool) -> tf.data.Dataset:
  features = {"image/encoded": tf.io.FixedLenFeature([], tf.string),
              "text": tf.io.FixedLenFeature([], tf.string)}

  def pp(serialized):
    ex = tf.io.parse_single_example(serialized, features)
    data = ex["image/encoded"]
    shape = tf.image.extract_jpeg_shape(data)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0,
        use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(begin)
    target_h, target_w, _ = tf.unstack(size)
    image = tf.image.decode_and_crop_jpeg(
        data, tf.stack([offset_y, offset_x, target_h, target_w]), channels=3)
    image = tf.image.resize(image, [224, 224], method="bilinear", antialias=False)
    image = tf.image.random_flip_left_right(image)
    if uint8:
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    else:
      image = (image / 255.0 - MEAN) / STD
    return {"image": image, "text": ex["text"]}

  ds = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
  ds = ds.repeat().shuffle(1000, seed=0)
  ds = ds.map(pp, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("photo_set")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--uint8", action="store_true")
  args = p.parse_args()
  tf.random.set_seed(0)
  files = write_tfrecords(pathlib.Path(args.photo_set))
  it = iter(pipeline(files, args.batch, args.uint8))
  for _ in range(args.warmup):
    batch = next(it)
  cpu0, t0 = cputime.tree_cpu_seconds(), time.perf_counter()
  for _ in range(args.batches):
    batch = next(it)
    image = batch["image"].numpy()  # as a training loop takes it off the pipeline
  wall, cpu = time.perf_counter() - t0, cputime.tree_cpu_seconds() - cpu0
  print(json.dumps(cputime.report(args.batches * args.batch, wall, cpu,
                                  output=f"{image.dtype.name} {list(image.shape)}",
                                  tensorflow=tf.__version__)))


if __name__ == "__main__":
  main()
