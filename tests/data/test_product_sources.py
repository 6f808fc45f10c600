"""Product-search rows (the GCL task) from webdataset, parquet and tfds sources: the same rows
through each format, exact resume, worker processes, errors and bad rows, and the GCL tiny config
trained and evaluated on a streamed source.

One small product-search set is built per test run from 120 real products of
../shared/data/fashion-product-images (`fashion_search`, 32 px photos), and its splits are written
with each format's own writer.
"""
import csv
import io
import json
import pathlib
import shutil
import tarfile

import numpy as np
import pytest
from batch_checks import assert_batches_equal, take

from data_pipelines import records
from data_pipelines import sources
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.recipes import fashion_search
from data_pipelines.recipes import product_sources
from data_pipelines.recipes import products
from data_pipelines.sources import stream

REPO = pathlib.Path(__file__).resolve().parents[2]
FASHION = REPO.parent / "shared" / "data" / "fashion-product-images"
B, L, S = 16, 16, 32
FIELDS = ("image", "title", "description")


@pytest.fixture(scope="session")
def product_rows(tmp_path_factory):
  """{"ar": the ArrayRecord set, "parquet"/"webdataset"/"tfds": specs with {split},
  "tokenizer": the set's tokenizer.json}."""
  if not FASHION.is_dir():
    pytest.skip(f"shared datasets not found at {FASHION} (the products the rows are built from)")
  pytest.importorskip("webdataset", reason="the webdataset package writes the shards (test extra)")
  pytest.importorskip("pyarrow", reason="pyarrow writes the parquet files (test extra)")
  root = tmp_path_factory.mktemp("product_rows")
  with open(FASHION / "styles.csv", newline="", encoding="utf-8") as fp:
    rows = list(csv.reader(fp))
  header, body = rows[0], rows[1:121]
  (root / "in" / "images").mkdir(parents=True)
  with open(root / "in" / "styles.csv", "w", newline="", encoding="utf-8") as fp:
    csv.writer(fp, lineterminator="\n").writerows([header] + body)
  for r in body:
    shutil.copy(FASHION / "images" / f"{r[0]}.jpg", root / "in" / "images")
  fashion_search.build_fashion_search_dataset(
      root / "in", root / "ar", num_queries=60, eval_queries=8, max_position=20, image_size=S,
      num_shards=1, vocab_size=512)
  by_split = {s: product_sources.export_rows(root / "ar", s) for s in products.SPLITS}
  for split, split_rows in by_split.items():
    product_sources.write_rows(split_rows, root / "pq" / split, fmt="parquet", per_shard=100)
    product_sources.write_rows(split_rows, root / "wds" / split, fmt="webdataset",
                               per_shard=100)
  from data_pipelines.sources import write
  write.write_tfds_rows({s: by_split[s] for s in ("train", "zero_shot")}, root / "tfds",
                        name="fashion_rows", kinds={**product_sources.FIELD_KINDS, "key": "text"})
  return {"root": root, "ar": root / "ar", "rows": by_split,
          "tokenizer": root / "ar" / "tokenizer.json",
          "parquet": f"parquet:{root}/pq/{{split}}/*.parquet",
          "webdataset": f"webdataset:{root}/wds/{{split}}/*.tar",
          "tfds": f"tfds:fashion_rows:{{split}}@{root}/tfds"}


def _splits(spec, **kw):
  return product_sources.ProductSplits(spec, doc_fields=kw.pop("doc_fields", FIELDS), **kw)


def _maker(meta, augment=True):
  return products.batch_maker(meta, max_text_len=L, image_size=S, augment=augment,
                              crop_scale=(0.6, 1.0), seed=0)


def _iterator(product_rows, spec, *, worker_count=0, **kw):
  splits = _splits(spec, **kw)
  tok = tokenizer_lib.TextTokenizer.load(product_rows["tokenizer"])
  meta = splits.metadata(tok, product_rows["tokenizer"])
  return splits.train_iterator("train", maker=_maker(meta), tokenizer=tok, global_batch_size=B,
                               seed=0, shuffle_buffer=64, worker_count=worker_count,
                               num_threads=0, prefetch_buffer_size=0)


def test_same_rows_through_webdataset_and_parquet_give_the_same_batches(product_rows):
  a = take(_iterator(product_rows, product_rows["parquet"]), 3)
  b = take(_iterator(product_rows, product_rows["webdataset"]), 3)
  assert_batches_equal(a, b)
  assert a[0]["image"].shape == (B, S, S, 3) and a[0]["image"].dtype == np.uint8
  # Each row is the real row of its key: the stored token ids and scores of the ArrayRecord set.
  src = records.ArrayRecordSource(product_rows["ar"], "train")
  stored = {stream.key_index(f"train-{i:07d}"): r
            for i, r in enumerate(src.read_many(list(range(len(src)))))}
  rows = [stored[int(i)] for i in a[0]["index"]]
  np.testing.assert_array_equal(
      a[0]["query"], tokenizer_lib.pad_or_truncate([r["query_ids"] for r in rows], L))
  np.testing.assert_array_equal(
      a[0]["description"], tokenizer_lib.pad_or_truncate([r["description_ids"] for r in rows], L))
  np.testing.assert_array_equal(a[0]["position"], [r["position"] for r in rows])
  np.testing.assert_allclose(a[0]["score_linear"], [r["score_linear"] for r in rows])
  assert len(set(a[0]["index"].tolist())) == B  # a shuffled window, no repeats
  # Another seed, another order.
  splits = _splits(product_rows["parquet"])
  tok = tokenizer_lib.TextTokenizer.load(product_rows["tokenizer"])
  other = next(splits.train_iterator(
      "train", maker=_maker(splits.metadata(tok, product_rows["tokenizer"])), tokenizer=tok,
      global_batch_size=B, seed=1, shuffle_buffer=64, num_threads=0, prefetch_buffer_size=0))
  assert not np.array_equal(other["index"], a[0]["index"])


