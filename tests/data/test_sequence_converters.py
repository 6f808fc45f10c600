"""Interaction-sequence converters: real files (counts from each SOURCE.md) and small files
written here in each format, including malformed ones; restartable, idempotent writing."""
import json
import os
import pathlib

import numpy as np
import pytest

from data_pipelines import convert as convert_lib
from data_pipelines import records
from data_pipelines.converters import amazon
from data_pipelines.converters import common
from data_pipelines.converters import movielens
from data_pipelines.converters import recbole
from data_pipelines.converters import s3rec
from data_pipelines.converters import sasrec


def _all(data_dir, split):
  src = records.ArrayRecordSource(data_dir, split)
  out = src.read_many(list(range(len(src))))
  src.close()
  return out


# ---------------------------------------------------------------------------------------------
# Real data (counts as stated in ../shared/data/*/SOURCE.md).


def test_sasrec_video_counts(shared_data):
  d = sasrec.read(shared_data / "amazon-videogames-sasrec" / "Video.txt")
  assert len(d.user_ids) == 31013 and d.num_items == 23715
  assert sum(len(s) for s in d.sequences) == 287107
  assert d.user_ids[:3] == ["1", "2", "3"]  # users 1..31013 in increasing order


def test_s3rec_beauty_counts(shared_data):
  d = s3rec.read(shared_data / "amazon-beauty-s3rec" / "Beauty.txt")
  lengths = [len(s) for s in d.sequences]
  assert len(d.user_ids) == 22363 and d.num_items == 12101 and sum(lengths) == 198502
  assert min(lengths) == 5 and max(lengths) == 204
  distinct = {a for attrs in d.item_attributes for a in attrs}
  assert len(distinct) == 637
  # The file's own first line and first attribute entry.
  first = (shared_data / "amazon-beauty-s3rec" / "Beauty.txt").read_text().split("\n")[0].split()
  np.testing.assert_array_equal(d.sequences[0], [int(x) for x in first[1:]])
  table = json.loads((shared_data / "amazon-beauty-s3rec" / "Beauty_item2attributes.json")
                     .read_text())
  assert d.item_attributes[int("4") - 1] == table["4"]


def test_unisrec_scientific_rebuilds_full_sequences(shared_data, tmp_path):
  folder = shared_data / "amazon-scientific-unisrec"
  meta = convert_lib.convert("unisrec", folder, tmp_path / "sci")
  assert meta["splits"]["sequences"]["num_examples"] == 8442
  assert meta["splits"]["items"]["num_examples"] == 4385
  stats = meta["stats"]
  # ~59.4K interactions; train rows = one per prefix = sum(n - 3) = 34,101 (SOURCE.md).
  assert 59000 < stats["num_interactions"] < 60000
  assert stats["num_interactions"] - 3 * 8442 == 34101
  seqs = _all(tmp_path / "sci", "sequences")
  # Test row of user 0 in the file: history + target is the tail of the rebuilt sequence.
  lines = (folder / "Scientific.test.inter").read_text().splitlines()
  _, hist, target = lines[1].split("\t")
  want = [int(x) + 1 for x in hist.split()] + [int(target) + 1]
  np.testing.assert_array_equal(seqs[0]["items"][-len(want):], want)
  items = _all(tmp_path / "sci", "items")
  index_line = (folder / "Scientific.item2index").read_text().splitlines()[0].split("\t")
  assert items[int(index_line[1])]["item_id"] == index_line[0]
  assert all(r["text"] for r in items) and all(len(r["text_ids"]) > 2 for r in items)


def test_recbole_ml100k(shared_data, tmp_path):
  meta = convert_lib.convert("recbole", shared_data / "ml-100k", tmp_path / "ml")
  assert meta["stats"]["num_users"] == 943 and meta["stats"]["num_items"] == 1682
  assert meta["stats"]["num_interactions"] == 100000
  items = _all(tmp_path / "ml", "items")
  assert items[0]["item_id"] == "1" and items[0]["text"].startswith("Toy Story. 1995")
  # Chronological order: recompute user 196's sequence from the file.
  rows = [l.split("\t") for l in (shared_data / "ml-100k" / "ml-100k.inter")
          .read_text().splitlines()[1:]]
  mine = sorted((float(t), k, int(i)) for k, (u, i, _, t) in enumerate(rows) if u == "196")
  seqs = _all(tmp_path / "ml", "sequences")
  user = next(r for r in seqs if r["user_id"] == "196")
  np.testing.assert_array_equal(user["items"], [i for _, _, i in mine])


# ---------------------------------------------------------------------------------------------
# Small files written here.


def test_sasrec_small_and_malformed(tmp_path):
  p = tmp_path / "x.txt"
  p.write_text("1 3\n1 1\n2 2\n1 2\n2 5\n")
  d = sasrec.read(p)
  assert d.user_ids == ["1", "2"] and d.num_items == 5
  np.testing.assert_array_equal(d.sequences[0], [3, 1, 2])
  p.write_text("1 3\n1 x\n")
  with pytest.raises(common.ConversionError, match=r"x\.txt:2, field 'item'"):
    sasrec.read(p)
  p.write_text("1 3 4\n")
  with pytest.raises(common.ConversionError, match=r"x\.txt:1.*expected 'user item'"):
    sasrec.read(p)


