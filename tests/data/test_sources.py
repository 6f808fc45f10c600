"""webdataset / tfds / parquet sources: parsing and errors, order rules, exact resume, hold-out,
tokenizer, bad samples, and the CLIP recipe trained and evaluated on each.

The three sources are written once per test run, with each format's own writer, from the
same 320 real photos and product titles of ../shared/data/fashion-product-images (re-encoded at
64 px so decoding is cheap).
"""
import csv
import dataclasses
import io
import json
import pathlib
import shutil
import tarfile

import grain
import numpy as np
import pytest
from batch_checks import assert_batches_equal, take
from etils import epath
from PIL import Image

from data_pipelines import records
from data_pipelines import sources
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.sources import pairs
from data_pipelines.sources import stream
from data_pipelines.sources import write

REPO = pathlib.Path(__file__).resolve().parents[2]
FASHION = REPO.parent / "shared" / "data" / "fashion-product-images"
N, PER_SHARD, B, L, HOLDOUT = 320, 80, 32, 24, 0.2


def _small_jpeg(path: pathlib.Path) -> bytes:
  im = Image.open(path).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
  out = io.BytesIO()
  im.save(out, "JPEG", quality=90)
  return out.getvalue()


@pytest.fixture(scope="session")
def fashion_sources(tmp_path_factory):
  """{"pairs": [(key, jpeg, caption)], "webdataset"/"parquet"/"tfds": spec, "root": folder}."""
  if not FASHION.is_dir():
    pytest.skip(f"shared datasets not found at {FASHION} (the photos the sources are built from)")
  pytest.importorskip("webdataset", reason="the webdataset package writes the shards: "
                                           "pip install 'webdataset>=1.0.2' (test extra)")
  pytest.importorskip("pyarrow", reason="pyarrow writes the parquet files (test extra)")
  with open(FASHION / "styles.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))[:N]
  prs = [(r["id"], _small_jpeg(FASHION / "images" / r["image"]), r["productDisplayName"])
         for r in rows]
  root = tmp_path_factory.mktemp("sources")
  write.write_webdataset(prs, root / "wds", per_shard=PER_SHARD)
  write.write_parquet(prs, root / "pq", per_file=PER_SHARD, row_group_size=32)
  write.write_tfds({"train": prs}, root / "tfds", name="fashion_pairs")
  last = N // PER_SHARD - 1
  return {"pairs": prs, "root": root,
          "webdataset": f"webdataset:{root}/wds/{{00000..{last:05d}}}.tar",
          "parquet": f"parquet:{root}/pq/*.parquet",
          "tfds": f"tfds:fashion_pairs:train@{root}/tfds"}


def _data(spec, tmp_path, **kw):
  args = dict(seed=1, image_size=32, max_text_len=L, vocab_size=256, holdout_fraction=HOLDOUT,
              eval_examples=0, shuffle_buffer=24, cache_dir=str(tmp_path / "cache"),
              decode_threads=3)
  args.update(kw)
  return pairs.ImageTextData(spec, **args)


def test_specs_and_their_errors(fashion_sources, tmp_path):
  assert sources.parse("tfds:coco/2017:validation@/d") == sources.SourceSpec(
      "tfds", "/d", name="coco", config="2017", split="validation")
  assert sources.parse("tfds:coco@/d").split == "train"
  assert sources.parse("/data/shapes") == sources.SourceSpec("arrayrecord", "/data/shapes")
  with pytest.raises(sources.SourceConfigError, match="unknown scheme 'hdf5'"):
    sources.parse("hdf5:/x")
  with pytest.raises(sources.SourceConfigError, match="@DATA_DIR"):
    sources.parse("tfds:coco")
  root = fashion_sources["root"]
  with pytest.raises(FileNotFoundError, match=r"00004\.tar, .*00005\.tar"):
    pairs.PairSource(f"webdataset:{root}/wds/{{00000..00005}}.tar")
  with pytest.raises(FileNotFoundError, match="no such file"):
    pairs.PairSource(f"parquet:{root}/nothing/*.parquet")
  with pytest.raises(sources.SourceConfigError,
                     match=r"part-00000\.parquet: no column 'text' \(config key "
                           r"data\.caption_field\); the file has columns \['key', 'image', "
                           r"'caption'\]"):
    pairs.PairSource(fashion_sources["parquet"], pairs.Fields(caption="text"))
  with pytest.raises(sources.SourceConfigError, match=r"no feature 'img'.*\['caption', 'image', "
                                                      r"'key'\]"):
    pairs.PairSource(fashion_sources["tfds"], pairs.Fields(image="img"))
  with pytest.raises(sources.SourceConfigError, match=r"no split 'test' \(splits: \['train'\]\)"):
    pairs.PairSource(fashion_sources["tfds"].replace(":train@", ":test@"))
  with pytest.raises(FileNotFoundError, match="no tfds build of 'nope'"):
    pairs.PairSource(f"tfds:nope@{root}/tfds")


def test_unknown_scheme_is_a_config_error_naming_the_key(tmp_path):
  from mmcl.config import ConfigError, load_config_file
  from mmcl.tasks import get_task_class
  from mmcl.train import loop as loop_lib
  c = load_config_file(str(REPO / "experiments/clip_shapes.py") + ":tiny")
  c.data.source = "lmdb:/data"
  with pytest.raises(ConfigError, match="config key 'data.source' = 'lmdb:/data'.*unknown scheme"):
    loop_lib.setup(c, get_task_class("clip"))


def test_too_few_held_out_samples_is_one_line_exit_code_2(fashion_sources, tmp_path):
  from mmcl.cli import _exit_code
  d = _data(fashion_sources["parquet"], tmp_path, holdout_fraction=0.01)
  with pytest.raises(sources.SourceConfigError,
                     match=r"\d held-out samples, fewer than one batch of 32; raise "
                           r"data\.holdout_fraction \(now 0\.01\)") as e:
    d.val_iterator(global_batch_size=B)
  assert _exit_code(e.value) == 2 and "\n" not in str(e.value)
  with pytest.raises(sources.SourceConfigError, match="nothing is held out"):
    _data(fashion_sources["parquet"], tmp_path, holdout_fraction=0.0)


def test_same_pairs_through_webdataset_and_parquet_give_the_same_batches(fashion_sources,
                                                                          tmp_path):
  wds = _data(fashion_sources["webdataset"], tmp_path)
  pq = _data(fashion_sources["parquet"], tmp_path)
  a = take(wds.train_iterator(global_batch_size=B, num_threads=0, prefetch_buffer_size=0), 10)
  b = take(pq.train_iterator(global_batch_size=B, num_threads=0, prefetch_buffer_size=0), 10)
  assert_batches_equal(a, b)
  assert a[0]["image"].shape == (B, 32, 32, 3) and a[0]["text"].shape == (B, L)
  # Rows are the real pairs: index = the key's hash, text = the caption's tokens.
  by_index = {stream.key_index(k): (k, c) for k, _, c in fashion_sources["pairs"]}
  captions = [by_index[int(i)][1] for i in a[0]["index"]]
  np.testing.assert_array_equal(a[0]["text"], wds.tokenizer.encode(captions, L))
  # uint8 pixels, as on the ArrayRecord path (the image tower normalises them on the device).
  assert a[0]["image"].dtype == np.uint8 and a[0]["image"].max() > a[0]["image"].min()
  # Decoding threads change nothing.
  one = take(_data(fashion_sources["webdataset"], tmp_path, decode_threads=1).train_iterator(
      global_batch_size=B, num_threads=0, prefetch_buffer_size=0), 2)
  assert_batches_equal(one, a[:2])
  # Another seed gives another order.
  c = take(_data(fashion_sources["parquet"], tmp_path, seed=2).train_iterator(
      global_batch_size=B, num_threads=0, prefetch_buffer_size=0), 1)
  assert not np.array_equal(a[0]["index"], c[0]["index"])


def test_held_out_part_is_a_stable_key_hash_and_never_trained_on(fashion_sources, tmp_path):
  keys = [k for k, _, _ in fashion_sources["pairs"]]
  expected = [k for k in keys if stream.key_fraction(k) < HOLDOUT]
  assert 0.1 * N < len(expected) < 0.3 * N
  for name in ("webdataset", "parquet"):
    d = _data(fashion_sources[name], tmp_path)
    assert [r["key"] for r in d.held_out().rows] == expected  # natural order
    # One epoch on one host: every training key once, no held-out key.
    raw = stream.StreamedBatches(d.source.reader, stream.StreamOptions(
        batch_size=1, seed=1, num_epochs=1, holdout_fraction=HOLDOUT, shuffle_buffer=24))
    seen = [b[0]["key"] for b in raw]
    assert sorted(seen) == sorted(set(keys) - set(expected))
  tf = _data(fashion_sources["tfds"], tmp_path)
  held = [i for i in range(N) if stream.key_fraction(f"train/{i}") < HOLDOUT]
  ev = list(tf.eval_batches(batch_size=16))
  index = np.concatenate([e["index"][e["valid"]] for e in ev])
  np.testing.assert_array_equal(index, held)
  assert (np.concatenate([e["index"] for e in ev])[len(held):] == -1).all()


@pytest.mark.parametrize("name", ["webdataset", "parquet", "tfds"])
def test_resume_from_iterator_state_continues_exactly(fashion_sources, tmp_path, name):
  d = _data(fashion_sources[name], tmp_path)
  it_args = dict(global_batch_size=B, num_threads=2, prefetch_buffer_size=3)
  reference = take(d.train_iterator(**it_args), 12)  # 8 batches per epoch: crosses into epoch 1
  it = d.train_iterator(**it_args)
  take(it, 9)
  state = it.get_state()
  if name == "webdataset":  # through grain's checkpoint handler (JSON on disk), as the trainer
    (tmp_path / "ckpt").mkdir()
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path / "ckpt"), item=it)
    fresh = grain.checkpoint.CheckpointHandler().restore(
        epath.Path(tmp_path / "ckpt"), item=d.train_iterator(**it_args))
  else:
    fresh = d.train_iterator(**it_args)
    fresh.set_state(state)
  assert_batches_equal(take(fresh, 3), reference[9:])
  # The epochs differ and the augmentation is drawn per (seed, epoch, index).
  first = np.concatenate([b["index"] for b in reference[:8]])
  second = np.concatenate([b["index"] for b in reference[8:]])
  assert not np.array_equal(first[:len(second)], second)