def test_every_format_reads_the_rows_of_the_arrayrecord_set(product_rows):
  """Evaluation reads a split whole: the same table and the same un-augmented batches as the
  ArrayRecord split, from each format."""
  from mmcl.tasks.gcl.evaluate import SplitTable
  tok = tokenizer_lib.TextTokenizer.load(product_rows["tokenizer"])
  src, meta = products.open_split(product_rows["ar"], "zero_shot")
  ref = SplitTable(src)
  ref_batch = _maker(meta, augment=False)(src, ref.doc_rows, 0)
  for name in ("parquet", "webdataset", "tfds"):
    splits = _splits(product_rows[name])
    rows = splits.rows("zero_shot", tokenizer=tok, metadata=splits.metadata(
        tok, product_rows["tokenizer"]))
    assert len(rows) == len(src)
    table = SplitTable(rows)
    for attr in ("query_ids", "doc_ids", "query_rows", "doc_rows", "pairs", "rel"):
      np.testing.assert_array_equal(getattr(table, attr), getattr(ref, attr), err_msg=name)
    batch = _maker(rows.metadata, augment=False)(rows, table.doc_rows, 0)
    for k in ("image", "title", "description", "has_description", "doc_gid", "score_linear"):
      np.testing.assert_array_equal(batch[k], ref_batch[k], err_msg=f"{name} {k}")


def test_resume_from_the_iterator_state_continues_exactly(product_rows):
  reference = take(_iterator(product_rows, product_rows["webdataset"]), 34)  # > 1 epoch (465 rows)
  it = _iterator(product_rows, product_rows["webdataset"])
  take(it, 28)
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
  fresh = _iterator(product_rows, product_rows["webdataset"])
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 6), reference[28:])


def test_two_hosts_read_whole_disjoint_shards(product_rows):
  reader = _splits(product_rows["webdataset"]).reader("train")
  per_host = [[b[0] for b in stream.StreamedBatches(reader, stream.StreamOptions(
      batch_size=1, seed=0, process_index=p, process_count=2, num_epochs=1, shuffle_buffer=64))]
              for p in range(2)]
  files = [{r["path"] for r in rows} for rows in per_host]
  assert not files[0] & files[1] and len(files[0] | files[1]) == len(reader.files) == 5
  keys = [[r["key"] for r in rows] for rows in per_host]
  assert sorted(keys[0] + keys[1]) == [r["key"] for r in product_rows["rows"]["train"]]


def test_worker_processes_give_the_same_batches_and_resume(product_rows):
  reference = take(_iterator(product_rows, product_rows["parquet"]), 7)
  it = _iterator(product_rows, product_rows["parquet"], worker_count=2)
  try:
    got = take(it, 4)
    state = json.loads(json.dumps(it.get_state()))  # one state per worker, as checkpointed
    got += take(it, 3)
    assert_batches_equal(got, reference)
    it.set_state(state)  # the workers restart from their states
    assert_batches_equal(take(it, 3), reference[4:])
    assert it.counts["from_slots"] == 10  # every batch through the workers' slot rings
  finally:
    it.close()


def test_source_errors_are_one_line_naming_the_key(product_rows):
  from mmcl.cli import _exit_code
  root = product_rows["root"]
  with pytest.raises(sources.SourceConfigError, match=r"write \{split\} where the split's name"):
    _splits(f"parquet:{root}/pq/train/*.parquet")
  with pytest.raises(sources.SourceConfigError, match="unknown scheme 'lmdb'"):
    _splits("lmdb:/data/{split}")
  with pytest.raises(FileNotFoundError, match=r"no such file\(s\): .*/nothing/train/\*\.parquet"):
    _splits(f"parquet:{root}/nothing/{{split}}/*.parquet").reader("train")
  with pytest.raises(sources.SourceConfigError,
                     match=r"part-00000\.parquet: no column 'name' \(config key "
                           r"data\.columns\.title\); the file has columns \[.*'title'"):
    _splits(product_rows["parquet"], columns={"title": "name"}).reader("train")
  with pytest.raises(sources.SourceConfigError,
                     match=r"no feature 'img' \(config key data\.columns\.image\)") as e:
    _splits(product_rows["tfds"], columns={"image": "img"}).reader("train")
  assert _exit_code(e.value) == 2 and "\n" not in str(e.value)
  with pytest.raises(sources.SourceConfigError, match=r"data\.key_field must be empty"):
    _splits(product_rows["webdataset"], key_field="id").reader("train")
  # Without description and image, the rows are read without those members / columns.
  splits = _splits(product_rows["parquet"], doc_fields=("title",), columns={"image": "absent"})
  row = next(stream.natural_records(splits.reader("train"), skip_bad_records=False))
  assert "image" not in row and "description" not in row and row["title"]


