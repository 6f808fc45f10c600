"""grain pipelines for every example kind, built from a config.

All training pipelines follow `image_text`'s order contract (one seeded permutation per epoch
shared by all hosts, global batch t = positions [t·B, (t+1)·B) of it, process p reads rows
[p·B/P, (p+1)·B/P), remainder of an epoch dropped) and are `grain.MapDataset`s of batches whose
element t is batch t, so the iterator's `get_state()`/`set_state()` (what
`grain.checkpoint.CheckpointSave/Restore` store in an orbax checkpoint) resumes with exactly the
remaining batches. All randomness is keyed by (seed, epoch, record index). Evaluation passes read
records in order, pad the last batch and flag real rows with `valid`.

Config (`build_train_iterator(data, ...)`: any object with attributes or a mapping; the keys a
kind does not use are ignored; `define_config(section, kind)` declares them on an `mmcl.config`
section with their docs):

  dir (str)                 dataset directory (any kind; the kind is read from its metadata)
  split (str)               training split (default: 'train'; 'sequences' for interactions)
  global_batch_size (int)   B, summed over processes
  seed (int), num_epochs (int | None), skip_bad_records (bool)
  worker_count (int)        grain worker processes decoding the training batches (0 = the
                            in-process threads below); batches reach this process through a ring
                            of persistent shared-memory slots per worker (`shm_batches`), so
                            2 workers are at least as fast as the threads even on 2 cores
                            (BENCHMARKS.md); the batches and their order do not depend on it
  image_size (int)          image_text / query_document: output side S (default 224)
  augment (bool)            image: random-resized-crop + flip (train); else center crop
  crop_scale (tuple)        random-resized-crop area range (default (0.08, 1.0))
  decode_threads (int)      image: threads decoding each batch's images (default 0 = one per
                            core, at most 16; per worker process ceil(cores / worker_count),
                            at least 2; `image_ops.decode_threads`)
  num_threads (int)         grain threads computing whole batches in parallel (default 2)
  prefetch_buffer_size (int)  batches grain reads ahead (default 4)
  max_text_len (int)        text rows L
  max_len (int)             interactions: history length L (default 50)
  sequence_mode (str)       interactions: 'next_item' (SASRec) | 'prefix' (UniSRec-style
                            one random prefix per user per epoch) | 'masked' (BERT4Rec)
  mask_prob (float)         interactions 'masked' mode (default 0.2)
  sample_rate, clip_seconds audio_clip: resample target (default 16000) and crop length (10 s)
  log_mel_on_host (bool)    audio_clip: compute log-mel in the pipeline (else the batch carries
                            the waveform and the model applies `audio.LogMel(...).jax`)

Batches (this host's rows; B/P = b):
  image_text:     image [b, S, S, 3] uint8 (normalised with CLIP mean/std on the device by the
                  image tower), text [b, L] int32, index [b] int64
  query_document: query [b, L] int32, title [b, L] int32, (image [b, S, S, 3] uint8),
                  position [b] int32, score_linear [b] float32, score_reciprocal [b] float32,
                  index [b]
  entity:         {m} [b, D_m] float32, has_{m} [b] bool for each modality, index [b]
  audio_clip:     audio [b, T] float32 (mono, `sample_rate`) or log_mel [b, F, M] float32,
                  key [b] int32 (-1 unknown), tempo [b] float32 (-1 unknown),
                  tags [b, num_tags] float32 multi-hot, index [b]
  interactions:   next_item: inputs [b, L], targets [b, L] int32 (0 = no target);
                  prefix: history [b, L] int32, target [b] int32, weight [b] float32;
                  masked: inputs [b, L] (mask id = num_items + 1), labels [b, L] int32;
                  eval (valid/test): history [b, L], target [b] int32, valid [b] bool.
  `mmcl.parallel.mesh.put_on_mesh(batch, mesh)` assembles the host rows into globally sharded
  `jax.Array`s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from data_pipelines import audio as audio_lib
from data_pipelines import image_ops
from data_pipelines import image_text
from data_pipelines import records
from data_pipelines import schemas
from data_pipelines import sequences
from data_pipelines import tokenizer as tokenizer_lib

BUILD_HINT = "convert your data with `mmcl data convert --format F --input PATH --output {path}`"

# --------------------------------------------------------------------------------------------
# Reading with transforms that can fail (undecodable images/audio).


def read_transformed(source: records.ArrayRecordSource, indices: np.ndarray,
                     transform: Callable[[dict[str, Any], int], Any], field: str) -> list[Any]:
  """transform(record, position) for each index; a record whose read or transform fails is
  reported through `source.bad_record` (raise, or skip when `skip_bad_records`) and replaced by
  the next good record (index + 1, + 2, ... cyclically), so batches keep their shape.

  `transform` raises ValueError(reason) on bad content; `position` is the row in the batch.
  """
  rows = source.read_many(indices.tolist())
  n = len(source)
  out = []
  for pos, (index, row) in enumerate(zip(indices.tolist(), rows)):
    candidate, tries = int(index), 0
    while True:
      if row is not None:
        try:
          out.append(transform(row, pos))
          break
        except ValueError as e:
          source.bad_record(candidate, field, str(e))  # raises unless skipping
      tries += 1
      if tries >= n:
        raise ValueError(f"every record of split {source.split!r} is bad")
      candidate = (candidate + 1) % n
      row = source.read_many([candidate])[0]
  return out


@dataclasses.dataclass(frozen=True)
class _TrainBatches:
  """grain map: global step t → this process's rows of global batch t, via `make_batch`."""
  source: records.ArrayRecordSource
  make_batch: Callable[[records.ArrayRecordSource, np.ndarray, int], dict[str, np.ndarray]]
  global_batch_size: int
  process_index: int
  process_count: int
  seed: int

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    n = len(self.source)
    indices = image_text.global_batch_indices(n, self.global_batch_size, self.seed, step,
                                              process_index=self.process_index,
                                              process_count=self.process_count)
    epoch = int(step) // image_text.steps_per_epoch(n, self.global_batch_size)
    return self.make_batch(self.source, indices, epoch)


