"""Tests for the BERT-family tower and its Hugging Face loader (mmcl.models.bert / .pretrained)."""
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.models.bert import BertTower, masked_pool
from mmcl.pretrained.text import (
    bert_params_from_state_dict,
    encode_texts,
    load_safetensors,
    load_text_tower,
    load_tokenizer,
    read_sentence_pooling,
    tokenize,
)
from mmcl.parallel import sharding as sharding_lib
from mmcl.parallel.mesh import batch_sharding, make_mesh

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "minilm_reference.npz"
TINY = dict(vocab_size=1024, max_position=64, width=32, depth=2, num_heads=4, mlp_dim=64)


@pytest.fixture(scope="module")
def reference():
  data = np.load(FIXTURE)
  return {k: data[k] for k in data.files}


def _cosine(a, b):
  return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_encode_texts_matches_sentence_transformers(minilm_folder, reference):
  sentences = [str(s) for s in reference["sentences"]]
  assert "" in sentences and max(reference["lengths"]) == 256  # the edge cases are covered
  # batch_size 8 splits the 20 sentences over several batches of different padded lengths.
  got = encode_texts(minilm_folder, sentences, max_length=256, batch_size=8)
  want = reference["embeddings"]
  assert got.shape == want.shape == (20, 384) and got.dtype == np.float32
  cos = _cosine(got, want)
  assert cos.min() >= 0.9999, cos
  np.testing.assert_allclose(got, want, atol=2e-5)
  # Normalize is in the folder's modules.json, so the embeddings are unit vectors.
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_tokenization_matches_reference_ids(minilm_folder, reference):
  sentences = [str(s) for s in reference["sentences"]]
  ids, mask = tokenize(load_tokenizer(minilm_folder, max_length=256), sentences, pad_id=0)
  np.testing.assert_array_equal(mask.sum(1), reference["lengths"])
  width = reference["input_ids"].shape[1]
  np.testing.assert_array_equal(ids[:, :width], reference["input_ids"])
  assert ids.shape[1] % 32 == 0 and not mask[:, width:].any()


def test_vocab_txt_fallback_tokenizes_like_tokenizer_json(minilm_folder, reference, tmp_path):
  for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(minilm_folder / name, tmp_path / name)
  sentences = [str(s) for s in reference["sentences"]]
  a = tokenize(load_tokenizer(tmp_path, max_length=64), sentences, pad_id=0)
  b = tokenize(load_tokenizer(minilm_folder, max_length=64), sentences, pad_id=0)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1].sum(1).max() == 64