def test_s3rec_unknown_item_in_attributes(tmp_path):
  (tmp_path / "B.txt").write_text("1 1 2 3\n2 2 3\n")
  (tmp_path / "B_item2attributes.json").write_text('{"1": [0, 4], "3": [1]}')
  d = s3rec.read(tmp_path / "B.txt")
  assert d.item_attributes == [[0, 4], [], [1]]
  (tmp_path / "B_item2attributes.json").write_text('{"1": [0], "9": [1]}')
  with pytest.raises(common.ConversionError, match=r"B_item2attributes\.json.*item id.*"
                                                   r"unknown item id 9"):
    s3rec.read(tmp_path / "B.txt")
  (tmp_path / "B.txt").write_text("1 1 2\n1 3 4\n")
  with pytest.raises(common.ConversionError, match=r"B\.txt:2, field 'user'.*twice"):
    s3rec.read(tmp_path / "B.txt", attributes=None)


def test_recbole_atomic_sorts_by_time_and_rejects_unknown_items(tmp_path):
  (tmp_path / "d.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n"
                                    "u1\tb\t30\nu2\ta\t5\nu1\ta\t10\nu1\tc\t20\n")
  (tmp_path / "d.item").write_text("item_id:token\ttitle:token_seq\tgenre:token_seq\n"
                                   "a\tAlpha\tX Y\nb\tBeta\t\nc\tGamma\tZ\n")
  d = recbole.read_inter(tmp_path / "d.inter", tmp_path / "d.item")
  assert d.user_ids == ["u1", "u2"] and d.item_ids == ["a", "b", "c"]
  np.testing.assert_array_equal(d.sequences[0], [1, 3, 2])  # a(10), c(20), b(30)
  assert d.item_text == ["Alpha. X Y", "Beta", "Gamma. Z"]
  with open(tmp_path / "d.inter", "a") as f:
    f.write("u2\tzz\t7\n")
  with pytest.raises(common.ConversionError, match=r"d\.inter:6, field 'item_id'.*unknown item"):
    recbole.read_inter(tmp_path / "d.inter", tmp_path / "d.item")
  (tmp_path / "e.inter").write_text("user_id\titem_id\nu\ti\n")
  with pytest.raises(common.ConversionError, match=r"e\.inter:1.*name:type"):
    recbole.read_inter(tmp_path / "e.inter")


def _write_unisrec(folder: pathlib.Path, seqs: dict[str, list[int]], max_hist: int):
  def row(u, hist, t):
    return f"{u}\t{' '.join(map(str, hist[-max_hist:]))}\t{t}\n"
  head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
  train, valid, test = [head], [head], [head]
  for u, s in seqs.items():
    for p in range(len(s) - 3, 0, -1):  # longest prefix first, as in the real files
      train.append(row(u, s[:p], s[p]))
    valid.append(row(u, s[:-2], s[-2]))
    test.append(row(u, s[:-1], s[-1]))
  (folder / "T.train.inter").write_text("".join(train))
  (folder / "T.valid.inter").write_text("".join(valid))
  (folder / "T.test.inter").write_text("".join(test))


def test_unisrec_small_roundtrip_and_inconsistency(tmp_path):
  rng = np.random.default_rng(0)
  seqs = {str(u): rng.integers(0, 6, size=int(rng.integers(3, 12))).tolist() for u in range(7)}
  _write_unisrec(tmp_path, seqs, max_hist=4)  # truncated histories exercise the chaining
  (tmp_path / "T.item2index").write_text("".join(f"A{j}\t{j}\n" for j in range(6)))
  (tmp_path / "T.text").write_text("item_id:token\ttext:token_seq\n" +
                                   "".join(f"A{j}\titem {j} text\n" for j in range(6)))
  d = recbole.read_unisrec(tmp_path)
  assert d.user_ids == [str(u) for u in range(7)]
  for u, s in zip(d.user_ids, d.sequences):
    np.testing.assert_array_equal(s, np.asarray(seqs[u]) + 1)
  assert d.item_ids[2] == "A2" and d.item_text[2] == "item 2 text"
  lines = (tmp_path / "T.valid.inter").read_text().splitlines()
  u, h, t = lines[1].split("\t")
  lines[1] = "\t".join([u, h, str((int(t) + 1) % 6)])
  (tmp_path / "T.valid.inter").write_text("\n".join(lines) + "\n")
  with pytest.raises(common.ConversionError, match=r"T\.test\.inter:2, field 'item_id_list'"):
    recbole.read_unisrec(tmp_path)
  _write_unisrec(tmp_path, seqs, max_hist=4)
  (tmp_path / "T.text").write_text("item_id:token\ttext:token_seq\nNOPE\tx\n")
  with pytest.raises(common.ConversionError, match=r"T\.text:2, field 'item_id'.*NOPE"):
    recbole.read_unisrec(tmp_path)


