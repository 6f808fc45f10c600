"""The SAS ⋈ hetrec artist dataset: join, roles, dropped modalities, batches."""
import json

import numpy as np
import pytest

from data_pipelines.recipes import artists
from data_pipelines.converters import common


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  root = tmp_path_factory.mktemp("artists_src")
  facts = artists.write_planted_sources(root)
  out = root / "data"
  meta = artists.build_artist_dataset(facts["sas"], facts["hetrec"], out, cf_dim=8, tag_dim=8,
                                      text_encoder="tfidf", text_dim=16, drop_fraction=0.2,
                                      test_fraction=0.1, val_fraction=0.1, seed=0)
  return facts, out, meta


def test_join_counts_and_modalities(planted):
  facts, out, meta = planted
  assert meta["join"]["matched"] == facts["num_matched"]
  assert meta["modality_counts"]["catalogue_natural"]["text"] == facts["num_sas"]
  # Matched artists nobody played have no CF vector.
  assert 0.9 * facts["num_matched"] < meta["modality_counts"]["catalogue_natural"]["cf"] <= \
      facts["num_matched"]
  cat = artists.read_split(out, "catalogue")
  assert len(cat["ids"]) == facts["num_sas"]
  has = np.stack([cat[f"has_{m}"] for m in artists.MODALITIES], 1)
  assert has.any(1).all()  # dropping never removes an artist's last modality
  # Unavailable rows are stored as zeros; available ones are unit vectors.
  for m in artists.MODALITIES:
    norms = np.linalg.norm(cat[m], axis=1)
    np.testing.assert_allclose(norms[cat[f"has_{m}"]], 1.0, atol=1e-4)
    assert np.all(norms[~cat[f"has_{m}"]] == 0)


def test_test_queries_and_neighbours_never_train(planted):
  facts, out, meta = planted
  gold = np.asarray(meta["catalogue"]["gold"])
  role = np.asarray(meta["catalogue"]["role"])
  held = np.flatnonzero(np.isin(role, ["test", "validation"]))
  forbidden = set(held.tolist()) | set(gold[held].reshape(-1).tolist())
  train = artists.read_split(out, "train")
  in_train = set(int(a) for a in train["artist"] if a < facts["num_sas"])
  assert in_train and not forbidden & in_train
  assert (role == "test").sum() == round(0.1 * facts["num_sas"])
  # Every training row has ≥ 2 modalities (others could not take part in any pair).
  n_avail = sum(train[f"has_{m}"].astype(int) for m in artists.MODALITIES)
  assert n_avail.min() >= 2


def test_drop_availability_rate_and_last_modality():
  n = 6000
  avail = {"a": np.ones(n, bool), "b": np.ones(n, bool), "c": np.arange(n) % 2 == 0}
  out = artists.drop_availability(avail, 0.3, seed=1)
  # Where all three exist, each bit is cleared with p = 0.3, except that an artist drawn to lose
  # all three (p³) keeps one: a loses its bit with p ≈ 0.3 − 0.3³/3 = 0.291.
  full = avail["c"]
  assert abs(1 - out["a"][full].mean() - 0.291) < 0.025
  assert (out["a"] | out["b"] | out["c"]).all()
  assert not (out["c"] & ~avail["c"]).any()
  lone = artists.drop_availability({"a": np.ones(50, bool), "b": np.zeros(50, bool)}, 0.9, seed=0)
  assert lone["a"].all()  # an artist's only modality is never dropped
  again = artists.drop_availability(avail, 0.3, seed=1)
  assert all((again[m] == out[m]).all() for m in avail)


def test_names_and_biographies():
  assert artists.normalize_name("  The  Beatles ") == artists.normalize_name("the beatles")
  assert artists.normalize_name("ＡＢＣ") == "abc"  # NFKC folds full-width letters
  assert artists.clean_biography("See [Foo Bar](http://www.last.fm/music/Foo+Bar) live") == \
      "See Foo Bar live"


def test_oversampled_batches_repeat_text_rows(planted):
  _, out, meta = planted
  n = meta["splits"]["train"]["num_examples"]
  with_text = meta["train_rows"]["with_text"]
  it = artists.train_iterator(out, global_batch_size=16, seed=0, text_oversample=3, num_epochs=1)
  rows = [b for b in it]
  seen = np.concatenate([b["index"] for b in rows])
  has_text = np.concatenate([b["has_text"] for b in rows])
  assert len(seen) == (n + 2 * with_text) // 16 * 16
  # Text rows come 3 times each (up to the dropped remainder).
  assert has_text.mean() > with_text / n + 0.1
  counts = np.bincount(seen[has_text])
  assert counts[counts > 0].max() == 3