def train_dataset(source: records.ArrayRecordSource,
                  make_batch: Callable[[records.ArrayRecordSource, np.ndarray, int],
                                       dict[str, np.ndarray]], *,
                  global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, num_epochs: int | None = None) -> grain.MapDataset:
  """Batches of any kind under `image_text`'s order contract; element t = batch t.

  make_batch(source, indices [b] int64, epoch) → dict of numpy arrays with leading dim b.
  """
  n = len(source)
  image_text._check_batch(n, global_batch_size, process_index, process_count)  # pylint: disable=protected-access
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be None (infinite) or >= 1, got {num_epochs}")
  length = sys.maxsize if num_epochs is None else num_epochs * image_text.steps_per_epoch(
      n, global_batch_size)
  return grain.MapDataset.range(length).map(_TrainBatches(
      source=source, make_batch=make_batch, global_batch_size=global_batch_size,
      process_index=process_index, process_count=process_count, seed=seed))


@dataclasses.dataclass(frozen=True)
class _EvalBatches:
  source: records.ArrayRecordSource
  make_batch: Callable[[records.ArrayRecordSource, np.ndarray, int], dict[str, np.ndarray]]
  batch_size: int
  process_index: int
  process_count: int

  def __call__(self, t: int) -> dict[str, np.ndarray]:
    n = len(self.source)
    per_host = self.batch_size // self.process_count
    start = int(t) * self.batch_size + self.process_index * per_host
    real = np.arange(start, min(start + per_host, n), dtype=np.int64)
    # Pad with copies of record 0 (always decodable or reported) and flag them invalid.
    indices = np.concatenate([real, np.zeros(per_host - len(real), np.int64)])
    batch = self.make_batch(self.source, indices, 0)
    valid = np.zeros(per_host, bool)
    valid[:len(real)] = True
    batch["valid"] = valid & batch.pop("valid", np.ones(per_host, bool))
    batch["index"] = np.where(valid, batch["index"], -1)
    return batch


def eval_dataset(source: records.ArrayRecordSource,
                 make_batch: Callable[[records.ArrayRecordSource, np.ndarray, int],
                                      dict[str, np.ndarray]], *,
                 batch_size: int, process_index: int = 0, process_count: int = 1
                 ) -> grain.MapDataset:
  """One record-order pass: ceil(n / B) batches, padding rows flagged by `valid` = False."""
  n = len(source)
  image_text._check_batch(n, batch_size, process_index, process_count, drop_remainder=False)  # pylint: disable=protected-access
  return grain.MapDataset.range(math.ceil(n / batch_size)).map(_EvalBatches(
      source=source, make_batch=make_batch, batch_size=batch_size,
      process_index=process_index, process_count=process_count))


