"""DistilBERT, RoBERTa and XLM-R folders load into `BertTower` with the outputs of `transformers`.

Each test saves a tiny randomly initialised `transformers` model (hidden 32, 2 layers) with
`save_pretrained` (config.json + model.safetensors) and compares the per-token features and the
mean-pooled embedding on right-padded batches. Skipped where `transformers` is not installed.
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.pretrained.text import load_safetensors, load_text_params

SMALL = dict(vocab_size=99, max_position_embeddings=40)


# torch and transformers are imported by the tests that use them, not at collection: every
# pytest-xdist worker collects this file, one runs it.
@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch", reason="torch is needed for the reference outputs")


@pytest.fixture(scope="module")
def transformers():
  return pytest.importorskip("transformers", reason="transformers is needed to write the "
                                                    "reference models (pip install transformers)")


def _models(transformers):
  return {"distilbert": transformers.DistilBertModel, "roberta": transformers.RobertaModel,
          "xlm-roberta": transformers.XLMRobertaModel, "bert": transformers.BertModel}


def _configs(transformers):
  bert_like = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, **SMALL)
  return {
      "distilbert": transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                  pad_token_id=0, **SMALL),
      # RoBERTa / XLM-R: pad id 1, positions numbered from pad + 1 (max_position = 40 + 2 rows).
      "roberta": transformers.RobertaConfig(pad_token_id=1, type_vocab_size=1,
                                            **{**bert_like, "max_position_embeddings": 42}),
      "xlm-roberta": transformers.XLMRobertaConfig(
          pad_token_id=1, layer_norm_eps=1e-5, hidden_act="gelu_new",
          **{**bert_like, "max_position_embeddings": 42}),
      "bert": transformers.BertConfig(**bert_like),
  }


def _inputs(pad_id):
  rng = np.random.default_rng(0)
  lengths = np.array([3, 17, 40, 8])
  valid = np.arange(40)[None] < lengths[:, None]
  ids = np.where(valid, rng.integers(3, SMALL["vocab_size"], size=(4, 40)), pad_id)
  return ids.astype(np.int32), valid


@pytest.mark.parametrize("model_type", ["distilbert", "roberta", "xlm-roberta", "bert"])
def test_family_matches_transformers(model_type, tmp_path, torch, transformers):
  config = _configs(transformers)[model_type]
  torch.manual_seed(0)
  model = _models(transformers)[model_type](config).eval()
  with torch.no_grad():  # larger LayerNorm / bias values than the init, for a sharper test
    for name, p in model.named_parameters():
      if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
  tower, params = load_text_params(tmp_path)
  ids, valid = _inputs(tower.pad_id)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(valid).long()).last_hidden_state.numpy()
  feats = np.asarray(tower.apply({"params": params}, jnp.asarray(ids), mask=jnp.asarray(valid),
                                 method=tower.token_features))
  scale = np.abs(ref[valid]).max()
  assert np.abs(feats[valid] - ref[valid]).max() <= 1e-4 * scale
  pooled = np.asarray(tower.apply({"params": params}, jnp.asarray(ids)))  # mask = ids != pad
  mean = (ref * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)
  np.testing.assert_allclose(pooled, mean, atol=1e-4 * scale)
  if model_type == "distilbert":
    assert tower.type_vocab_size == 0 and "token_type" not in params["embeddings"]
  if model_type in ("roberta", "xlm-roberta"):
    assert tower.position_offset == 2
    # The full 40-token row uses position rows 2 … 41: one more token would not fit.
    with pytest.raises(ValueError, match="position_offset=2"):
      tower.apply({"params": params}, np.full((1, 41), 5, np.int32))


def test_unsupported_model_type_names_file_and_key(tmp_path, transformers):
  transformers.BertModel(_configs(transformers)["bert"]).save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"config.json: key 'model_type' is 'gpt2', which this "
                                       r"loader does not read; supported: \('bert', 'roberta'"):
    load_text_params(tmp_path)
  # A DistilBERT checkpoint declared as BERT fails on the first missing tensor, named.
  transformers.DistilBertModel(_configs(transformers)["distilbert"]).save_pretrained(tmp_path / "d")
  config = json.loads((tmp_path / "d" / "config.json").read_text())
  (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "model_type": "bert",
                                                          "hidden_size": 32,
                                                          "num_hidden_layers": 2,
                                                          "num_attention_heads": 4,
                                                          "intermediate_size": 64}))
  assert "embeddings.word_embeddings.weight" in load_safetensors(tmp_path / "d")
  with pytest.raises(KeyError, match="embeddings.token_type_embeddings.weight"):
    load_text_params(tmp_path / "d")
