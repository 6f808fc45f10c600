"""Encoded-image transforms, the image-captions and Marqo-GS converters, and their pipelines:
bad images are reported with file/record/field or skipped and counted."""
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import convert as convert_lib
from data_pipelines import image_ops
from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines.converters import common


def _jpeg(rng, h=40, w=56) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def test_random_resized_crop_boxes_respect_bounds_scale_ratio():
  n = 2000
  h = np.full(n, 300)
  w = np.full(n, 200)
  boxes = image_ops.random_resized_crop_boxes(h, w, seed=0, epoch=0, indices=np.arange(n),
                                              scale=(0.2, 0.9), ratio=(0.75, 4 / 3))
  left, top, right, bottom = boxes.T
  assert (left >= 0).all() and (top >= 0).all() and (right <= 200).all() and (bottom <= 300).all()
  cw, ch = right - left, bottom - top
  area = cw * ch / (300 * 200)
  assert area.min() > 0.19 and area.max() < 0.91
  assert (cw / ch).min() > 0.74 and (cw / ch).max() < 1.35
  again = image_ops.random_resized_crop_boxes(h, w, seed=0, epoch=0, indices=np.arange(n),
                                              scale=(0.2, 0.9), ratio=(0.75, 4 / 3))
  np.testing.assert_array_equal(boxes, again)
  other = image_ops.random_resized_crop_boxes(h, w, seed=0, epoch=1, indices=np.arange(n),
                                              scale=(0.2, 0.9), ratio=(0.75, 4 / 3))
  assert (other != boxes).any()
  # A 1 x 100 strip admits no crop of ratio in [3/4, 4/3]: central fallback, clamped ratio.
  fb = image_ops.random_resized_crop_boxes(np.asarray([1]), np.asarray([100]), seed=0, epoch=0,
                                           indices=np.asarray([0]))
  np.testing.assert_array_equal(fb[0], [49, 0, 50, 1])
  np.testing.assert_array_equal(image_ops.center_crop_boxes(np.asarray([30]), np.asarray([50])),
                                [[10, 0, 40, 30]])


def test_decode_crop_resize_flip_normalize():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  out = image_ops.decode_crop_resize(image_ops.open_image(buf.getvalue()), (0, 0, 64, 64), 64)
  np.testing.assert_array_equal(out, img)  # identity box and size: exact for lossless PNG
  flipped = image_ops.decode_crop_resize(image_ops.open_image(buf.getvalue()), (16, 8, 48, 40),
                                         32, flip=True)
  np.testing.assert_array_equal(flipped, img[8:40, 16:48][:, ::-1])
  norm = image_ops.normalize(img[None])
  want = (img / 255.0 - np.asarray(image_ops.CLIP_MEAN)) / np.asarray(image_ops.CLIP_STD)
  np.testing.assert_allclose(norm[0], want, atol=1e-5)
  with pytest.raises(ValueError, match="image decode failed"):
    image_ops.open_image(b"not an image")
  truncated = _jpeg(rng, 200, 200)[:600]
  with pytest.raises(ValueError, match="image decode failed"):
    image_ops.decode_crop_resize(image_ops.open_image(truncated), (0, 0, 200, 200), 32)


def test_fashion_product_images(shared_data, tmp_path):
  root = shared_data / "fashion-product-images"
  meta = convert_lib.convert("image-captions", root / "styles.csv", tmp_path / "fp",
                             image_root=str(root / "images"), caption_column="productDisplayName",
                             id_column="id", split_by="holdout:0.1", vocab_size=2048)
  counts = {k: v["num_examples"] for k, v in meta["splits"].items()}
  assert sum(counts.values()) == 3221 and 200 < counts["test"] < 450
  with open(root / "styles.csv", newline="") as f:
    titles = {r["id"]: r["productDisplayName"] for r in csv.DictReader(f)}
  src = records.ArrayRecordSource(tmp_path / "fp", "test")
  rec = src[0]
  assert rec["caption"] == titles[rec["id"]]
  assert rec["image"] == (root / "images" / f"{rec['id']}.jpg").read_bytes()  # stored as is
  cfg = {"dir": str(tmp_path / "fp"), "global_batch_size": 8, "seed": 0, "num_epochs": 1,
         "image_size": 96, "max_text_len": 16}
  ds, _ = pipelines.build_train_dataset(cfg)
  b0, b1 = ds[0], ds[1]
  assert b0["image"].shape == (8, 96, 96, 3) and b0["image"].dtype == np.uint8
  assert b0["image"].std() > 10  # real photo pixels, not a blank
  assert (b0["text"][:, 0] == 2).all() and b0["text"].dtype == np.int32
  np.testing.assert_array_equal(ds[0]["image"], b0["image"])  # deterministic
  it = pipelines.build_train_iterator(cfg)
  next(it)
  state = it.get_state()
  it2 = pipelines.build_train_iterator(cfg)
  it2.set_state(state)
  np.testing.assert_array_equal(next(it2)["image"], b1["image"])
  ev = next(pipelines.build_eval_iterator(cfg, batch_size=4))
  assert ev["valid"].all() and ev["image"].shape == (4, 96, 96, 3)


