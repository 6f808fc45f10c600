"""The GCL product-search sets: Marqo-GS construction, the procedural set, the fashion set."""
import csv
import shutil

import numpy as np
import pytest

from data_pipelines.recipes import fashion_search
from data_pipelines.recipes import products
from data_pipelines import records
from data_pipelines import schemas


def test_positions_follow_agreement_then_popularity():
  agreement = np.asarray([[0.0, 3.0, 1.0, 3.0, 2.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0]])
  popularity = np.asarray([0.1, 0.2, 0.3, 0.9, 0.5])
  pos = products.positions_from_agreement(agreement, popularity, max_position=3)
  # Query 0: agreement 3 (docs 1, 3: doc 3 more popular), then 2 (doc 4); doc 2 cut, doc 0 never.
  np.testing.assert_array_equal(pos[0], [0, 2, 0, 1, 3])
  np.testing.assert_array_equal(pos[1], [1, 0, 0, 0, 0])  # zero agreement is never listed


def test_scores_from_positions():
  lin, rec = products.scores_from_positions(np.asarray([1, 2, 100]), 100)
  np.testing.assert_allclose(lin, [1.0, 0.99, 0.01])
  np.testing.assert_allclose(rec, [1.0, 0.5, 0.01])
  with pytest.raises(ValueError, match="1..100"):
    products.scores_from_positions(np.asarray([0]), 100)


def test_marqo_splits_are_80_20_and_50_50_and_pairs_respect_them():
  qt, dt = products.marqo_splits(50, 40, seed=3)
  assert qt.sum() == 40 and dt.sum() == 20
  rng = np.random.default_rng(0)
  positions = np.where(rng.random((50, 40)) < 0.5, rng.integers(1, 101, (50, 40)), 0)
  pairs = products.split_pairs(positions, qt, dt, seed=0, eval_queries=6)
  expect = {"train": (True, True), "in_domain": (True, True), "novel_query": (False, True),
            "novel_document": (True, False), "zero_shot": (False, False)}
  for split, (q_train, d_train) in expect.items():
    p = pairs[split]
    assert len(p) and np.all(positions[p[:, 0], p[:, 1]] > 0)
    assert np.all(qt[p[:, 0]] == q_train) and np.all(dt[p[:, 1]] == d_train)
    if split != "train":
      assert len(np.unique(p[:, 0])) <= 6
  # train holds every listed pair of train queries x train documents.
  assert len(pairs["train"]) == int(((positions > 0) & qt[:, None] & dt[None, :]).sum())


@pytest.fixture(scope="module")
def small_products(tmp_path_factory):
  out = tmp_path_factory.mktemp("products")
  meta = products.build_products_dataset(out, num_docs=96, num_queries=60, eval_queries=6,
                                         max_position=20, num_shards=2, seed=1)
  return out, meta


def test_products_dataset_schema_and_relevance(small_products):
  out, meta = small_products
  assert meta["kind"] == schemas.QUERY_DOCUMENT and meta["has_images"]
  names = [f["name"] for f in meta["schema"]]
  marqo = [f.name for f in schemas.query_document_schema(with_images=True)]
  assert names[:len(marqo)] == marqo and names[len(marqo):] == ["description", "description_ids"]
  assert set(meta["splits"]) == set(products.SPLITS)
  docs, queries = meta["product_attributes"], meta["query_attributes"]
  src = records.ArrayRecordSource(out, "train")
  rows = src.read_many(list(range(len(src))))
  by_query = {}
  for r in rows:
    q, d = queries[int(r["query_id"][1:])], docs[int(r["product_id"][1:])]
    agree = sum(w for a, w in products.AGREEMENT_WEIGHTS.items() if a in q and q[a] == d[a])
    assert agree > 0
    assert r["score_linear"] == pytest.approx((21 - r["position"]) / 20)
    assert r["score_reciprocal"] == pytest.approx(1 / r["position"])
    assert d["category"] in r["title"] and d["brand"] in r["title"]
    assert r["description"] == "" or d["material"] in r["description"]
    by_query.setdefault(r["query_id"], []).append((r["position"], agree))
  # Positions never put a lower-agreement product above a higher one.
  for listed in by_query.values():
    agreements = [a for _, a in sorted(listed)]
    assert agreements == sorted(agreements, reverse=True)
  # Rebuilding with the same parameters returns the existing dataset.
  again = products.build_products_dataset(out, num_docs=96, num_queries=60, eval_queries=6,
                                          max_position=20, num_shards=2, seed=1)
  assert again == records.load_metadata(out)


