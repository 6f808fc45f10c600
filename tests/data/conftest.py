"""Fixtures for data pipeline tests: one small shapes dataset built once per session."""
import pathlib
import shutil

import pytest
from array_record.python import array_record_module

from data_pipelines import image_text
from data_pipelines import records

SMALL = dict(num_train=96, num_test=23, image_size=32, seed=3, num_shards=3)


@pytest.fixture(scope="session")
def small_shapes_dir(tmp_path_factory) -> pathlib.Path:
  """A read-only shapes dataset (96 train / 23 test pairs in 3 shards per split)."""
  out = tmp_path_factory.mktemp("shapes") / "ds"
  image_text.build_shapes_dataset(out, **SMALL)
  return out


@pytest.fixture
def small_params() -> dict:
  """The build_shapes_dataset arguments of `small_shapes_dir`."""
  return dict(SMALL)


@pytest.fixture
def shapes_copy(small_shapes_dir, tmp_path) -> pathlib.Path:
  """A private copy of the small dataset that a test may damage."""
  dst = tmp_path / "ds"
  shutil.copytree(small_shapes_dir, dst)
  return dst


def _rewrite_record(data_dir: pathlib.Path, shard_file: str, position: int, new_raw: bytes):
  """Rewrites one record of a shard (keeping the metadata), as a faulty producer would."""
  path = data_dir / shard_file
  reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
  raws = list(reader.read_all())
  reader.close()
  raws[position] = new_raw
  writer = array_record_module.ArrayRecordWriter(str(path), records.WRITER_OPTIONS)
  for r in raws:
    writer.write(r)
  writer.close()


@pytest.fixture
def rewrite_record():
  """`rewrite_record(data_dir, shard_file, position, raw)` replaces one record's bytes."""
  return _rewrite_record