def test_two_hosts_split_the_shards_and_the_global_batch(fashion_sources, tmp_path):
  d = _data(fashion_sources["webdataset"], tmp_path)
  per_host = []
  for p in range(2):
    raw = stream.StreamedBatches(d.source.reader, stream.StreamOptions(
        batch_size=1, seed=1, process_index=p, process_count=2, num_epochs=1,
        holdout_fraction=HOLDOUT, shuffle_buffer=24))
    per_host.append([b[0] for b in raw])
  files = [{r["path"] for r in h} for h in per_host]
  assert len(files[0]) == len(files[1]) == 2 and not files[0] & files[1]  # whole shards each
  keys = [{r["key"] for r in h} for h in per_host]
  assert not keys[0] & keys[1]
  assert len(keys[0] | keys[1]) == sum(stream.key_fraction(k) >= HOLDOUT
                                       for k, _, _ in fashion_sources["pairs"])
  # tfds (random access): the hosts' rows concatenate to the one-host global batch.
  tf = _data(fashion_sources["tfds"], tmp_path)
  single = next(tf.train_iterator(global_batch_size=B, num_threads=0, prefetch_buffer_size=0))
  hosts = [next(tf.train_iterator(global_batch_size=B, process_index=p, process_count=2,
                                  num_threads=0, prefetch_buffer_size=0)) for p in range(2)]
  for k in single:
    np.testing.assert_array_equal(np.concatenate([hosts[0][k], hosts[1][k]]), single[k])