def _damaged_shard(product_rows, folder):
  """The train rows' first shard rewritten: row 3 has no JSON member, row 5 a position that
  is not a number, row 7 a corrupt image."""
  src = product_rows["root"] / "wds" / "train" / "00000.tar"
  folder.mkdir()
  with tarfile.open(src) as tin, tarfile.open(folder / "00000.tar", "w") as tout:
    for m in tin.getmembers():
      data = tin.extractfile(m).read()
      key, ext = m.name.split(".", 1)
      n = int(key.rsplit("-", 1)[1])
      if n == 3 and ext == "json":
        continue
      if n == 5 and ext == "json":
        data = json.dumps(dict(json.loads(data), position="first")).encode()
      if n == 7 and ext == "jpg":
        data = data[:120] + b"\x00" * 40
      m.size = len(data)
      tout.addfile(m, io.BytesIO(data))
  return f"webdataset:{folder.parent}/{{split}}/*.tar"


def test_bad_rows_raise_one_clear_error_or_are_counted(product_rows, tmp_path):
  spec = _damaged_shard(product_rows, tmp_path / "train")
  reader = _splits(spec).reader("train")
  with pytest.raises(records.CorruptRecordError,
                     match=r"00000\.tar: sample 'train-0000003' \(record 3 of that file\), "
                           r"field 'query_id': no query_id member \(the sample has \['jpg'\]; "
                           r"no json member\)"):
    list(stream.natural_records(reader, skip_bad_records=False))
  position, bad = next(reader.read(0, 5))
  assert position == 5 and isinstance(bad, sources.BadRecordError)
  assert str(bad).endswith("sample 'train-0000005' (record 5 of that file), field 'position': "
                           "expected a number, found the text 'first'")
  with records.skip_ledger(tmp_path / "ledger") as ledger:
    batches = take(_iterator(product_rows, spec, skip_bad_records=True), 6)
  assert ledger.counts() == {"train/query_id": 1, "train/position": 1, "train/image": 1}
  assert all(b["image"].shape == (B, S, S, 3) for b in batches)
  seen = np.concatenate([b["index"] for b in batches])
  for key in ("train-0000003", "train-0000005", "train-0000007"):
    assert stream.key_index(key) not in seen


def test_gcl_tiny_trains_and_evaluates_on_a_streamed_source(product_rows, tmp_path):
  from mmcl.config import load_config_file
  from mmcl.eval.evaluator import run_evaluator
  from mmcl.tasks import get_task_class
  from mmcl.tasks.gcl.task import GCLTask
  from mmcl.train.loop import train
  c = load_config_file(str(REPO / "experiments" / "gcl.py") + ":tiny,image_title")
  c.data.source = product_rows["webdataset"]
  c.data.cache_dir = str(tmp_path / "cache")  # a BPE tokenizer trained on the train split
  c.data.vocab_size = 256
  c.data.image_size, c.data.global_batch_size, c.model.image.patch_size = S, B, 8
  c.data.shuffle_buffer = 64
  c.train.total_steps, c.train.checkpoint_every, c.train.log_every = 2, 2, 1
  c.train.async_checkpointing = False
  c.task.eval_splits = ("zero_shot",)
  train(c, tmp_path / "run", GCLTask)
  logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  losses = [m["loss"] for m in logged if "loss" in m]
  assert len(losses) == 2 and all(0.0 < x < 10.0 for x in losses)
  tokenizers = list((tmp_path / "cache" / "tokenizers").glob("*.json"))
  assert len(tokenizers) == 1
  assert tokenizer_lib.TextTokenizer.load(tokenizers[0]).vocab_size == 256
  metrics = run_evaluator(str(tmp_path / "run"), resolve_task=get_task_class)
  zero_shot = product_rows["rows"]["zero_shot"]
  assert metrics["zero_shot/num_documents"] == len({r["product_id"] for r in zero_shot})
  assert metrics["zero_shot/num_queries"] == min(50, len({r["query_id"] for r in zero_shot}))
  for name in ("ndcg@10", "map@100", "mrr@100", "err", "rbp.7"):
    assert 0.0 <= metrics[f"zero_shot/{name}"] <= 1.0
  # A split that the source does not have: one line naming the file pattern.
  c.task.eval_splits = ("novel_query",)
  (tmp_path / "empty").mkdir()
  c.data.source = f"webdataset:{tmp_path}/empty/{{split}}/*.tar"
  with pytest.raises(FileNotFoundError, match=r"empty/train/\*\.tar"):
    GCLTask(c, None)