def _caption_folder(tmp_path, rng, n=12, bad=()):
  (tmp_path / "img").mkdir()
  rows = []
  for i in range(n):
    data = _jpeg(rng)
    if i in bad:
      data = data[:300]  # truncated: header parses, pixels do not
    (tmp_path / "img" / f"{i}.jpg").write_bytes(data)
    rows.append({"file": f"img/{i}.jpg", "text": f"picture number {i}", "split": "train"})
  with open(tmp_path / "caps.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return tmp_path / "caps.jsonl"


def test_image_captions_bad_images_reported_or_skipped(tmp_path):
  rng = np.random.default_rng(1)
  caps = _caption_folder(tmp_path, rng, bad=(4,))
  opts = dict(image_column="file", caption_column="text", split_by="column:split")
  with pytest.raises(common.ConversionError, match=r"caps\.jsonl:5, field 'file'.*decode"):
    convert_lib.convert("image-captions", caps, tmp_path / "o", **opts)
  meta = convert_lib.convert("image-captions", caps, tmp_path / "o", skip_bad_records=True,
                             **opts)
  assert meta["skipped"]["count"] == 1 and meta["skipped"]["examples"][0]["line"] == 5
  assert meta["splits"]["train"]["num_examples"] == 11
  (tmp_path / "img" / "4.jpg").write_bytes(_jpeg(rng))
  with open(caps, "a") as f:
    f.write(json.dumps({"file": "img/missing.jpg", "text": "x", "split": "train"}) + "\n")
  with pytest.raises(common.ConversionError, match=r"caps\.jsonl:13, field 'file'.*not found"):
    convert_lib.convert("image-captions", caps, tmp_path / "o2", **opts)


def test_pipeline_reports_or_skips_undecodable_image(tmp_path, rewrite_record):
  rng = np.random.default_rng(2)
  caps = _caption_folder(tmp_path, rng)
  out = tmp_path / "o"
  meta = convert_lib.convert("image-captions", caps, out, image_column="file",
                             caption_column="text", num_shards=2)
  shard = meta["splits"]["train"]["shards"][1]["file"]
  good = records.ArrayRecordSource(out, "train")[6]  # record 0 of shard 1
  fields = records.schema_from_json(meta["schema"])
  broken = dict(good, image=good["image"][:300])
  rewrite_record(out, shard, 0, records.encode_record(broken, fields))
  meta2 = json.loads((out / "metadata.json").read_text())
  for s in meta2["splits"]["train"]["shards"]:  # keep the metadata consistent with the edit
    s["num_bytes"] = (out / s["file"]).stat().st_size
    s["sha256"] = records.sha256_file(out / s["file"])
  records.write_metadata(out, meta2)
  cfg = {"dir": str(out), "global_batch_size": 12, "seed": 0, "image_size": 32,
         "max_text_len": 8, "augment": False}
  ds, _ = pipelines.build_train_dataset(cfg)
  with pytest.raises(records.CorruptRecordError, match=rf"{shard}: record 0 .*field 'image'"):
    ds[0]
  ds, source = pipelines.build_train_dataset(dict(cfg, skip_bad_records=True, decode_threads=1))
  batch = ds[0]
  assert batch["image"].shape == (12, 32, 32, 3) and source.num_skipped == 1
  assert 6 not in batch["index"].tolist() and 7 in batch["index"].tolist()
  # Decoded in 3 threads: the same substitute, the same pixels, the bad record counted once.
  ds, source = pipelines.build_train_dataset(dict(cfg, skip_bad_records=True, decode_threads=3))
  threaded = ds[0]
  assert source.num_skipped == 1
  for key in batch:
    np.testing.assert_array_equal(threaded[key], batch[key])


def _marqo_rows(split, n, images):
  return [{"query": f"red shoe {split} {q}", "product_id": f"p{split}{i}",
           "position": i + 1, "title": f"product {i} for {q}", "score_linear": 100 - i,
           "score_reciprocal": 1.0 / (i + 1), "query_id": f"q{split}{q}",
           "image_local": images[(q * n + i) % len(images)]}
          for q in range(2) for i in range(n)]


def test_marqo_csv_and_parquet(tmp_path):
  rng = np.random.default_rng(3)
  (tmp_path / "imgs").mkdir()
  names = []
  for i in range(3):
    (tmp_path / "imgs" / f"{i}.jpg").write_bytes(_jpeg(rng))
    names.append(f"{i}.jpg")
  folder = tmp_path / "gs"
  folder.mkdir()
  for split, n in (("in_domain", 3), ("novel_query", 2)):
    with open(folder / f"{split}.csv", "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(_marqo_rows(split, n, names)[0]))
      w.writeheader()
      w.writerows(_marqo_rows(split, n, names))
  meta = convert_lib.convert("marqo-gs", folder, tmp_path / "o", image_root=str(tmp_path / "imgs"))
  assert {k: v["num_examples"] for k, v in meta["splits"].items()} == {"in_domain": 6,
                                                                      "novel_query": 4}
  assert meta["has_images"] and meta["num_queries"] == {"in_domain": 2, "novel_query": 2}
  rec = records.ArrayRecordSource(tmp_path / "o", "novel_query")[1]
  assert rec["position"] == 2 and rec["score_reciprocal"] == 0.5 and rec["score_linear"] == 99.0
  cfg = {"dir": str(tmp_path / "o"), "split": "in_domain", "global_batch_size": 4,
         "image_size": 32, "max_text_len": 12}
  b = pipelines.build_train_dataset(cfg)[0][0]
  assert b["image"].shape == (4, 32, 32, 3) and b["query"].shape == (4, 12)
  assert b["score_linear"].dtype == np.float32
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  rows = _marqo_rows("zero_shot", 2, names)
  for r in rows:  # Hugging Face Image feature layout: struct of bytes + path
    r["image"] = {"bytes": (tmp_path / "imgs" / r.pop("image_local")).read_bytes(), "path": "x"}
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "zero_shot-00000-of-00001.parquet")
  meta = convert_lib.convert("marqo-gs", tmp_path / "zero_shot-00000-of-00001.parquet",
                             tmp_path / "o2")
  assert meta["splits"]["train"]["num_examples"] == 4 and meta["has_images"]
  pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "title"}
                                       for r in rows]), tmp_path / "bad.parquet")
  with pytest.raises(common.ConversionError, match=r"bad\.parquet:1, field 'title'.*missing"):
    convert_lib.convert("marqo-gs", tmp_path / "bad.parquet", tmp_path / "o3")