def test_read_sentence_pooling(minilm_folder, tmp_path):
  pooling = read_sentence_pooling(minilm_folder)
  assert (pooling.pool, pooling.normalize, pooling.max_seq_length) == ("mean", True, 256)
  (tmp_path / "1_Pooling").mkdir()
  (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
      {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
  assert read_sentence_pooling(tmp_path).pool == "cls"
  (tmp_path / "modules.json").write_text(json.dumps([
      {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
      {"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
  with pytest.raises(ValueError, match="Dense"):
    read_sentence_pooling(tmp_path)


def test_state_dict_errors_name_the_tensor(minilm_folder):
  pretrained = load_text_tower(minilm_folder, max_length=32)
  state = load_safetensors(minilm_folder)
  extra = dict(state, **{"encoder.layer.0.attention.self.distance_embedding.weight":
                         np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="distance_embedding"):
    bert_params_from_state_dict(extra, pretrained.tower)
  missing = {k: v for k, v in state.items() if k != "encoder.layer.5.output.dense.bias"}
  with pytest.raises(KeyError, match="encoder.layer.5.output.dense.bias"):
    bert_params_from_state_dict(missing, pretrained.tower)


# --- the tower itself, on a tiny random configuration ---------------------------------------------
def _tiny_inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, TINY["vocab_size"], size=(8, 12)).astype(np.int32)
  lengths = np.array([2, 3, 12, 7, 5, 9, 12, 4])
  mask = np.arange(12)[None] < lengths[:, None]
  return np.where(mask, ids, 0), mask


@pytest.fixture
def tiny_params(make_params):
  """Random parameters of BertTower(**TINY) (see tests/models/conftest.py)."""
  return make_params(BertTower(**TINY), _tiny_inputs()[0])


def test_masked_pool_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 5, 4)).astype(np.float32)
  valid = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  for pool, ref in [
      ("mean", [x[i][valid[i]].mean(0) for i in range(3)]),
      ("max", [x[i][valid[i]].max(0) for i in range(3)]),
      ("mean_sqrt_len", [x[i][valid[i]].sum(0) / np.sqrt(valid[i].sum()) for i in range(3)]),
      ("cls", [x[i][0] for i in range(3)])]:
    np.testing.assert_allclose(masked_pool(jnp.asarray(x), jnp.asarray(valid), pool), ref,
                               rtol=1e-6, atol=1e-6)


def _apply(model, params, ids, mask=None):
  # One compiled program per tower (eager dispatch compiles every operation apart).
  return np.asarray(jax.jit(model.apply)(params, ids, mask=mask))


def test_padding_does_not_change_embeddings(tiny_params):
  ids, mask = _tiny_inputs()
  model = BertTower(**TINY, normalize=True)
  out = _apply(model, tiny_params, ids, mask)
  longer = np.pad(ids, ((0, 0), (0, 20)))
  np.testing.assert_allclose(_apply(model, tiny_params, longer, np.pad(mask, ((0, 0), (0, 20)))),
                             out, atol=1e-5)
  # The explicit mask gives the same result as the pad-id mask.
  np.testing.assert_allclose(_apply(model, tiny_params, ids), out, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_bfloat16_compute_close_to_float32(tiny_params):
  ids, mask = _tiny_inputs()
  ref = _apply(BertTower(**TINY, normalize=True), tiny_params, ids, mask)
  out = _apply(BertTower(**TINY, normalize=True, dtype=jnp.bfloat16), tiny_params, ids, mask)
  assert out.dtype == np.float32
  assert _cosine(out, ref).min() > 0.99


def test_fsdp_sharded_params_give_the_same_embeddings(tiny_params):
  ids, mask = _tiny_inputs()
  model = BertTower(**TINY)
  mesh = make_mesh()
  shardings = sharding_lib.tree_shardings(tiny_params, sharding_lib.STRATEGIES["fsdp"], mesh)
  sharded = jax.device_put(tiny_params, shardings)
  word = sharded["params"]["embeddings"]["word"]["embedding"]
  assert len(word.sharding.device_set) == 8 and not word.sharding.is_fully_replicated
  out = jax.jit(model.apply)(sharded, jax.device_put(ids, batch_sharding(mesh)))
  np.testing.assert_allclose(out, _apply(model, tiny_params, ids, mask), atol=1e-5)


def test_remat_and_dropout(tiny_params):
  ids, mask = _tiny_inputs()
  ref = _apply(BertTower(**TINY), tiny_params, ids, mask)
  np.testing.assert_allclose(_apply(BertTower(**TINY, remat=True), tiny_params, ids, mask), ref,
                             atol=1e-6)
  drop = BertTower(**TINY, dropout=0.5)
  a, b = (drop.apply(tiny_params, ids, train=True, rngs={"dropout": jax.random.key(seed)})
          for seed in (1, 2))
  assert np.abs(np.asarray(a - b)).max() > 1e-3
  np.testing.assert_allclose(_apply(drop, tiny_params, ids, mask), ref, atol=1e-6)


def test_rejects_too_long_ids(tiny_params):
  with pytest.raises(ValueError, match="max_position=64"):
    BertTower(**TINY).apply(tiny_params, np.ones((1, 65), np.int32))