def test_movielens_dat(tmp_path):
  (tmp_path / "movies.dat").write_bytes(
      "1::Toy Story (1995)::Animation|Children's\n2::Amélie (2001)::Comedy\n3::Heat (1995)::\n"
      .encode("latin-1"))
  (tmp_path / "ratings.dat").write_text("1::2::5::300\n1::1::3::100\n2::3::4::50\n1::3::1::200\n")
  meta = convert_lib.convert("movielens", tmp_path, tmp_path / "out", min_rating=2)
  assert meta["stats"]["num_users"] == 2 and meta["stats"]["num_interactions"] == 3
  seqs = _all(tmp_path / "out", "sequences")
  np.testing.assert_array_equal(seqs[0]["items"], [1, 2])  # rating 1 of movie 3 dropped
  items = _all(tmp_path / "out", "items")
  assert [r["text"] for r in items] == ["Toy Story (1995). Animation, Children's",
                                        "Amélie (2001). Comedy", "Heat (1995)"]
  (tmp_path / "ratings.dat").write_text("1::2::5::300\n1::7::3::100\n")
  with pytest.raises(common.ConversionError, match=r"ratings\.dat:2, field 'MovieID'.*unknown"):
    movielens.read(tmp_path / "ratings.dat", tmp_path / "movies.dat")
  (tmp_path / "ratings.dat").write_text("1::2::5\n")
  with pytest.raises(common.ConversionError, match=r"ratings\.dat:1.*4 `::`-separated"):
    movielens.read(tmp_path / "ratings.dat")


def test_amazon_reviews_with_metadata_and_k_core(tmp_path):
  reviews = [("u1", "A", 3), ("u1", "B", 1), ("u1", "C", 2), ("u2", "A", 1), ("u2", "B", 2),
             ("u3", "D", 1), ("u2", "C", 3)]
  (tmp_path / "r.json").write_text("".join(json.dumps(
      {"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5}) + "\n"
      for u, a, t in reviews))
  (tmp_path / "m.json").write_text(
      json.dumps({"asin": "A", "title": "Alpha", "category": ["Toys", "Games"], "brand": "Z"})
      + "\n" + "{'asin': 'B', 'title': 'Beta', 'categories': [['Toys', 'Cars']]}\n")
  d, missing = amazon.read(tmp_path / "r.json", tmp_path / "m.json", k_core=2)
  assert d.user_ids == ["u1", "u2"] and d.item_ids == ["A", "B", "C"]  # D and u3 dropped
  np.testing.assert_array_equal(d.sequences[0], [2, 3, 1])  # B(1), C(2), A(3)
  assert d.item_text == ["Alpha. Toys Games. Z", "Beta. Toys Cars", ""] and missing == 1
  (tmp_path / "r.csv").write_text("A,u1,5,10\nB,u1,4,5\nC,u2,3\n")
  with pytest.raises(common.ConversionError, match=r"r\.csv:3.*item,user,rating,timestamp"):
    amazon.read(tmp_path / "r.csv")


def test_interrupted_conversion_leaves_no_dataset_then_reruns(tmp_path, monkeypatch):
  p = tmp_path / "x.txt"
  p.write_text("".join(f"{u} {i}\n" for u in range(1, 9) for i in range(1, 6)))
  out = tmp_path / "out"
  real = records.write_split
  calls = []

  def crash_on_second_split(*args, **kwargs):
    calls.append(args[1])
    if len(calls) == 2:
      raise KeyboardInterrupt("simulated crash")
    return real(*args, **kwargs)

  monkeypatch.setattr(records, "write_split", crash_on_second_split)
  with pytest.raises(KeyboardInterrupt):
    convert_lib.convert("sasrec", p, out)
  with pytest.raises(FileNotFoundError, match="no complete dataset"):
    records.load_metadata(out)
  assert not [f for f in os.listdir(out) if records.is_temporary(f)]
  monkeypatch.setattr(records, "write_split", real)
  meta = convert_lib.convert("sasrec", p, out)
  assert meta["splits"]["sequences"]["num_examples"] == 8
  mtime = (out / "metadata.json").stat().st_mtime_ns
  assert convert_lib.convert("sasrec", p, out) == meta  # unchanged inputs: nothing rewritten
  assert (out / "metadata.json").stat().st_mtime_ns == mtime
  assert not records.verify_files(out, meta)


def test_cli_main(tmp_path, capsys):
  p = tmp_path / "x.txt"
  p.write_text("1 1\n1 2\n1 3\n2 2\n2 3\n2 1\n")
  assert convert_lib.main(["--format", "sasrec", "--input", str(p), "--output",
                           str(tmp_path / "o"), "--split-by", "leave-one-out"]) == 0
  assert '"sequences": 2' in capsys.readouterr().out
  with pytest.raises(ValueError, match="unknown format"):
    convert_lib.convert("nope", p, tmp_path / "o2")
  with pytest.raises(ValueError, match="--split-by 'holdout:2'"):
    convert_lib.convert("sasrec", p, tmp_path / "o3", split_by="holdout:2")