def test_tokenizer_is_trained_from_the_training_captions_and_cached(fashion_sources, tmp_path):
  d = _data(fashion_sources["parquet"], tmp_path)
  assert d.tokenizer_path.parent == tmp_path / "cache" / "tokenizers"
  captions = [c for k, _, c in fashion_sources["pairs"] if stream.key_fraction(k) >= HOLDOUT]
  direct = tokenizer_lib.TextTokenizer.train(captions, vocab_size=256)
  assert d.vocab_size == direct.vocab_size == 256
  np.testing.assert_array_equal(d.tokenizer.encode(captions[:50], L),
                                direct.encode(captions[:50], L))
  mtime = d.tokenizer_path.stat().st_mtime_ns
  again = _data(fashion_sources["parquet"], tmp_path)
  assert again.tokenizer_path == d.tokenizer_path and d.tokenizer_path.stat().st_mtime_ns == mtime
  # A named tokenizer is used as it is.
  named = _data(fashion_sources["parquet"], tmp_path, tokenizer=str(d.tokenizer_path))
  assert named.tokenizer_path == d.tokenizer_path


def _damaged_shards(fashion_sources, folder):
  """Two shards: the second holds a sample with a corrupt JPEG and one without a caption."""
  import webdataset as wds
  prs = fashion_sources["pairs"][:64]
  folder.mkdir()
  with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=32, verbose=0) as sink:
    for i, (key, image, caption) in enumerate(prs):
      sample = {"__key__": key, "jpg": image, "txt": caption}
      if i == 40:
        sample["jpg"] = image[:200] + b"\x00" * 50  # header intact, pixels gone
      if i == 45:
        del sample["txt"]
      sink.write(sample)
  return f"webdataset:{folder}/{{00000..00001}}.tar", prs[40][0], prs[45][0]