# --------------------------------------------------------------------------------------------
# Per-kind batch makers (picklable dataclasses, so grain worker processes can run them).


@dataclasses.dataclass(frozen=True)
class ImageBatch:
  """Decode + (random-resized-crop + flip | center crop) of the `image` field, as uint8.

  `decoder`: "auto" (libjpeg-turbo for JPEG, Pillow otherwise) or "pillow" (see `image_ops`).
  `decode_threads`: threads decoding the batch's images (libjpeg-turbo, Pillow and OpenCV
  release the GIL, so they run in parallel); the batch does not depend on it.
  """
  image_size: int = 224
  augment: bool = True
  crop_scale: tuple[float, float] = (0.08, 1.0)
  seed: int = 0
  field: str = "image"
  decoder: str = "auto"
  decode_threads: int = 1

  def _boxes(self, heights: np.ndarray, widths: np.ndarray, idx: np.ndarray, epoch: int
             ) -> tuple[np.ndarray, np.ndarray]:
    if self.augment:
      return (image_ops.random_resized_crop_boxes(heights, widths, seed=self.seed, epoch=epoch,
                                                  indices=idx, scale=self.crop_scale),
              image_ops.flip_mask(seed=self.seed, epoch=epoch, indices=idx))
    return image_ops.center_crop_boxes(heights, widths), np.zeros(len(idx), bool)

  def _decode_one(self, record: dict[str, Any], epoch: int) -> np.ndarray:
    """One record's image, [S, S, 3] uint8 (the slow path, for substitutes of bad records)."""
    im = image_ops.open_image(record[self.field], decoder=self.decoder)
    boxes, flips = self._boxes(np.asarray([im.size[1]]), np.asarray([im.size[0]]),
                               np.asarray([record["index"]]), epoch)
    return image_ops.decode_crop_resize(im, boxes[0], self.image_size, flip=bool(flips[0]))

  def decode(self, source: records.ArrayRecordSource, indices: np.ndarray, epoch: int,
             keep: Callable[[dict[str, Any]], Any] = lambda r: None
             ) -> tuple[np.ndarray, list[Any], np.ndarray]:
    """Reads, decodes and crops the batch's images.

    Args:
      source: the split; indices: [b] int64 record indices; epoch: augmentation key.
      keep: what to keep of each record besides the image (e.g. its caption ids).

    Returns:
      images [b, S, S, 3] uint8, keep(record) per row, record indices [b] int64
      (a skipped bad record's substitute has its own index).
    """
    # Headers first (cheap), so the crop boxes of the whole batch are drawn in one vectorised
    # call; the pixels are then decoded straight into the crop.
    opened = read_transformed(source, indices, lambda r, p: (
        image_ops.open_image(r[self.field], decoder=self.decoder), r["index"], keep(r)),
        self.field)
    idx = np.asarray([o[1] for o in opened], np.int64)
    kept = [o[2] for o in opened]
    boxes, flips = self._boxes(np.asarray([o[0].size[1] for o in opened]),
                               np.asarray([o[0].size[0] for o in opened]), idx, epoch)
    images = np.empty((len(idx), self.image_size, self.image_size, 3), np.uint8)

    def decode_row(b: int) -> str:
      """Decodes row b into `images[b]`; the failure's reason, or '' (rows are disjoint, so
      threads write them without locks)."""
      try:
        images[b] = image_ops.decode_crop_resize(opened[b][0], boxes[b], self.image_size,
                                                 flip=bool(flips[b]))
        return ""
      except ValueError as e:  # pixel data corrupt although the header parsed
        return str(e)

    reasons = image_ops.map_threaded(decode_row, range(len(idx)), self.decode_threads)
    for b, reason in enumerate(reasons):  # reported in row order, whatever the threads did
      if reason:
        index = int(opened[b][1])
        source.bad_record(index, self.field, reason)  # raises unless skipping
        # Substitute the next record that decodes, as `read_transformed` does.
        sub = read_transformed(source, np.asarray([(index + 1) % len(source)]), lambda r, p: (
            self._decode_one(r, epoch), r["index"], keep(r)), self.field)[0]
        images[b], idx[b], kept[b] = sub
    return images, kept, idx


