"""ArrayRecord storage: codec, atomic writes, metadata errors, corrupt records, skip mode."""
import io
import json
import os
import pathlib

import grain
import msgpack
import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from data_pipelines import image_text
from data_pipelines import records

FIELDS = (records.Field("image", "png_image", (6, 5, 3)), records.Field("caption", "text"),
          records.Field("label", "int"), records.Field("attrs", "int32_array", (3,)),
          records.Field("ids", "int32_sequence"))


def _example(i: int) -> dict:
  rng = np.random.default_rng(i)
  return {"image": rng.integers(0, 256, (6, 5, 3)).astype(np.uint8), "caption": f"caption {i}",
          "label": i, "attrs": np.asarray([i, -1, 7]), "ids": np.arange(i % 4 + 2)}


def _write_dataset(data_dir: pathlib.Path, raws: dict[str, list[bytes]], num_shards: int = 2):
  records.begin_rewrite(data_dir)
  splits = {split: {"num_examples": len(r),
                    "shards": records.write_split(data_dir, split, r, num_records=len(r),
                                                  num_shards=num_shards)}
            for split, r in raws.items()}
  meta = {"format": records.FORMAT_NAME, "format_version": records.FORMAT_VERSION,
          "schema": records.schema_to_json(FIELDS), "splits": splits}
  records.write_metadata(data_dir, meta)
  return meta


def test_codec_round_trip_all_kinds():
  ex = _example(5)
  out = records.decode_record(records.encode_record(ex, FIELDS), FIELDS, path="f", split="s",
                              index=0, position=0)
  np.testing.assert_array_equal(out["image"], ex["image"])
  assert out["caption"] == "caption 5" and out["label"] == 5
  np.testing.assert_array_equal(out["attrs"], [5, -1, 7])
  np.testing.assert_array_equal(out["ids"], np.arange(3))
  assert out["attrs"].dtype == np.int32 and out["ids"].dtype == np.int32


def test_png_is_standard_and_pil_pngs_decode():
  img = np.random.default_rng(0).integers(0, 256, (7, 9, 3)).astype(np.uint8)
  ours = records.encode_png(img)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(ours))), img)  # any viewer
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG", optimize=True)  # PIL uses row filters
  np.testing.assert_array_equal(records.decode_png(buf.getvalue(), (7, 9, 3)), img)
  gray = img[..., :1]
  np.testing.assert_array_equal(records.decode_png(records.encode_png(gray), (7, 9, 1)), gray)
  with pytest.raises(ValueError, match=r"expected uint8 \[7, 9, 1\]"):
    records.decode_png(ours, (7, 9, 1))


def test_encode_validates_against_schema():
  ex = _example(0)
  ex["image"] = ex["image"][:, :4]
  with pytest.raises(ValueError,
                     match=r"train example 9: field 'image' expected uint8 \[6, 5, 3\]"):
    records.encode_record(ex, FIELDS, where="train example 9")
  ex = _example(0)
  del ex["caption"]
  with pytest.raises(ValueError, match="missing field 'caption'"):
    records.encode_record(ex, FIELDS, where="x")


def test_write_and_random_access(tmp_path):
  raws = [records.encode_record(_example(i), FIELDS) for i in range(7)]
  meta = _write_dataset(tmp_path, {"train": raws}, num_shards=3)
  assert [s["num_records"] for s in meta["splits"]["train"]["shards"]] == [2, 2, 3]
  assert records.verify_files(tmp_path, meta) == []
  src = records.ArrayRecordSource(tmp_path, "train")
  assert len(src) == 7
  for i in [6, 0, 3]:
    assert src[i]["caption"] == f"caption {i}" and src[i]["index"] == i
  many = src.read_many([5, 1, 5, 2])
  assert [r["label"] for r in many] == [5, 1, 5, 2]
  np.testing.assert_array_equal(many[0]["image"], _example(5)["image"])
  # grain takes it directly, including its batched-read protocol.
  ds = grain.MapDataset.source(src).map(lambda r: r["label"])
  assert list(ds) == list(range(7))
  only = records.ArrayRecordSource(tmp_path, "train", fields=["caption"])
  assert set(only[2]) == {"caption", "index"}
  with pytest.raises(KeyError, match="split 'test' not in dataset"):
    records.ArrayRecordSource(tmp_path, "test")


