"""Tests for the MLP projector."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.models.mlp import MLP

X = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)


def test_matches_manual_computation(make_params):
  model = MLP(hidden_dims=(16, 8), out_dim=6, activation="relu")
  params = make_params(model, X)["params"]
  h = np.maximum(X @ params["hidden_0"]["kernel"] + params["hidden_0"]["bias"], 0)
  h = np.maximum(h @ params["hidden_1"]["kernel"] + params["hidden_1"]["bias"], 0)
  expected = h @ params["out"]["kernel"] + params["out"]["bias"]
  out = model.apply({"params": params}, X)
  assert out.shape == (4, 6) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_artist_projector_output_layer_norm_and_bf16(make_params):
  # d_m → 512 → D, ReLU, dropout 0.3, LayerNorm on the output.
  model = MLP(hidden_dims=(512,), out_dim=32, activation="relu", dropout=0.3,
              layer_norm="output", dtype=jnp.bfloat16)
  params = make_params(model, X)
  assert set(params["params"]) == {"hidden_0", "out", "ln_out"}
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  apply = model.apply
  out = apply(params, X)
  assert out.shape == (4, 32) and out.dtype == jnp.float32
  # LayerNorm on the output: each row is (z - mean) / std · scale + bias.
  ln = params["params"]["ln_out"]
  z = (out - ln["bias"]) / ln["scale"]
  np.testing.assert_allclose(z.mean(-1), 0.0, atol=0.05)
  np.testing.assert_allclose(z.var(-1), 1.0, atol=0.05)
  train = apply(params, X, train=True, rngs={"dropout": jax.random.key(1)})
  assert np.abs(np.asarray(train - out)).max() > 1e-2
  np.testing.assert_array_equal(apply(params, X), out)


def test_hidden_layer_norm_and_linear_only(make_params):
  model = MLP(hidden_dims=(8,), out_dim=3, layer_norm="hidden", activation="gelu")
  assert set(make_params(model, X)["params"]) == {"hidden_0", "ln_hidden_0", "out"}
  linear = MLP(hidden_dims=(), out_dim=3, use_bias=False)
  params = make_params(linear, X)["params"]
  np.testing.assert_allclose(linear.apply({"params": params}, X),
                             X @ params["out"]["kernel"], atol=1e-5, rtol=1e-5)


def test_bad_config_raises():
  with pytest.raises(ValueError, match="MLP: `activation` must be one of"):
    MLP(activation="swish2").init(jax.random.key(0), X)
  with pytest.raises(ValueError, match="`layer_norm` must be one of"):
    MLP(layer_norm="pre").init(jax.random.key(0), X)
  with pytest.raises(TypeError, match="float dtype"):
    MLP().init(jax.random.key(0), X.astype(np.int32))
