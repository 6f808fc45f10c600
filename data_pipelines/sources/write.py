"""Writing records in each source format with that format's own tools: webdataset shards with
`webdataset.ShardWriter`, parquet files with pyarrow, a tfds build with a `GeneratorBasedBuilder`
prepared with `file_format="array_record"`. For examples, tests and benchmarks; training reads
the formats as users already hold them, without conversion.

Image–text pairs: (key, encoded image bytes, caption) (`write_webdataset`, `write_parquet`,
`write_tfds`). Records of any other fields: dicts (`write_webdataset_samples`,
`write_parquet_rows`, `write_tfds_rows`).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from typing import Sequence

Pair = tuple[str, bytes, str]


def write_webdataset(pairs: Sequence[Pair], folder: str | os.PathLike, *,
                     per_shard: int) -> list[str]:
  """Shards `folder/{00000..}.tar` of `per_shard` samples ({key}.jpg, .txt, .json), as
  img2dataset lays them out. Returns the shard paths."""
  import webdataset as wds  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
    for key, image, caption in pairs:
      sink.write({"__key__": key, "jpg": image, "txt": caption,
                  "json": json.dumps({"key": key, "caption": caption}).encode()})
  return sorted(str(p) for p in folder.glob("*.tar"))


def write_webdataset_samples(samples: Sequence[dict], folder: str | os.PathLike, *,
                             per_shard: int) -> list[str]:
  """Shards `folder/{00000..}.tar` of `per_shard` samples, each a dict {"__key__": key,
  extension: bytes, ...} as `webdataset.ShardWriter` takes them. Returns the shard paths."""
  import webdataset as wds  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
    for sample in samples:
      sink.write(sample)
  return sorted(str(p) for p in folder.glob("*.tar"))


def write_parquet_rows(rows: Sequence[dict], folder: str | os.PathLike, *, per_file: int,
                       row_group_size: int = 64) -> list[str]:
  """Files `folder/part-{00000..}.parquet` of `per_file` rows, one column per key of the rows
  (pyarrow infers the types: bytes → binary, str → string, ...). Returns the file paths."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for f, start in enumerate(range(0, len(rows), per_file)):
    chunk = rows[start:start + per_file]
    table = pa.table({k: [r[k] for r in chunk] for k in chunk[0]})
    path = folder / f"part-{f:05d}.parquet"
    pq.write_table(table, path, row_group_size=row_group_size)
    paths.append(str(path))
  return paths


def write_parquet(pairs: Sequence[Pair], folder: str | os.PathLike, *, per_file: int,
                  row_group_size: int = 64, image_column: str = "image",
                  caption_column: str = "caption", key_column: str = "key") -> list[str]:
  """Files `folder/part-{00000..}.parquet` of `per_file` rows with the image bytes, caption and
  key columns. Returns the file paths."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for f, start in enumerate(range(0, len(pairs), per_file)):
    chunk = pairs[start:start + per_file]
    table = pa.table({key_column: [p[0] for p in chunk],
                      image_column: pa.array([p[1] for p in chunk], pa.binary()),
                      caption_column: [p[2] for p in chunk]})
    path = folder / f"part-{f:05d}.parquet"
    pq.write_table(table, path, row_group_size=row_group_size)
    paths.append(str(path))
  return paths


def write_tfds(splits: dict[str, Sequence[Pair]], data_dir: str | os.PathLike, *,
               name: str = "image_text_pairs") -> pathlib.Path:
  """A tfds dataset `name` (features image (JPEG as given), caption, key) prepared into
  `data_dir` with file_format="array_record"; read it back as `tfds:{name}:{split}@{data_dir}`.
  Returns the build folder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(encoding_format="jpeg"),
          "caption": tfds.features.Text(), "key": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(pairs) for split, pairs in splits.items()}

    def _generate_examples(self, pairs):
      for key, image, caption in pairs:  # bytes pass through as the encoded file
        yield key, {"image": io.BytesIO(image), "caption": caption, "key": key}

  Builder.name = name
  builder = Builder(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      verify_ssl=False))
  return pathlib.Path(builder.data_dir)


def write_tfds_rows(splits: dict[str, Sequence[dict]], data_dir: str | os.PathLike, *,
                    name: str, kinds: dict[str, str]) -> pathlib.Path:
  """A tfds dataset `name` with one feature per key of `kinds` ("image": the encoded image as
  given, "text", "int" → int64, "float" → float64), prepared into `data_dir` with
  file_format="array_record"; rows keep their order (key = position). Returns the build folder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def feature(kind: str):
    return {"image": lambda: tfds.features.Image(encoding_format="jpeg"),
            "text": tfds.features.Text, "int": lambda: tfds.features.Scalar(np.int64),
            "float": lambda: tfds.features.Scalar(np.float64)}[kind]()

  present = {k: v for k, v in kinds.items()
             if all(k in r for rows in splits.values() for r in rows)}

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {k: feature(v) for k, v in present.items()}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(rows) for split, rows in splits.items()}

    def _generate_examples(self, rows):
      for i, r in enumerate(rows):  # image bytes pass through as the encoded file
        yield i, {k: io.BytesIO(r[k]) if v == "image" else r[k] for k, v in present.items()}

  Builder.name = name
  builder = Builder(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  return pathlib.Path(builder.data_dir)