def test_missing_dataset_messages_name_path_and_build_command(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError) as e:
    image_text.load_metadata(missing)
  assert str(missing) in str(e.value)
  assert "mmcl data build-shapes --output" in str(e.value)
  with pytest.raises(FileNotFoundError, match="metadata.json not found"):
    image_text.train_iterator(tmp_path, global_batch_size=2, seed=0, max_text_len=8)


def test_crash_mid_write_leaves_no_complete_dataset_and_rerun_recovers(tmp_path, monkeypatch):
  kwargs = dict(num_train=20, num_test=6, num_shards=2, seed=1)
  clean = image_text.build_shapes_dataset(tmp_path / "clean", **kwargs)
  out = tmp_path / "ds"
  image_text.build_shapes_dataset(out, **kwargs)
  calls = []
  real_write = records.write_split

  def dying_write(data_dir, split, recs, **kw):
    calls.append(split)
    if split == "test":  # Crash with train written and test half-written.
      def gen():
        for i, r in enumerate(recs):
          if i == 3:
            raise KeyboardInterrupt("simulated crash")
          yield r
      return real_write(data_dir, split, gen(), **kw)
    return real_write(data_dir, split, recs, **kw)

  monkeypatch.setattr(records, "write_split", dying_write)
  with pytest.raises(KeyboardInterrupt):
    image_text.build_shapes_dataset(out, **dict(kwargs, seed=2))  # different params: rebuild
  assert calls == ["train", "test"]
  assert not (out / "metadata.json").exists()
  assert not [p for p in out.iterdir() if records.is_temporary(p.name)]
  with pytest.raises(FileNotFoundError, match="build that was interrupted"):
    image_text.load_metadata(out)
  monkeypatch.setattr(records, "write_split", real_write)
  # A writer killed hard leaves its temporary file behind: readers ignore it, rebuilds remove it.
  stray = out / ".test.array_record-00000-of-00002.tmp-999-abc"
  stray.write_bytes(b"half a shard")
  meta = image_text.build_shapes_dataset(out, **kwargs)
  assert not stray.exists()
  assert meta["splits"] == clean["splits"]  # byte-identical shards (sha256 in metadata)


def test_stray_temporary_file_is_ignored_by_readers(shapes_copy):
  (shapes_copy / ".train.array_record-00000-of-00003.tmp-1-deadbeef").write_bytes(b"junk")
  src = image_text.open_source(shapes_copy, "train")
  assert len(src) == 96 and src[0]["index"] == 0


def test_idempotent_build_does_not_rewrite(shapes_copy, small_params):
  mtimes = {p.name: p.stat().st_mtime_ns for p in shapes_copy.iterdir()}
  meta = image_text.build_shapes_dataset(shapes_copy, **small_params)
  assert {p.name: p.stat().st_mtime_ns for p in shapes_copy.iterdir()} == mtimes
  assert meta == image_text.load_metadata(shapes_copy)
  # A damaged shard fails verification, so the same call repairs it.
  shard = shapes_copy / meta["splits"]["test"]["shards"][1]["file"]
  shard.write_bytes(shard.read_bytes()[:100])
  image_text.build_shapes_dataset(shapes_copy, **small_params)
  assert records.verify_files(shapes_copy, image_text.load_metadata(shapes_copy)) == []


def _raw_record(path: pathlib.Path, position: int) -> dict:
  reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
  raw = reader.read([position])[0]
  reader.close()
  return msgpack.unpackb(raw, raw=False)


@pytest.mark.parametrize("damage,field", [
    ("png", "image"), ("missing_caption", "caption"), ("garbage", "<record>"),
    ("caption_ids", "caption_ids")])