def test_real_join_coverage(shared_data):
  sas = artists.read_sas(shared_data / "artist-similarity-sas")
  assert len(sas["mbids"]) == 2363 and sas["gold"].shape == (2363, 10)
  assert (sas["gold"] >= 0).all()
  assert "](http" not in " ".join(sas["biographies"][:50])
  # The names as the hetrec converter reads them (CSV rules: quoted names are unquoted).
  path = shared_data / "hetrec2011-lastfm-2k" / "artists.dat"
  names = [row["name"].strip() for _, row in common.read_table(path, delimiter="\t")]
  match, stats = artists.match_hetrec(sas["names"], {"names": names},
                                      np.zeros(len(names), np.int64))
  assert stats["matched"] == 1306  # SOURCE.md's count
  # 8 SAS names belong to two MBIDs each; both take the same hetrec artist.
  assert stats["distinct_hetrec_artists_matched"] == 1298


def test_single_modality_rows_are_training_artists_only(planted):
  _, out, meta = planted
  role = np.asarray(meta["catalogue"]["role"])
  extra = artists.single_modality_train_rows(meta)
  np.testing.assert_array_equal(np.asarray(meta["catalogue"]["num_available"]),
                                artists.catalogue_availability(out))
  assert extra.size and np.all(role[extra] == "train")
  n = meta["splits"]["train"]["num_examples"]
  it = artists.train_iterator(out, global_batch_size=16, seed=0, num_epochs=1,
                              single_modality_rows=True)
  rows = [b for b in it]
  art = np.concatenate([b["artist"] for b in rows])
  has = sum(np.concatenate([b[f"has_{m}"] for b in rows]).astype(int) for m in artists.MODALITIES)
  assert len(art) == (n + extra.size) // 16 * 16
  # The added rows are exactly the role-train SAS artists with one modality (never a query or a
  # blocked neighbour); the train split's rows keep ≥ 2 modalities.
  single = set(art[has == 1].tolist())
  assert single <= set(extra.tolist()) and len(single) >= 0.8 * extra.size


def test_tag_profiles_feed_the_tags_modality(planted, tmp_path):
  facts, _, _ = planted
  from data_pipelines.converters import lastfm
  het = lastfm.read(facts["hetrec"], cf_dim=2, tag_dim=2)
  n = artists.write_tag_profiles(facts["hetrec"], tmp_path / "profiles.jsonl", top_k=3)
  lines = [json.loads(x) for x in (tmp_path / "profiles.jsonl").read_text().splitlines()]
  assert n == len(lines) == int((het["tag_counts"].getnnz(axis=0) > 0).sum())
  # A profile lists the artist's most-applied tags first, at most top_k of them.
  counts = {}
  for line in (facts["hetrec"] / "user_taggedartists.dat").read_text().splitlines()[1:]:
    _, a, t = line.split("\t")[:3]
    counts.setdefault(a, {}).setdefault(het["tag_names"][t], 0)
    counts[a][het["tag_names"][t]] += 1
  for rec in lines:
    names = rec["text"].split(", ")
    assert 1 <= len(names) <= 3
    best = max(counts[rec["id"]].values())
    assert counts[rec["id"]][names[0]] == best
  # Precomputed vectors of the profiles (here: a fixed random unit vector per artist) become the
  # tags modality of exactly the tagged, matched artists.
  rng = np.random.default_rng(0)
  vec = rng.normal(size=(n, 5)).astype(np.float32)
  vec /= np.linalg.norm(vec, axis=1, keepdims=True)
  np.save(tmp_path / "tagfeat.npy", vec)
  (tmp_path / "tagfeat.ids.txt").write_text("".join(r["id"] + "\n" for r in lines))
  out = tmp_path / "data"
  meta = artists.build_artist_dataset(facts["sas"], facts["hetrec"], out, cf_dim=8, tag_dim=8,
                                      text_encoder="tfidf", text_dim=16, seed=0,
                                      tag_features=tmp_path / "tagfeat")
  assert meta["modalities"]["tags"] == 5 and "precomputed" in meta["tag_encoder"]
  cat = artists.read_split(out, "catalogue")
  rows = cat["tags"][cat["has_tags"]]
  assert len(rows) > 0
  # Every available tags row is one of the supplied vectors, unchanged.
  assert (rows @ vec.T).max(1).min() > 1 - 1e-5
  # A tagged artist without a vector is an error naming the file and the artist.
  (tmp_path / "tagfeat.ids.txt").write_text("".join(r["id"] + "\n" for r in lines[1:]) + "x\n")
  with pytest.raises(ValueError, match=rf"tagfeat.*{lines[0]['id']!r}"):
    artists.build_artist_dataset(facts["sas"], facts["hetrec"], tmp_path / "data2", cf_dim=8,
                                 tag_dim=8, text_encoder="tfidf", text_dim=16, seed=0,
                                 tag_features=tmp_path / "tagfeat")