def _pad_ids(seqs: Sequence[np.ndarray], max_len: int) -> np.ndarray:
  return tokenizer_lib.pad_or_truncate(list(seqs), max_len)


@dataclasses.dataclass(frozen=True)
class ImageTextBatch:
  """image_text records → image [b, S, S, 3] uint8, text [b, L] int32, index [b] int64."""
  image: ImageBatch
  max_text_len: int

  def __call__(self, source: records.ArrayRecordSource, indices: np.ndarray,
               epoch: int) -> dict[str, np.ndarray]:
    images, ids, idx = self.image.decode(source, indices, epoch, lambda r: r["caption_ids"])
    return {"image": images, "text": _pad_ids(ids, self.max_text_len), "index": idx}


@dataclasses.dataclass(frozen=True)
class QueryDocumentBatch:
  """query_document records → query/title ids, scores, optional images (see module doc)."""
  max_text_len: int
  image: ImageBatch | None = None

  def __call__(self, source: records.ArrayRecordSource, indices: np.ndarray,
               epoch: int) -> dict[str, np.ndarray]:
    if self.image is not None:
      images, recs, _ = self.image.decode(source, indices, epoch,
                                          lambda r: {k: v for k, v in r.items() if k != "image"})
    else:
      recs = image_text._read_rows(source, indices)  # pylint: disable=protected-access
    batch = {"query": _pad_ids([r["query_ids"] for r in recs], self.max_text_len),
             "title": _pad_ids([r["title_ids"] for r in recs], self.max_text_len),
             "position": np.asarray([r["position"] for r in recs], np.int32),
             "score_linear": np.asarray([r["score_linear"] for r in recs], np.float32),
             "score_reciprocal": np.asarray([r["score_reciprocal"] for r in recs], np.float32),
             "index": np.asarray([r["index"] for r in recs], np.int64)}
    if self.image is not None:
      batch["image"] = images
    return batch


@dataclasses.dataclass(frozen=True)
class EntityBatch:
  """entity records → {m} [b, D_m] float32, has_{m} [b] bool, index [b]."""
  modalities: tuple[str, ...]

  def __call__(self, source: records.ArrayRecordSource, indices: np.ndarray,
               epoch: int) -> dict[str, np.ndarray]:
    recs = image_text._read_rows(source, indices)  # pylint: disable=protected-access
    batch = {"index": np.asarray([r["index"] for r in recs], np.int64)}
    for m in self.modalities:
      batch[m] = np.stack([r[m] for r in recs]).astype(np.float32)
      batch[f"has_{m}"] = np.asarray([r[f"has_{m}"] for r in recs], bool)
    return batch