def test_corrupt_record_error_names_file_record_and_field(shapes_copy, rewrite_record, damage,
                                                         field):
  meta = image_text.load_metadata(shapes_copy)
  shard = meta["splits"]["train"]["shards"][1]  # records 32..63
  assert shard["num_records"] == 32  # 96 records in 3 shards: record 37 is position 5 of shard 1
  rec = _raw_record(shapes_copy / shard["file"], 5)
  if damage == "png":
    png = bytearray(rec["image"])
    png[45] ^= 0xFF  # inside the IDAT payload
    rec["image"] = bytes(png)
  elif damage == "missing_caption":
    del rec["caption"]
  elif damage == "caption_ids":
    rec["caption_ids"] = b"\x01\x02\x03"  # not a whole number of int32
  raw = b"\xc1 not msgpack" if damage == "garbage" else msgpack.packb(rec, use_bin_type=True)
  rewrite_record(shapes_copy, shard["file"], 5, raw)
  src = image_text.open_source(shapes_copy, "train")
  assert src[36]["index"] == 36  # neighbours are fine
  with pytest.raises(records.CorruptRecordError) as e:
    src.read_many([3, 37, 90])
  msg = str(e.value)
  assert shard["file"] in msg and "record index 37" in msg and f"field {field!r}" in msg
  assert "record 5 of that file" in msg
  assert (e.value.index, e.value.field) == (37, field)


def test_byte_level_file_corruption_names_the_file(shapes_copy):
  meta = image_text.load_metadata(shapes_copy)
  name = meta["splits"]["test"]["shards"][0]["file"]
  path = shapes_copy / name
  data = bytearray(path.read_bytes())
  src = image_text.open_source(shapes_copy, "test")
  # Flip one byte inside a record (records are stored uncompressed, so the caption text is
  # visible in the file): riegeli's chunk hashes catch it.
  data[data.index(b"background") + 2] ^= 0x55
  path.write_bytes(bytes(data))
  n = meta["splits"]["test"]["shards"][0]["num_records"]
  with pytest.raises(records.CorruptRecordError) as e:
    for i in range(n):
      src[i]
  assert name in str(e.value)
  # A truncated shard is caught by the record count check.
  path.write_bytes(bytes(data[:len(data) // 2]))
  with pytest.raises(records.CorruptRecordError, match=f"{name}.*truncated"):
    image_text.open_source(shapes_copy, "test")[0]


def test_skip_mode_logs_and_counts(shapes_copy, rewrite_record, caplog):
  meta = image_text.load_metadata(shapes_copy)
  shard = meta["splits"]["train"]["shards"][0]["file"]
  rewrite_record(shapes_copy, shard, 4, b"\xc1garbage")
  rewrite_record(shapes_copy, shard, 9, b"\xc1garbage")
  src = image_text.open_source(shapes_copy, "train", skip_bad_records=True)
  assert src[4] is None and src.num_skipped == 1
  assert shard in caplog.text and "record index 4" in caplog.text
  labels = [r["index"] for r in grain.MapDataset.source(src).to_iter_dataset()]
  assert len(labels) == 94 and 4 not in labels and 9 not in labels
  assert src.num_skipped == 3


def test_bad_metadata_messages(tmp_path):
  raws = [records.encode_record(_example(i), FIELDS) for i in range(3)]
  meta = _write_dataset(tmp_path, {"train": raws}, num_shards=1)
  meta["format_version"] = 99
  (tmp_path / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="'format_version' is 99"):
    records.load_metadata(tmp_path)
  (tmp_path / "metadata.json").write_text("{")
  with pytest.raises(ValueError, match="metadata.json: not valid JSON"):
    records.load_metadata(tmp_path)
  meta["format_version"] = records.FORMAT_VERSION
  (tmp_path / "metadata.json").write_text(json.dumps(meta))
  os.remove(tmp_path / meta["splits"]["train"]["shards"][0]["file"])
  with pytest.raises(FileNotFoundError, match="train.array_record-00000-of-00001 listed in"):
    records.ArrayRecordSource(tmp_path, "train")