def _coordinate_jpegs(tmp_path, n, h=200, w=250):
  """JPEGs whose red channel is the column x and green the row y of each pixel (4:4:4, q95)."""
  (tmp_path / "img").mkdir()
  y, x = np.mgrid[:h, :w]
  img = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95, subsampling=0)
  rows = []
  for i in range(n):
    (tmp_path / "img" / f"{i}.jpg").write_bytes(buf.getvalue())
    rows.append({"file": f"img/{i}.jpg", "text": f"grid {i}", "split": "train"})
  with open(tmp_path / "caps.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  convert_lib.convert("image-captions", tmp_path / "caps.jsonl", tmp_path / "grid",
                      image_column="file", caption_column="text", split_by="column:split")
  return tmp_path / "grid"


def _measured_crops(images):
  """Crop box (left, width, top, height) and flip of each [b, S, S, 3] crop of a coordinate image,
  read off its first and last columns / rows (pixel value v sits at coordinate v + 0.5)."""
  s = images.shape[1]
  r, g = images[..., 0].astype(np.float64), images[..., 1].astype(np.float64)
  first, last = r[:, :, 0].mean(1), r[:, :, -1].mean(1)
  flip = first > last
  first, last = np.minimum(first, last), np.maximum(first, last)
  width = (last - first) * s / (s - 1)
  top_v, bottom_v = g[:, 0, :].mean(1), g[:, -1, :].mean(1)
  height = (bottom_v - top_v) * s / (s - 1)
  return first + 0.5 - width / (2 * s), width, top_v + 0.5 - height / (2 * s), height, flip