@dataclasses.dataclass(frozen=True)
class AudioBatch:
  """audio_clip records → mono waveform crops (random when training) or their log-mel."""
  sample_rate: int = 16000
  clip_seconds: float = 10.0
  num_tags: int = 0
  random_crop: bool = True
  log_mel: audio_lib.LogMel | None = None
  seed: int = 0

  def __call__(self, source: records.ArrayRecordSource, indices: np.ndarray,
               epoch: int) -> dict[str, np.ndarray]:
    crop = int(round(self.clip_seconds * self.sample_rate))

    def fn(r: dict[str, Any], pos: int):
      wave, sr = audio_lib.decode_audio(r["audio"])
      mono = audio_lib.resample(wave.mean(axis=0), sr, self.sample_rate)
      if self.random_crop:
        start = int(audio_lib.random_starts(np.asarray([len(mono)]), crop, seed=self.seed,
                                            epoch=epoch, indices=np.asarray([r["index"]]))[0])
      else:
        start = max(0, (len(mono) - crop) // 2)
      return audio_lib.crop_or_pad(mono, crop, start), r

    out = read_transformed(source, indices, fn, "audio")
    recs = [o[1] for o in out]
    tags = np.zeros((len(recs), self.num_tags), np.float32)
    for b, r in enumerate(recs):
      tags[b, r["tags"][r["tags"] < self.num_tags]] = 1.0
    waves = np.stack([o[0] for o in out])
    batch = {"key": np.asarray([r["key"] for r in recs], np.int32),
             "tempo": np.asarray([r["tempo"] for r in recs], np.float32), "tags": tags,
             "index": np.asarray([r["index"] for r in recs], np.int64)}
    if self.log_mel is not None:
      batch["log_mel"] = self.log_mel.numpy(waves)
    else:
      batch["audio"] = waves
    return batch


@dataclasses.dataclass(frozen=True)
class SequenceBatch:
  """interactions `sequences` records → training or leave-one-out evaluation rows."""
  max_len: int = 50
  mode: str = "next_item"  # next_item | prefix | masked | valid | test
  num_items: int = 0
  mask_prob: float = 0.2
  seed: int = 0

  def __post_init__(self):
    if self.mode not in ("next_item", "prefix", "masked", "valid", "test"):
      raise ValueError(f"sequence mode must be next_item/prefix/masked/valid/test, got "
                       f"{self.mode!r}")

  def __call__(self, source: records.ArrayRecordSource, indices: np.ndarray,
               epoch: int) -> dict[str, np.ndarray]:
    recs = image_text._read_rows(source, indices)  # pylint: disable=protected-access
    idx = np.asarray([r["index"] for r in recs], np.int64)
    items = [r["items"] for r in recs]
    if self.mode == "next_item":
      pairs = [sequences.next_item_example(s, self.max_len) for s in items]
      return {"inputs": np.stack([p[0] for p in pairs]),
              "targets": np.stack([p[1] for p in pairs]), "index": idx}
    if self.mode == "masked":
      inputs = sequences.pad_left([sequences.train_part(s) for s in items], self.max_len)
      masked, labels = sequences.mask_items(inputs, prob=self.mask_prob,
                                            mask_id=self.num_items + 1, seed=self.seed,
                                            epoch=epoch, indices=idx)
      return {"inputs": masked, "labels": labels, "index": idx}
    if self.mode == "prefix":
      ex = [sequences.random_prefix(s, seed=self.seed, epoch=epoch, index=int(i))
            for s, i in zip(items, idx)]
    else:
      ex = [sequences.eval_example(s, self.mode) for s in items]
    has = np.asarray([e is not None for e in ex])
    history = sequences.pad_left([e[0] if e else np.zeros(0, np.int32) for e in ex],
                                 self.max_len)
    target = np.asarray([e[1] if e else 0 for e in ex], np.int32)
    if self.mode == "prefix":
      return {"history": history, "target": target, "weight": has.astype(np.float32),
              "index": idx}
    return {"history": history, "target": target, "valid": has, "index": idx}


# --------------------------------------------------------------------------------------------
# Item tables for interaction datasets.


def load_item_table(data_dir: str | os.PathLike, *, max_text_len: int = 64,
                    max_attributes: int = 8) -> dict[str, np.ndarray]:
  """All items of an interactions dataset as arrays indexed by item index (row 0 = padding).

  Returns:
    text: [N + 1, L] int32 token ids; attributes: [N + 1, A] int32 (-1 = none);
    item_ids: [N + 1] object (str; '' for row 0).
  """
  src = records.ArrayRecordSource(data_dir, "items", build_hint=BUILD_HINT)
  recs = src.read_many(list(range(len(src))))
  n = len(recs)
  text = np.zeros((n + 1, max_text_len), np.int32)
  text[0, :2] = (tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID)
  text[1:] = _pad_ids([r["text_ids"] if len(r["text_ids"]) else
                       np.asarray([tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID])
                       for r in recs], max_text_len)
  attrs = np.full((n + 1, max_attributes), -1, np.int32)
  for r in recs:
    a = r["attributes"][:max_attributes]
    attrs[r["item_index"], :len(a)] = a
  ids = np.asarray([""] + [r["item_id"] for r in recs], object)
  src.close()
  return {"text": text, "attributes": attrs, "item_ids": ids}


def item_feature_table(data_dir: str | os.PathLike, embeddings: str | os.PathLike
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Joins precomputed item features (X.npy + X.ids.txt, ids = item_id) onto item indices.

  Returns:
    features [N + 1, D] float32 (zeros where missing and for row 0), available [N + 1] bool.
  """
  from data_pipelines.converters import entities  # pylint: disable=g-import-not-at-top
  ids, vec = entities.read_npy(pathlib.Path(embeddings))
  table = load_item_table(data_dir, max_text_len=2, max_attributes=1)["item_ids"]
  pos = {i: j for j, i in enumerate(ids)}
  feats = np.zeros((len(table), vec.shape[1]), np.float32)
  avail = np.zeros(len(table), bool)
  for j, item_id in enumerate(table[1:], 1):
    k = pos.get(item_id)
    if k is not None:
      feats[j], avail[j] = vec[k], True
  return feats, avail


# --------------------------------------------------------------------------------------------
# From config.

_DEFAULTS: dict[str, Any] = {
    "split": None, "seed": 0, "num_epochs": None, "worker_count": 0, "skip_bad_records": False,
    "image_size": 224, "augment": True, "crop_scale": (0.08, 1.0), "max_text_len": 32,
    "max_len": 50, "sequence_mode": "next_item", "mask_prob": 0.2, "sample_rate": 16000,
    "clip_seconds": 10.0, "log_mel_on_host": False, "num_threads": 2,
    "prefetch_buffer_size": 4, "decode_threads": 0,
}
_DOCS = {
    "split": "split to read ('' = the kind's default: train, or sequences for interactions)",
    "image_size": "output image side in pixels (image_text, query_document)",
    "crop_scale": "random-resized-crop area fraction range",
    "max_len": "interaction history length L (most recent items kept)",
    "sequence_mode": "interactions training rows: next_item | prefix | masked",
    "mask_prob": "interactions 'masked' mode: masking probability",
    "sample_rate": "audio_clip: resample rate in Hz",
    "clip_seconds": "audio_clip: crop length in seconds",
    "log_mel_on_host": "audio_clip: compute the log-mel in the input pipeline",
    "decode_threads": "threads decoding the images of each batch (0 = one per CPU core, at "
                      "most 16; with data.worker_count = W > 0, ceil(cores / W) and at least 2 "
                      "per worker); batches do not depend on it",
}


def _get(cfg: Any, key: str) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(key, _DEFAULTS.get(key))
  try:
    if hasattr(cfg, "__contains__") and key not in cfg:
      return _DEFAULTS.get(key)
    return getattr(cfg, key)
  except (AttributeError, KeyError, ValueError):
    return _DEFAULTS.get(key)


def define_config(section: Any, kind: str) -> None:
  """Declares this module's kind-specific keys on an `mmcl.config` section (skips existing)."""
  keys = {schemas.IMAGE_TEXT: ("image_size", "crop_scale", "decode_threads"),
          schemas.QUERY_DOCUMENT: ("image_size", "crop_scale", "decode_threads"),
          schemas.AUDIO_CLIP: ("sample_rate", "clip_seconds", "log_mel_on_host"),
          schemas.INTERACTIONS: ("max_len", "sequence_mode", "mask_prob"),
          schemas.ENTITY: ()}[kind]
  for k in keys:
    if k not in section:
      default = _DEFAULTS[k]
      section.define(k, list(default) if isinstance(default, tuple) else default, _DOCS[k])


def _batch_maker(meta: Mapping[str, Any], cfg: Any, *, train: bool, mode: str | None = None):
  kind = meta.get("kind")
  seed = int(_get(cfg, "seed"))
  image = ImageBatch(image_size=int(_get(cfg, "image_size")),
                     augment=train and bool(_get(cfg, "augment")),
                     crop_scale=tuple(_get(cfg, "crop_scale")), seed=seed,
                     decode_threads=image_ops.decode_threads(
                         int(_get(cfg, "decode_threads")),
                         worker_count=int(_get(cfg, "worker_count")) if train else 0))
  if kind == schemas.IMAGE_TEXT:
    return ImageTextBatch(image=image, max_text_len=int(_get(cfg, "max_text_len")))
  if kind == schemas.QUERY_DOCUMENT:
    return QueryDocumentBatch(max_text_len=int(_get(cfg, "max_text_len")),
                              image=image if meta.get("has_images") else None)
  if kind == schemas.ENTITY:
    return EntityBatch(modalities=tuple(meta["modalities"]))
  if kind == schemas.AUDIO_CLIP:
    sr = int(_get(cfg, "sample_rate"))
    return AudioBatch(sample_rate=sr, clip_seconds=float(_get(cfg, "clip_seconds")),
                      num_tags=len(meta.get("tag_names", [])), random_crop=train,
                      log_mel=audio_lib.LogMel(sample_rate=sr) if _get(cfg, "log_mel_on_host")
                      else None, seed=seed)
  if kind == schemas.INTERACTIONS:
    return SequenceBatch(max_len=int(_get(cfg, "max_len")),
                         mode=mode or str(_get(cfg, "sequence_mode")),
                         num_items=int(meta["num_items"]), mask_prob=float(_get(cfg, "mask_prob")),
                         seed=seed)
  raise ValueError(f"dataset kind {kind!r} has no pipeline (known: {schemas.KINDS})")


def _default_split(meta: Mapping[str, Any], train: bool) -> str:
  kind = meta.get("kind")
  if kind == schemas.INTERACTIONS:
    return "sequences"
  if kind == schemas.ENTITY:
    return "entities"
  if train:
    return "train" if "train" in meta["splits"] else sorted(meta["splits"])[0]
  return "test" if "test" in meta["splits"] else sorted(meta["splits"])[-1]


def open_dataset(cfg: Any, *, train: bool = True) -> tuple[records.ArrayRecordSource, dict]:
  """(source over the configured split, metadata); errors name config key `data.dir`/`split`."""
  data_dir = _get(cfg, "dir")
  if not data_dir:
    raise ValueError("config key 'data.dir' is empty: set it to a converted dataset directory")
  meta = records.load_metadata(data_dir, build_hint=BUILD_HINT)
  split = _get(cfg, "split") or _default_split(meta, train)
  if split not in meta["splits"]:
    raise ValueError(f"config key 'data.split' is {split!r}; dataset {data_dir} has splits "
                     f"{sorted(meta['splits'])}")
  return records.ArrayRecordSource(data_dir, split, metadata=meta, build_hint=BUILD_HINT,
                                   skip_bad_records=bool(_get(cfg, "skip_bad_records"))), meta


def build_train_dataset(cfg: Any, *, process_index: int = 0, process_count: int = 1
                        ) -> tuple[grain.MapDataset, records.ArrayRecordSource]:
  """(training MapDataset of batches, its source) for the dataset `cfg.dir` of any kind."""
  source, meta = open_dataset(cfg, train=True)
  ds = train_dataset(source, _batch_maker(meta, cfg, train=True),
                     global_batch_size=int(_get(cfg, "global_batch_size")),
                     seed=int(_get(cfg, "seed")), process_index=process_index,
                     process_count=process_count, num_epochs=_get(cfg, "num_epochs"))
  return ds, source


def build_train_iterator(cfg: Any, *, process_index: int = 0, process_count: int = 1
                         ) -> grain.DatasetIterator:
  """Iterator of this host's training batches; `get_state`/`set_state` resume exactly."""
  ds, _ = build_train_dataset(cfg, process_index=process_index, process_count=process_count)
  return image_text.to_iterator(ds, worker_count=int(_get(cfg, "worker_count")),
                                num_threads=int(_get(cfg, "num_threads")),
                                prefetch_buffer_size=int(_get(cfg, "prefetch_buffer_size")))


def build_eval_iterator(cfg: Any, *, batch_size: int | None = None, mode: str | None = None,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """One ordered pass over the configured eval split (`split`, default test/sequences).

  For interactions, `mode` is 'valid' or 'test' (leave-one-out target; default 'test').
  """
  source, meta = open_dataset(cfg, train=False)
  if meta.get("kind") == schemas.INTERACTIONS:
    mode = mode or "test"
  maker = _batch_maker(meta, cfg, train=False, mode=mode)
  ds = eval_dataset(source, maker, batch_size=batch_size or int(_get(cfg, "global_batch_size")),
                    process_index=process_index, process_count=process_count)
  return image_text.to_iterator(ds, worker_count=0, num_threads=int(_get(cfg, "num_threads")),
                                prefetch_buffer_size=int(_get(cfg, "prefetch_buffer_size")))