def test_multi_field_batches(small_products):
  out, _ = small_products
  it = products.train_iterator(out, split="train", global_batch_size=16, seed=0, max_text_len=12,
                               image_size=16, num_epochs=1)
  batch = next(it)
  assert batch["image"].shape == (16, 16, 16, 3) and batch["image"].dtype == np.uint8
  for key in ("query", "title", "description"):
    assert batch[key].shape == (16, 12) and batch[key].dtype == np.int32
  src = records.ArrayRecordSource(out, "train")
  recs = src.read_many(batch["index"].tolist())
  np.testing.assert_array_equal(batch["has_description"], [r["description"] != "" for r in recs])
  np.testing.assert_array_equal(batch["position"], [r["position"] for r in recs])
  ids = [r["query_id"] for r in recs]
  same = np.asarray(ids)[:, None] == np.asarray(ids)[None, :]
  np.testing.assert_array_equal(batch["query_gid"][:, None] == batch["query_gid"][None, :], same)
  assert np.all(batch["query_gid"] >= 0)


def test_fashion_search_from_a_slice_of_the_real_file(shared_data, tmp_path):
  folder = shared_data / "fashion-product-images"
  with open(folder / "styles.csv", newline="") as fp:
    rows = list(csv.reader(fp))
  header, body = rows[0], rows[1:81]
  (tmp_path / "in" / "images").mkdir(parents=True)
  with open(tmp_path / "in" / "styles.csv", "w", newline="") as fp:
    csv.writer(fp, lineterminator="\n").writerows([header] + body)
  for r in body:
    shutil.copy(folder / "images" / f"{r[0]}.jpg", tmp_path / "in" / "images")
  meta = fashion_search.build_fashion_search_dataset(
      tmp_path / "in", tmp_path / "out", num_queries=40, eval_queries=5, max_position=20,
      image_size=32, num_shards=1)
  assert set(meta["splits"]) == set(products.SPLITS) and meta["has_images"]
  styles = {r[0]: dict(zip(header, r)) for r in body}
  src = records.ArrayRecordSource(tmp_path / "out", "train")
  rows_out = src.read_many(list(range(len(src))))
  queries = meta["query_attributes"]
  for r in rows_out:
    s = styles[r["product_id"]]
    assert r["title"] == s["productDisplayName"]
    assert r["description"].startswith(s["subCategory"])
    q = queries[int(r["query_id"][2:])]
    # The top-listed product of a query holds every attribute of the combination (>= 2 do).
    if r["position"] == 1:
      assert all(s[a] == v for a, v in q.items())
  from PIL import Image
  import io
  assert Image.open(io.BytesIO(rows_out[0]["image"])).size == (32, 32)


def test_tokenize_texts_pads_and_keeps_the_closing_token():
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "red": 4, "shoe": 5, "blue": 6}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
  ids = products.tokenize_texts(tok, ["red shoe", "red blue red blue shoe", "", "green"], 5,
                                pad_id=9)
  np.testing.assert_array_equal(ids, [[2, 4, 5, 3, 9], [2, 4, 6, 4, 3], [2, 3, 9, 9, 9],
                                      [2, 1, 3, 9, 9]])
  assert ids.dtype == np.int32
  with pytest.raises(ValueError, match="max_len"):
    products.tokenize_texts(tok, ["red"], 1)