def test_decoder_paths_give_the_same_batches_and_crop_statistics(tmp_path):
  """The libjpeg-turbo path and the Pillow path: same shapes and dtypes, the drawn crop boxes and
  flips applied, and the same crop area / aspect-ratio distributions (two-sample KS test)."""
  from scipy import stats
  n, size, h, w = 256, 48, 200, 250
  cfg = {"dir": str(_coordinate_jpegs(tmp_path, n, h, w)), "global_batch_size": n, "seed": 3,
         "image_size": size, "max_text_len": 8}
  source, meta = pipelines.open_dataset(cfg)
  batches = {}
  for decoder, threads in (("auto", 1), ("pillow", 1), ("auto threaded", 4)):
    maker = pipelines.ImageTextBatch(image=pipelines.ImageBatch(
        image_size=size, seed=3, decoder=decoder.split()[0], decode_threads=threads),
        max_text_len=8)
    batches[decoder] = maker(source, np.arange(n), 0)
  threaded = batches.pop("auto threaded")
  a, p = batches["auto"], batches["pillow"]
  for key in a:  # the same batch whatever the number of decode threads
    np.testing.assert_array_equal(threaded[key], a[key])
  for key in a:
    assert a[key].shape == p[key].shape and a[key].dtype == p[key].dtype, key
  assert a["image"].dtype == np.uint8 and a["image"].shape == (n, size, size, 3)
  np.testing.assert_array_equal(a["index"], p["index"])
  assert np.abs(a["image"].astype(int) - p["image"]).mean() < 2.0
  boxes = image_ops.random_resized_crop_boxes(np.full(n, h), np.full(n, w), seed=3, epoch=0,
                                              indices=a["index"])
  flips = image_ops.flip_mask(seed=3, epoch=0, indices=a["index"])
  true_area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (h * w)
  true_aspect = (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 3] - boxes[:, 1])
  measured = {}
  for decoder, batch in batches.items():
    left, cw, top, ch, flip = _measured_crops(batch["image"])
    np.testing.assert_array_equal(flip, flips)  # every drawn flip, and only those
    np.testing.assert_allclose(left, boxes[:, 0], atol=3)
    np.testing.assert_allclose(top, boxes[:, 1], atol=3)
    np.testing.assert_allclose(cw * ch / (h * w), true_area, atol=0.03)
    np.testing.assert_allclose(cw / ch, true_aspect, rtol=0.06)
    measured[decoder] = (cw * ch / (h * w), cw / ch)
  for i, name in enumerate(("area", "aspect")):
    p_value = stats.ks_2samp(measured["auto"][i], measured["pillow"][i]).pvalue
    assert p_value > 0.05, (name, p_value)
  # The boxes follow torchvision's RandomResizedCrop.get_params (independent numpy draws, the
  # same rejection loop), and flips are fair.
  ref_rng = np.random.default_rng(0)
  ref_area, ref_aspect = [], []
  for _ in range(2000):
    for _ in range(10):
      area = h * w * ref_rng.uniform(0.08, 1.0)
      aspect = np.exp(ref_rng.uniform(np.log(3 / 4), np.log(4 / 3)))
      cw_, ch_ = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
      if 0 < cw_ <= w and 0 < ch_ <= h:
        ref_area.append(cw_ * ch_ / (h * w))
        ref_aspect.append(cw_ / ch_)
        break
  assert stats.ks_2samp(true_area, ref_area).pvalue > 0.01
  assert stats.ks_2samp(true_aspect, ref_aspect).pvalue > 0.01
  assert stats.ks_2samp(measured["auto"][0], ref_area).pvalue > 0.01
  assert stats.binomtest(int(flips.sum()), n, 0.5).pvalue > 0.01