def test_bad_samples_raise_one_clear_error_or_are_counted(fashion_sources, tmp_path):
  spec, corrupt_key, captionless_key = _damaged_shards(fashion_sources, tmp_path / "bad")
  tok = str(_data(fashion_sources["parquet"], tmp_path).tokenizer_path)
  d = _data(spec, tmp_path, tokenizer=tok, holdout_fraction=0.05)
  with pytest.raises(records.CorruptRecordError,
                     match=rf"00001\.tar: sample '{captionless_key}' \(record 13 of that file\), "
                           r"field 'txt': no caption member"):
    take(d.train_iterator(global_batch_size=16, num_threads=0, prefetch_buffer_size=0), 4)
  with records.skip_ledger(tmp_path / "ledger") as ledger:
    d = _data(spec, tmp_path, tokenizer=tok, holdout_fraction=0.05, skip_bad_records=True)
    batches = take(d.train_iterator(global_batch_size=16, num_threads=0,
                                     prefetch_buffer_size=0), 4)
  counts = ledger.counts()
  assert counts == {"train/image": 1, "train/txt": 1}, counts
  assert all(b["image"].shape == (16, 32, 32, 3) for b in batches)
  assert stream.key_index(captionless_key) not in np.concatenate([b["index"] for b in batches])
  # The corrupt JPEG alone, without skipping: named by file, sample and field.
  bad = {"image": fashion_sources["pairs"][40][1][:200] + b"\x00" * 50, "caption": "x",
         "key": corrupt_key, "index": 7, "epoch": 0, "path": "00001.tar", "record": 8}
  with pytest.raises(records.CorruptRecordError,
                     match=rf"00001\.tar: sample '{corrupt_key}' \(record 8 of that file\), "
                           r"field 'image': image decode failed"):
    _data(spec, tmp_path, tokenizer=tok, holdout_fraction=0.05).transform(train=True)([bad])


