"""Image–text pairs: building the shapes dataset and the grain input pipelines over it.

Build (idempotent; a few seconds for the default 5,000 + 1,000 pairs)::

  python -m data_pipelines.image_text --output_dir /tmp/mmcl_data/shapes

Any dataset directory with a `png_image` field `image`, a `text` field `caption` and (optionally)
an `int32_sequence` field `caption_ids` (the caption pre-tokenized with the directory's
`tokenizer.json`) works with the pipelines below.

Batches (dicts of numpy arrays, this host's rows only):
  image: [b, H, W, 3] uint8 pixels. The model normalises them on the device as
    (pixel / 255 - IMAGE_MEAN) / IMAGE_STD with mean = std = 0.5 per channel (values in [-1, 1];
    `normalize_images` is the same arithmetic on the host), so batches cross process and device
    boundaries at a quarter of float32's bytes;
  text:  [b, L] int32 token ids, `[BOS] ... [EOS] 0 ...` (see `data_pipelines.tokenizer`);
  index: [b] int64 record index within the split (-1 for eval padding);
  valid: [b] bool (eval batches only) — False on padding rows.

Training order contract (used by multi-host tests and exact resume):
  * B = global_batch_size, n = split size, steps_per_epoch = n // B; the remainder of each epoch
    (n mod B records) is dropped, so every global batch lies within one epoch.
  * global batch t (epoch e = t // steps_per_epoch) = records `perm_e[j]` for positions
    j in [(t mod steps_per_epoch)·B, +B), where perm_e = `permutation.permute(·, n,
    key=epoch_key(seed, e))` — a seeded permutation that differs per epoch and is the same on
    every host (`global_batch_indices`).
  * process p of P gets rows [p·B/P, (p+1)·B/P) of global batch t and reads/decodes only those
    records; B must be divisible by P.
  * with `num_epochs=None` the iterator is infinite, else it stops after
    num_epochs · steps_per_epoch batches.
  * augmentation (optional) is keyed by (seed, epoch, record index): deterministic, and identical
    after a resume.
  The iterator's `get_state()`/`set_state()` (what `grain.checkpoint.CheckpointSave/Restore`
  store) is the number of batches consumed, so a restored iterator continues with exactly the
  batches the original would have produced.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pathlib
import sys
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from data_pipelines import permutation
from data_pipelines import records
from data_pipelines import shapes
from data_pipelines import shm_batches
from data_pipelines import tokenizer as tokenizer_lib

IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
TOKENIZER_FILE = "tokenizer.json"
BUILD_HINT = ("build the built-in shapes dataset with "
              "`mmcl data build-shapes --output {path}` "
              "(or data_pipelines.image_text.build_shapes_dataset)")
_AUGMENT_STREAM = 0x417567  # Separates augmentation randomness from any other use of the seed.


# --------------------------------------------------------------------------------------------
# Building the shapes dataset.


def _shapes_schema(image_size: int, max_objects: int) -> tuple[records.Field, ...]:
  return (
      records.Field("image", "png_image", (image_size, image_size, 3)),
      records.Field("caption", "text"),
      records.Field("caption_ids", "int32_sequence"),
      records.Field("background", "int"),
      records.Field("num_objects", "int"),
      *(records.Field(name, "int32_array", (max_objects,)) for name in shapes.OBJECT_FIELDS),
  )


def build_shapes_dataset(output_dir: str | os.PathLike, *, num_train: int = 5000,
                         num_test: int = 1000, image_size: int = 32, seed: int = 0,
                         num_shards: int = 4, max_objects: int = 3,
                         vocab_size: int = 1024) -> dict[str, Any]:
  """Builds the procedurally generated shapes dataset (see `data_pipelines.shapes`).

  Writes splits "train" and "test" as ArrayRecord shards, a BPE tokenizer trained on the train
  captions (`tokenizer.json`), and `metadata.json` last. Idempotent: when the directory already
  holds a complete build with the same parameters (and its files match their sha256), nothing is
  written. An interrupted or different earlier build is replaced. Multi-host: build on one
  process (or on each host's local disk) before the others read; two processes building into one
  directory at the same time are not supported.

  Args:
    output_dir: dataset directory (created if needed).
    num_train, num_test: split sizes (>= 1).
    image_size: image side S (images are [S, S, 3] uint8).
    seed: dataset seed (>= 0); example i of split s is a pure function of (seed, s, i).
    num_shards: shards per split (capped at the split size).
    max_objects: largest number of objects per image (1..9).
    vocab_size: BPE vocabulary budget (the trainer stops early when all merges are done).

  Returns:
    the metadata dict (as in `metadata.json`).
  """
  for name, value, lo in (("num_train", num_train, 1), ("num_test", num_test, 1),
                          ("seed", seed, 0), ("num_shards", num_shards, 1),
                          ("vocab_size", vocab_size, len(tokenizer_lib.SPECIAL_TOKENS))):
    if not isinstance(value, (int, np.integer)) or value < lo:
      raise ValueError(f"build_shapes_dataset: {name} must be an int >= {lo}, got {value!r}")
  shapes.generate_example(seed, "train", 0, image_size=image_size,
                          max_objects=max_objects)  # Validates both with clear errors.
  out = pathlib.Path(output_dir)
  params = {"name": "shapes", "module": shapes.__name__,
            "generator_version": shapes.GENERATOR_VERSION, "seed": int(seed),
            "image_size": int(image_size), "max_objects": int(max_objects),
            "num_train": int(num_train), "num_test": int(num_test),
            "num_shards": int(num_shards), "vocab_size": int(vocab_size)}
  try:
    existing = records.load_metadata(out)
  except (FileNotFoundError, ValueError):
    existing = None
  if (existing is not None and existing.get("source") == params
      and not records.verify_files(out, existing, checksums=True)
      and (out / TOKENIZER_FILE).is_file()
      and records.sha256_file(out / TOKENIZER_FILE) == existing.get("tokenizer_sha256")):
    return existing

  records.begin_rewrite(out)
  # Captions first (scenes only, no rendering): they train the tokenizer and are tokenized in
  # one batch per split; images are rendered while the shards are written.
  captions = {split: [shapes.sample_scene(seed, split, i, max_objects=max_objects)["caption"]
                      for i in range(n)]
              for split, n in (("train", num_train), ("test", num_test))}
  tok = tokenizer_lib.TextTokenizer.train(captions["train"], vocab_size=vocab_size)
  tok.save(out / TOKENIZER_FILE)
  fields = _shapes_schema(image_size, max_objects)
  split_meta, stats = {}, {}
  for split, split_captions in captions.items():
    ids = tok.encode_unpadded(split_captions)
    stream = (records.encode_record(
        dict(shapes.generate_example(seed, split, i, image_size=image_size,
                                     max_objects=max_objects),
             caption_ids=np.asarray(ids[i], np.int32)),
        fields, where=f"shapes {split} example {i}") for i in range(len(split_captions)))
    n = len(split_captions)
    split_meta[split] = {"num_examples": n,
                         "shards": records.write_split(out, split, stream, num_records=n,
                                                       num_shards=min(num_shards, n))}
    stats[split] = {"unique_captions": len(set(split_captions)),
                    "max_caption_tokens": max(len(x) for x in ids)}

  metadata = {
      "format": records.FORMAT_NAME,
      "format_version": records.FORMAT_VERSION,
      "dataset": "shapes",
      "description": "procedural image-caption pairs with planted structure; see "
                     "data_pipelines/shapes.py for the attributes and caption grammar",
      "schema": records.schema_to_json(fields),
      "splits": split_meta,
      "source": params,
      "attribute_names": {k: list(v) for k, v in shapes.vocabulary().items()},
      "tokenizer": TOKENIZER_FILE,
      "tokenizer_sha256": records.sha256_file(out / TOKENIZER_FILE),
      "vocab_size": tok.vocab_size,
      "special_token_ids": {"pad": tokenizer_lib.PAD_ID, "unk": tokenizer_lib.UNK_ID,
                            "bos": tokenizer_lib.BOS_ID, "eos": tokenizer_lib.EOS_ID},
      "image_normalization": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
      "stats": stats,
  }
  records.remove_unlisted_shards(out, metadata)
  records.write_metadata(out, metadata)
  return metadata


# --------------------------------------------------------------------------------------------
# Reading helpers.


def load_metadata(data_dir: str | os.PathLike) -> dict[str, Any]:
  """The dataset's `metadata.json` (validated); errors name the path and how to build it."""
  return records.load_metadata(data_dir, build_hint=BUILD_HINT)


def split_size(data_dir: str | os.PathLike, split: str) -> int:
  """Number of records in `split`."""
  meta = load_metadata(data_dir)
  if split not in meta["splits"]:
    raise KeyError(f"split {split!r} not in dataset {data_dir} (splits: {sorted(meta['splits'])})")
  return int(meta["splits"][split]["num_examples"])


def load_tokenizer(data_dir: str | os.PathLike) -> tokenizer_lib.TextTokenizer:
  """The caption tokenizer stored with the dataset."""
  meta = load_metadata(data_dir)
  return tokenizer_lib.TextTokenizer.load(pathlib.Path(data_dir) / meta.get("tokenizer",
                                                                            TOKENIZER_FILE))


def open_source(data_dir: str | os.PathLike, split: str, *,
                skip_bad_records: bool = False) -> records.ArrayRecordSource:
  """An `ArrayRecordSource` over an image–text split (decoding image, caption, caption_ids),
  after checking its schema."""
  meta = load_metadata(data_dir)
  kinds = {f.name: f for f in records.schema_from_json(meta["schema"])}
  where = pathlib.Path(data_dir) / records.METADATA_FILE
  image = kinds.get("image")
  if image is None or image.kind != "png_image" or image.shape[-1] != 3:
    raise ValueError(f"{where}: schema needs field 'image' of kind png_image with 3 channels, "
                     f"found {image}")
  if "caption" not in kinds or kinds["caption"].kind != "text":
    raise ValueError(f"{where}: schema needs field 'caption' of kind text, found "
                     f"{kinds.get('caption')}")
  # Decode only what the batches use; attribute fields are for analysis, not training.
  used = [name for name in ("image", "caption", "caption_ids") if name in kinds]
  return records.ArrayRecordSource(data_dir, split, skip_bad_records=skip_bad_records,
                                   fields=used, metadata=meta, build_hint=BUILD_HINT)


def normalize_images(images: np.ndarray) -> np.ndarray:
  """images: [b, H, W, 3] uint8 → [b, H, W, 3] float32, (x / 255 - IMAGE_MEAN) / IMAGE_STD.

  The host reference of what the image tower computes on the device from uint8 batches."""
  scale = np.asarray([1.0 / (255.0 * s) for s in IMAGE_STD], np.float32)
  shift = np.asarray([m / s for m, s in zip(IMAGE_MEAN, IMAGE_STD)], np.float32)
  out = images.astype(np.float32)
  out *= scale  # In place: one float32 buffer instead of three.
  out -= shift
  return out


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Global batches per epoch (the epoch's remainder is dropped)."""
  return num_examples // global_batch_size


def epoch_key(seed: int, epoch: int) -> int:
  """Permutation key of `epoch`: same on every host, different per epoch."""
  return int(permutation.hash_u64(seed, epoch)[0])


def global_batch_indices(num_examples: int, global_batch_size: int, seed: int, step: int, *,
                         process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Record indices of global batch `step` (this process's rows of it, when P > 1).

  Args:
    num_examples: n, split size.
    global_batch_size: B (divisible by process_count, <= n).
    seed: shuffle seed.
    step: global batch number t >= 0 (counts across epochs).
    process_index, process_count: p, P.

  Returns:
    indices: [B / P] int64 — rows [p·B/P, (p+1)·B/P) of global batch t.
  """
  _check_batch(num_examples, global_batch_size, process_index, process_count)
  spe = steps_per_epoch(num_examples, global_batch_size)
  epoch, step_in_epoch = divmod(int(step), spe)
  per_host = global_batch_size // process_count
  start = step_in_epoch * global_batch_size + process_index * per_host
  positions = np.arange(start, start + per_host, dtype=np.int64)
  return permutation.permute(positions, num_examples, epoch_key(seed, epoch))


def _check_batch(num_examples: int, global_batch_size: int, process_index: int,
                 process_count: int, *, drop_remainder: bool = True) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count), got "
                     f"process_index={process_index}, process_count={process_count}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"process_count={process_count} (each process gets B/P rows)")
  if drop_remainder and global_batch_size > num_examples:
    raise ValueError(f"global_batch_size={global_batch_size} exceeds the split size "
                     f"{num_examples}: no full batch exists")


def _augment(images: np.ndarray, *, seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
  """Small random translation (edge-padded) and brightness jitter, keyed per example.

  No flips: captions name left and right. The shift (up to S/16 px) stays well inside a grid
  cell, so positions in the caption remain true.

  Args:
    images: [b, H, W, 3] uint8.
    seed, epoch: randomness key, with each example's record index.
    indices: [b] int64 record indices.

  Returns:
    [b, H, W, 3] uint8.
  """
  b, h, w, _ = images.shape
  m = max(1, round(min(h, w) / 16))
  u = permutation.uniform(seed, _AUGMENT_STREAM, epoch, indices[:, None], np.arange(3)[None, :])
  dy = np.floor(u[:, 0] * (2 * m + 1)).astype(np.int64)  # offset into the padded image: 0..2m
  dx = np.floor(u[:, 1] * (2 * m + 1)).astype(np.int64)
  gain = (0.9 + 0.2 * u[:, 2]).astype(np.float32)
  padded = np.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
  rows = dy[:, None] + np.arange(h)[None, :]
  cols = dx[:, None] + np.arange(w)[None, :]
  shifted = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
  return np.clip(shifted.astype(np.float32) * gain[:, None, None, None], 0, 255).astype(np.uint8)


def _collate(rows: Sequence[Mapping[str, Any]], *, max_text_len: int,
             tokenizer: tokenizer_lib.TextTokenizer | None) -> dict[str, np.ndarray]:
  """Stacks decoded records: image [b, H, W, 3] uint8, text [b, L] int32, index [b] int64."""
  images = np.stack([r["image"] for r in rows])
  if rows and "caption_ids" in rows[0]:
    text = tokenizer_lib.pad_or_truncate([r["caption_ids"] for r in rows], max_text_len)
  else:
    if tokenizer is None:
      raise ValueError("records lack 'caption_ids' and no tokenizer was given")
    text = tokenizer.encode([r["caption"] for r in rows], max_text_len)
  index = np.asarray([r["index"] for r in rows], np.int64)
  return {"image": images, "text": text, "index": index}


def _read_rows(source: records.ArrayRecordSource, indices: np.ndarray) -> list[dict[str, Any]]:
  """Decoded records at `indices`; a skipped bad record is replaced by the next good one
  (index + 1, + 2, ... cyclically), so batches keep their shape and stay deterministic."""
  rows = source.read_many(indices.tolist())
  n = len(source)
  for r, row in enumerate(rows):
    candidate = int(indices[r])
    tries = 0
    while row is None:
      tries += 1
      if tries >= n:
        raise ValueError(f"every record of split {source.split!r} is bad")
      candidate = (candidate + 1) % n
      row = source.read_many([candidate])[0]
    rows[r] = row
  return rows


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
  """grain map: global step t → this process's rows of global batch t."""
  source: records.ArrayRecordSource
  tokenizer: tokenizer_lib.TextTokenizer | None
  global_batch_size: int
  process_index: int
  process_count: int
  seed: int
  max_text_len: int
  augment: bool

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    n = len(self.source)
    indices = global_batch_indices(n, self.global_batch_size, self.seed, step,
                                   process_index=self.process_index,
                                   process_count=self.process_count)
    batch = _collate(_read_rows(self.source, indices), max_text_len=self.max_text_len,
                     tokenizer=self.tokenizer)
    if self.augment:
      epoch = int(step) // steps_per_epoch(n, self.global_batch_size)
      batch["image"] = _augment(batch["image"], seed=self.seed, epoch=epoch,
                                indices=batch["index"])
    return batch


def train_dataset(source: records.ArrayRecordSource, *, global_batch_size: int, seed: int,
                  max_text_len: int, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None, augment: bool = False,
                  tokenizer: tokenizer_lib.TextTokenizer | None = None) -> grain.MapDataset:
  """The training pipeline as a `grain.MapDataset` of batches (element t = batch t).

  See the module docstring for the order contract. `tokenizer` is needed only when the records
  have no `caption_ids`.
  """
  n = len(source)
  _check_batch(n, global_batch_size, process_index, process_count)
  if max_text_len < 2:
    raise ValueError(f"max_text_len must be >= 2, got {max_text_len}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (infinite) or >= 1, got {num_epochs}")
  length = sys.maxsize if num_epochs is None else num_epochs * steps_per_epoch(
      n, global_batch_size)
  return grain.MapDataset.range(length).map(_TrainBatch(
      source=source, tokenizer=tokenizer, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count, seed=seed,
      max_text_len=max_text_len, augment=augment))


def to_iterator(ds: grain.MapDataset, *, worker_count: int = 0, num_threads: int = 2,
                prefetch_buffer_size: int = 4) -> grain.DatasetIterator:
  """Iterator over a batch `MapDataset` (from `train_dataset`), with thread or process prefetch.

  worker_count > 0: grain worker processes, each handing its batches over through a ring of
  persistent shared-memory slots (`shm_batches.mp_prefetch`); same batches, order and state.

  Use this with `open_source(...)` and `train_dataset(...)` when the caller needs the source
  itself, e.g. to report `source.num_skipped`.
  """
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                 prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    iter_ds = shm_batches.mp_prefetch(iter_ds,
                                      grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(iter_ds)


def train_iterator(data_dir: str | os.PathLike, *, split: str = "train", global_batch_size: int,
                   process_index: int = 0, process_count: int = 1, seed: int,
                   num_epochs: int | None = None, max_text_len: int, augment: bool = False,
                   worker_count: int = 0, skip_bad_records: bool = False, num_threads: int = 2,
                   prefetch_buffer_size: int = 4) -> grain.DatasetIterator:
  """Iterator over this host's rows of the shuffled global training batches.

  Args:
    data_dir: dataset directory (see `build_shapes_dataset`).
    split: split to read.
    global_batch_size: B, summed over processes; must be divisible by process_count.
    process_index, process_count: this process p and the number of processes P
      (`jax.process_index()`, `jax.process_count()`).
    seed: shuffle/augmentation seed.
    num_epochs: None = infinite; else stop after num_epochs · (n // B) batches.
    max_text_len: L, token row length.
    augment: small translation + brightness jitter (no flips).
    worker_count: grain worker processes (0 = in-process threads); with W > 0 the entry point
      needs a `__main__` guard, since workers are spawned, and batches come through each
      worker's shared-memory slot ring (`shm_batches.mp_prefetch`).
    skip_bad_records: log and skip undecodable records (replaced by the next good record)
      instead of raising.
    num_threads, prefetch_buffer_size: in-process read threads and batches prefetched.

  Returns:
    a grain `DatasetIterator` of dicts: image [B/P, H, W, 3] uint8, text [B/P, L] int32,
    index [B/P] int64. `get_state()`/`set_state()` resume exactly.
  """
  source = open_source(data_dir, split, skip_bad_records=skip_bad_records)
  tok = None if any(f.name == "caption_ids" for f in source.fields) else load_tokenizer(data_dir)
  ds = train_dataset(source, global_batch_size=global_batch_size, seed=seed,
                     max_text_len=max_text_len, process_index=process_index,
                     process_count=process_count, num_epochs=num_epochs, augment=augment,
                     tokenizer=tok)
  return to_iterator(ds, worker_count=worker_count, num_threads=num_threads,
                      prefetch_buffer_size=prefetch_buffer_size)


@dataclasses.dataclass(frozen=True)
class _EvalBatch:
  """grain map: t → this process's rows of the t-th record-order batch, padded."""
  source: records.ArrayRecordSource
  tokenizer: tokenizer_lib.TextTokenizer | None
  batch_size: int
  process_index: int
  process_count: int
  max_text_len: int

  def __call__(self, t: int) -> dict[str, np.ndarray]:
    n = len(self.source)
    per_host = self.batch_size // self.process_count
    start = int(t) * self.batch_size + self.process_index * per_host
    indices = np.arange(start, min(start + per_host, n), dtype=np.int64)
    rows = self.source.read_many(indices.tolist()) if indices.size else []
    good = [r for r in rows if r is not None]
    image_shape = next(f.shape for f in self.source.fields if f.name == "image")
    batch = {"image": np.zeros((per_host, *image_shape), np.uint8),
             "text": np.zeros((per_host, self.max_text_len), np.int32),
             "index": np.full((per_host,), -1, np.int64),
             "valid": np.zeros((per_host,), bool)}
    # Padding rows get the text "[BOS] [EOS]" so no row is all padding (an all-masked attention
    # row would produce NaNs in some text towers); they are excluded via `valid`.
    batch["text"][:, 0] = tokenizer_lib.BOS_ID
    batch["text"][:, 1] = tokenizer_lib.EOS_ID
    if good:
      slots = np.asarray([r for r, row in enumerate(rows) if row is not None])
      collated = _collate(good, max_text_len=self.max_text_len, tokenizer=self.tokenizer)
      batch["image"][slots] = collated["image"]
      batch["text"][slots] = collated["text"]
      batch["index"][slots] = collated["index"]
      batch["valid"][slots] = True
    return batch


def eval_batches(data_dir: str | os.PathLike, *, split: str = "test", batch_size: int,
                 max_text_len: int, process_index: int = 0, process_count: int = 1,
                 skip_bad_records: bool = False, num_threads: int = 2,
                 prefetch_buffer_size: int = 4) -> grain.DatasetIterator:
  """One pass over `split` in record order, for embedding the whole split.

  Global batch t holds records [t·B, (t+1)·B) (B = batch_size), the last one padded to B;
  process p gets rows [p·B/P, (p+1)·B/P). Every process yields ceil(n / B) batches.

  Returns:
    iterator of dicts: image [B/P, H, W, 3] uint8 (zeros on padding), text [B/P, L] int32
    (`[BOS, EOS, 0...]` on padding), index [B/P] int64 (-1 on padding), valid [B/P] bool.
    With `skip_bad_records`, bad records become invalid rows.
  """
  source = open_source(data_dir, split, skip_bad_records=skip_bad_records)
  n = len(source)
  _check_batch(n, batch_size, process_index, process_count, drop_remainder=False)
  if max_text_len < 2:
    raise ValueError(f"max_text_len must be >= 2, got {max_text_len}")
  tok = None if any(f.name == "caption_ids" for f in source.fields) else load_tokenizer(data_dir)
  ds = grain.MapDataset.range(math.ceil(n / batch_size)).map(_EvalBatch(
      source=source, tokenizer=tok, batch_size=batch_size, process_index=process_index,
      process_count=process_count, max_text_len=max_text_len))
  return to_iterator(ds, worker_count=0, num_threads=num_threads,
                      prefetch_buffer_size=prefetch_buffer_size)


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m data_pipelines.image_text --output_dir DIR [...]`: builds the shapes dataset."""
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--num_train", type=int, default=5000)
  parser.add_argument("--num_test", type=int, default=1000)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_shards", type=int, default=4)
  parser.add_argument("--max_objects", type=int, default=3)
  args = parser.parse_args(argv)
  meta = build_shapes_dataset(args.output_dir, num_train=args.num_train, num_test=args.num_test,
                              image_size=args.image_size, seed=args.seed,
                              num_shards=args.num_shards, max_objects=args.max_objects)
  counts = {k: v["num_examples"] for k, v in meta["splits"].items()}
  print(f"shapes dataset in {args.output_dir}: {counts}, vocab_size={meta['vocab_size']}")


if __name__ == "__main__":
  main()
