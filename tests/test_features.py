"""Tests for precomputed embeddings (mmcl.pretrained.features): format, resuming, agreement with encode_texts.

The tower is a tiny random BERT written as a Hugging Face folder in the test (config.json,
model.safetensors with "bert."-prefixed names and a pooler, vocab.txt without tokenizer.json,
CLS pooling + Normalize), so these tests need no model package and also cover those loader paths.
"""
import json
import string

import numpy as np
import pytest
from safetensors.numpy import save_file

from mmcl.pretrained.features import compute_features, output_paths, read_features, read_text_records
from mmcl.pretrained.text import encode_texts, load_text_tower

WIDTH, DEPTH, MLP = 32, 2, 64
TEXTS = ["a red bicycle", "", "jazz piano trio live in tokyo", "x", "the quick brown fox jumps",
         "synth pop", "rainy sunday morning coffee", "drum and bass", "q", "long " * 80,
         "field recordings of birds"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tiny_bert")
  letters = list(string.ascii_lowercase + string.digits)
  vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
           + list(string.punctuation) + ["red", "jazz", "piano", "the", "rain", "##y"])
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
  (folder / "config.json").write_text(json.dumps({
      "model_type": "bert", "vocab_size": len(vocab), "hidden_size": WIDTH,
      "num_hidden_layers": DEPTH, "num_attention_heads": 4, "intermediate_size": MLP,
      "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu",
      "layer_norm_eps": 1e-12, "pad_token_id": 0}))
  rng = np.random.default_rng(0)

  def t(*shape, scale=0.2, offset=0.0):
    return (offset + scale * rng.normal(size=shape)).astype(np.float32)

  state = {"bert.embeddings.word_embeddings.weight": t(len(vocab), WIDTH),
           "bert.embeddings.position_embeddings.weight": t(64, WIDTH),
           "bert.embeddings.token_type_embeddings.weight": t(2, WIDTH),
           "bert.embeddings.LayerNorm.weight": t(WIDTH, offset=1.0),
           "bert.embeddings.LayerNorm.bias": t(WIDTH),
           "bert.pooler.dense.weight": t(WIDTH, WIDTH), "bert.pooler.dense.bias": t(WIDTH)}
  for i in range(DEPTH):
    p = f"bert.encoder.layer.{i}."
    for name, (n_out, n_in) in {"attention.self.query": (WIDTH, WIDTH),
                                "attention.self.key": (WIDTH, WIDTH),
                                "attention.self.value": (WIDTH, WIDTH),
                                "attention.output.dense": (WIDTH, WIDTH),
                                "intermediate.dense": (MLP, WIDTH),
                                "output.dense": (WIDTH, MLP)}.items():
      state[p + name + ".weight"] = t(n_out, n_in)
      state[p + name + ".bias"] = t(n_out)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      state[p + name + ".weight"] = t(WIDTH, offset=1.0)
      state[p + name + ".bias"] = t(WIDTH)
  save_file(state, str(folder / "model.safetensors"))
  (folder / "1_Pooling").mkdir()
  (folder / "1_Pooling" / "config.json").write_text(json.dumps(
      {"word_embedding_dimension": WIDTH, "pooling_mode_cls_token": True}))
  (folder / "modules.json").write_text(json.dumps([
      {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
      {"idx": 2, "name": "2", "path": "2_Normalize",
       "type": "sentence_transformers.models.Normalize"}]))
  return folder


@pytest.fixture
def records(tmp_path):
  path = tmp_path / "items.jsonl"
  path.write_text("".join(json.dumps({"id": f"item{i}", "title": text, "year": 2000 + i}) + "\n"
                          for i, text in enumerate(TEXTS)))
  return path


def test_tiny_folder_loads_with_its_pooling(tiny_folder):
  pretrained = load_text_tower(tiny_folder, max_length=32)
  assert (pretrained.tower.pool, pretrained.tower.normalize, pretrained.max_length) == (
      "cls", True, 32)
  vectors = pretrained.encode(TEXTS, batch_size=4)
  assert vectors.shape == (len(TEXTS), WIDTH)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
  # Texts are embedded in length-sorted batches; each row must still belong to its own text.
  np.testing.assert_allclose(pretrained.encode(TEXTS[::-1], batch_size=3)[::-1], vectors,
                             atol=1e-6)


def test_resumes_after_interruption_and_matches_encode_texts(tiny_folder, records, tmp_path):
  out = tmp_path / "emb" / "titles"
  (tmp_path / "emb").mkdir()
  kw = dict(batch_size=4, max_length=32, chunk_size=4, progress=False)
  first = compute_features(tiny_folder, records, "title", out, stop_after_chunks=1, **kw)
  assert not first.complete and first.rows_computed == 4
  paths = output_paths(out)
  assert paths["partial"].is_dir() and not paths["manifest"].exists()
  assert not paths["npy"].exists()
  with pytest.raises(FileNotFoundError, match="partial"):
    read_features(out)

  second = compute_features(tiny_folder, records, "title", str(out) + ".npy", **kw)
  assert second.complete and second.rows_computed == len(TEXTS) - 4
  assert not paths["partial"].exists()
  features = read_features(out, verify_hashes=True)
  assert features.ids == [f"item{i}" for i in range(len(TEXTS))]
  assert features.vectors.dtype == np.float32 and features.vectors.shape == (len(TEXTS), WIDTH)
  assert features.manifest["count"] == len(TEXTS) and features.manifest["dim"] == WIDTH
  assert features.manifest["field"] == "title" and features.manifest["normalized"]
  np.testing.assert_allclose(features.vectors, encode_texts(tiny_folder, TEXTS, max_length=32),
                             atol=1e-5)

  # An uninterrupted run writes the same vectors; a repeated call computes nothing.
  whole = compute_features(tiny_folder, records, "title", tmp_path / "whole", **kw)
  assert whole.rows_computed == len(TEXTS)
  np.testing.assert_allclose(read_features(tmp_path / "whole").vectors, features.vectors,
                             atol=1e-6)
  assert compute_features(tiny_folder, records, "title", out, **kw).rows_computed == 0


def test_refuses_to_mix_inputs_or_settings(tiny_folder, records, tmp_path):
  out = tmp_path / "titles"
  kw = dict(batch_size=4, max_length=32, chunk_size=4, progress=False)
  compute_features(tiny_folder, records, "title", out, stop_after_chunks=1, **kw)
  records.write_text(records.read_text().replace("synth pop", "synth wave"))
  with pytest.raises(ValueError, match="input_sha256"):
    compute_features(tiny_folder, records, "title", out, **kw)
  done = compute_features(tiny_folder, records, "title", tmp_path / "done", **kw)
  assert done.complete
  with pytest.raises(FileExistsError, match="overwrite"):
    compute_features(tiny_folder, records, "title", tmp_path / "done", **dict(kw, max_length=16))
  redone = compute_features(tiny_folder, records, "title", tmp_path / "done", overwrite=True,
                            **dict(kw, max_length=16))
  assert redone.rows_computed == len(TEXTS) and read_features(tmp_path / "done").manifest[
      "max_length"] == 16
  # A complete output of the first format version (its manifest has no "tower", "kind", ...)
  # still counts as done for the same settings.
  manifest_file = output_paths(tmp_path / "done")["manifest"]
  first = {k: v for k, v in json.loads(manifest_file.read_text()).items()
           if k in ("format", "model", "dim", "count", "dtype", "field", "input", "input_sha256",
                    "max_length", "normalized", "sha256", "ids_sha256")}
  manifest_file.write_text(json.dumps(first))
  assert compute_features(tiny_folder, records, "title", tmp_path / "done",
                          **dict(kw, max_length=16)).rows_computed == 0


def test_read_text_records(tmp_path):
  plain = tmp_path / "titles.txt"
  plain.write_text("first title\n\nthird title\n")
  assert read_text_records(plain, "ignored") == (["0", "1", "2"],
                                                 ["first title", "", "third title"])
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"id": 1, "title": "ok"}) + "\n" + json.dumps({"id": 2}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: record has no field 'title'"):
    read_text_records(bad, "title")
  bad.write_text(json.dumps({"id": 1, "title": "a"}) + "\n" + json.dumps({"id": 1, "title": "b"}))
  with pytest.raises(ValueError, match="more than once"):
    read_text_records(bad, "title")
  bad.write_text(json.dumps({"id": 1, "title": 3}) + "\n")
  with pytest.raises(ValueError, match="expected a string"):
    read_text_records(bad, "title")


# --- converted datasets, the pipelines that read the output, bf16, the CLI ------------------------
@pytest.fixture
def movielens_dir(tmp_path):
  """A converted `interactions` dataset (MovieLens .dat → items split with item_id and text)."""
  from data_pipelines import convert
  raw = tmp_path / "ml"
  raw.mkdir()
  titles = ["Toy Story (1995)", "Heat (1995)", "Jazz Piano Live (2001)", "X (1999)",
            "Rainy Sunday (2010)"]
  (raw / "movies.dat").write_text("".join(f"{10 + i}::{t}::Drama\n" for i, t in enumerate(titles)))
  (raw / "ratings.dat").write_text("".join(f"{u}::{10 + m}::5::{100 * u + m}\n"
                                           for u in (1, 2, 3) for m in range(5) if (u + m) % 4))
  convert.convert("movielens", raw, tmp_path / "data")
  return tmp_path / "data"


def test_converted_dataset_field_feeds_the_pipelines(tiny_folder, movielens_dir, tmp_path,
                                                     capsys):
  from data_pipelines import convert, pipelines, records
  from mmcl import cli
  items = records.ArrayRecordSource(movielens_dir, "items")
  rows = items.read_many(list(range(len(items))))
  out = tmp_path / "item_text"
  assert cli.main(["features", "--tower", str(tiny_folder), "--input", str(movielens_dir),
                   "--field", "text", "--output", str(out), "--max-length", "32",
                   "--batch-size", "4", "--chunk-size", "2"]) == 0
  assert f"features → {out}.npy: 5 × {WIDTH} (5 rows embedded)" in capsys.readouterr().out
  features = read_features(out, verify_hashes=True)
  # Ids are the items' own ids (interactions kind → item_id), rows in record order.
  assert features.ids == [r["item_id"] for r in rows] == ["10", "11", "12", "13", "14"]
  assert (features.manifest["split"], features.manifest["id_field"]) == ("items", "item_id")
  assert features.manifest["input_sha256"] == records.sha256_file(movielens_dir / "metadata.json")
  expected = encode_texts(tiny_folder, [r["text"] for r in rows], max_length=32)
  np.testing.assert_allclose(features.vectors, expected, atol=1e-5)

  # The sequence pipelines join the file onto item indices by item_id ...
  table, available = pipelines.item_feature_table(movielens_dir, out.with_suffix(".npy"))
  assert available.tolist() == [False] + [True] * 5
  np.testing.assert_array_equal(table[1:], features.vectors)
  np.testing.assert_array_equal(table[0], 0.0)
  # ... and `mmcl data convert --format embeddings` makes it an entity dataset.
  meta = convert.convert("embeddings", f"title={out}.npy", tmp_path / "entities")
  assert meta["kind"] == "entity" and meta["modalities"] == {"title": WIDTH}
  entity = records.ArrayRecordSource(tmp_path / "entities", "entities").read_many(range(5))
  assert [e["id"] for e in entity] == features.ids
  np.testing.assert_array_equal(np.stack([e["title"] for e in entity]), features.vectors)

  # bf16 compute (float32 output) and fsdp-placed weights over the 8 devices.
  bf16 = compute_features(tiny_folder, movielens_dir, "text", tmp_path / "bf16", max_length=32,
                          dtype="bfloat16", param_sharding="fsdp", progress=False)
  assert bf16.manifest["tower"]["dtype"] == "bfloat16"
  vectors = read_features(tmp_path / "bf16").vectors
  assert vectors.dtype == np.float32 and np.sum(vectors * expected, 1).min() > 0.99
  assert np.abs(vectors - expected).max() > 0  # it did compute in bf16

  # Errors name the dataset, the field and what is there.
  with pytest.raises(ValueError, match=r"field 'title' is not in the schema.*'item_id'"):
    compute_features(tiny_folder, movielens_dir, "title", tmp_path / "x", progress=False)
  with pytest.raises(ValueError, match="kind 'int32_sequence'"):
    compute_features(tiny_folder, movielens_dir, "text_ids", tmp_path / "x", progress=False)


def test_images_are_center_cropped_resized_from_bytes_or_arrays():
  import io

  from PIL import Image

  from mmcl.pretrained.towers import images_to_uint8
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
  png = io.BytesIO()
  Image.fromarray(wide).save(png, format="PNG")
  out = images_to_uint8([png.getvalue(), wide, wide[8:40, 24:56]], 32)
  # The central 48 × 48 square resized to 32 × 32 (as the evaluation pipelines crop), whether
  # from encoded bytes or pixels; an image already at the size is kept as is.
  from data_pipelines import image_ops
  expected = image_ops.crop_resize(wide, (16, 0, 64, 48), 32)
  np.testing.assert_array_equal(out[0], expected)
  np.testing.assert_array_equal(out[1], expected)
  np.testing.assert_array_equal(out[2], wide[8:40, 24:56])
  with pytest.raises(ValueError, match="record 7: image decode failed"):
    images_to_uint8([b"not an image"], 32, where=lambda row: f"record {row + 7}")