def test_truncated_shard_is_named(fashion_sources, tmp_path):
  src = pathlib.Path(str(fashion_sources["root"] / "wds" / "00001.tar"))
  folder = tmp_path / "trunc"
  folder.mkdir()
  shutil.copy(fashion_sources["root"] / "wds" / "00000.tar", folder / "00000.tar")
  data = src.read_bytes()
  (folder / "00001.tar").write_bytes(data[:len(data) // 2])
  reader = pairs.PairSource(f"webdataset:{folder}/*.tar").reader
  with pytest.raises(records.CorruptRecordError, match=r"00001\.tar: .*field '<file>'"):
    list(stream.natural_records(reader, skip_bad_records=False))
  with tarfile.open(folder / "00000.tar") as tar:  # the intact shard reads whole
    assert len(list(reader.read(0))) == len({m.name.split(".")[0] for m in tar.getmembers()})


@pytest.fixture(scope="module")
def trained_runs(fashion_sources, tmp_path_factory):
  """The tiny CLIP config trained 4 steps on each source and evaluated (one shared vocabulary
  size, so the three runs share their compiled programs)."""
  from mmcl.cli import main as cli_main
  from mmcl.eval import evaluator
  from mmcl.tasks import get_task_class
  out = {}
  cache = tmp_path_factory.mktemp("tokenizers")
  for name in ("webdataset", "tfds", "parquet"):
    workdir = tmp_path_factory.mktemp(f"clip_{name}") / "run"
    sets = [f"data.source={fashion_sources[name]}", "data.vocab_size=256",
            f"data.holdout_fraction={HOLDOUT}", "data.eval_examples=0", f"data.cache_dir={cache}",
            "data.shuffle_buffer=64", "train.total_steps=4", "train.checkpoint_every=4",
            "train.async_checkpointing=false"]
    args = ["train", "--config", str(REPO / "experiments/clip_shapes.py") + ":tiny",
            "--workdir", str(workdir)]
    for s in sets:
      args += ["--set", s]
    assert cli_main(args) in (0, None)
    metrics = evaluator.run_evaluator(str(workdir), resolve_task=get_task_class)
    out[name] = (workdir, metrics)
  return out


@pytest.mark.parametrize("name", ["webdataset", "tfds", "parquet"])
def test_clip_tiny_trains_checkpoints_and_evaluates_on_each_source(trained_runs, fashion_sources,
                                                                     name):
  workdir, metrics = trained_runs[name]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 2 and all(0.0 < x < 10.0 for x in losses)  # steps 2 and 4, finite
  val = [r["val/loss"] for r in rows if "val/loss" in r]
  assert len(val) == 1 and 0.0 < val[0] < 10.0  # the held-out part validates the checkpoint
  assert (workdir / "checkpoints" / "4").is_dir()
  held = (sum(stream.key_fraction(k) < HOLDOUT for k, _, _ in fashion_sources["pairs"])
          if name != "tfds" else sum(stream.key_fraction(f"train/{i}") < HOLDOUT
                                     for i in range(N)))
  assert metrics["num_pairs"] == held
  assert metrics["chance_recall@1"] == pytest.approx(1 / held)
  for k in ("i2t/recall@1", "t2i/recall@1", "t2i/recall@10"):
    assert 0.0 <= metrics[k] <= 1.0
  assert metrics["t2i/recall@10"] >= metrics["t2i/recall@1"]
  if name == "parquet":  # the same pairs in the same order: the same run, bit for bit
    assert metrics == trained_runs["webdataset"][1]
    other = (trained_runs["webdataset"][0] / "metrics.jsonl").read_text().splitlines()
    assert losses == [json.loads(r)["loss"] for r in other if '"loss"' in r]


def test_compressed_shards_read_the_same_samples(fashion_sources, tmp_path):
  import gzip
  plain = fashion_sources["root"] / "wds" / "00002.tar"
  (tmp_path / "00002.tar.gz").write_bytes(gzip.compress(plain.read_bytes(), compresslevel=1))
  read = lambda p: [(pos, r["key"], r["caption"], r["image"])  # noqa: E731
                    for pos, r in pairs.PairSource(f"webdataset:{p}").reader.read(0, 5)]
  a, b = read(plain), read(tmp_path / "00002.tar.gz")
  assert a == b and len(a) == PER_SHARD - 5 and a[0][0] == 5
  assert a[0][1:3] == fashion_sources["pairs"][2 * PER_SHARD + 5][:3:2]


def test_corrupt_tfds_record_is_named_or_counted_once(fashion_sources, tmp_path, rewrite_record):
  shutil.copytree(fashion_sources["root"] / "tfds", tmp_path / "tfds")
  build = tmp_path / "tfds" / "fashion_pairs" / "1.0.0"
  shard = next(build.glob("*-train.array_record-*")).name
  rewrite_record(build, shard, 5, b"\xc1garbage")
  spec = f"tfds:fashion_pairs:train@{tmp_path}/tfds"
  tok = str(_data(fashion_sources["parquet"], tmp_path).tokenizer_path)
  d = _data(spec, tmp_path, tokenizer=tok)
  with pytest.raises(records.CorruptRecordError,
                     match=r"1\.0\.0: sample 'train/5' \(record 5 of that file\), field '<record>'"):
    d.source._read_indexed(np.asarray([4, 5]), epoch=0, skip=False)  # pylint: disable=protected-access
  with records.skip_ledger(tmp_path / "ledger") as ledger:
    rows = d.source._read_indexed(np.asarray([5, 6]), epoch=0, skip=True)  # pylint: disable=protected-access
    batch = dataclasses.replace(d.transform(train=False), skip_bad_records=True)(rows)
  assert ledger.counts() == {"train/<record>": 1}
  np.testing.assert_array_equal(batch["index"], [6, 6])  # the bad row takes the next good one
  np.testing.assert_array_equal(batch["image"][0], batch["image"][1])
