"""Tests for the shared Transformer pieces in mmcl.models.layers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.models.layers import TransformerEncoder

B, L, W = 2, 8, 32


def _encoder(**kw):
  cfg = dict(depth=2, num_heads=4, mlp_dim=64)
  cfg.update(kw)
  return TransformerEncoder(**cfg)


def _inputs(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, L, W), jnp.float32)


def test_causal_output_independent_of_future_tokens(make_params):
  enc = _encoder()
  x = _inputs()
  params = make_params(enc, x)
  apply = enc.apply
  t = 4
  # Replace every token after position t with unrelated values.
  x2 = x.at[:, t + 1:].set(jax.random.normal(jax.random.key(7), (B, L - t - 1, W)) * 3.0)
  y1 = apply(params, x, causal=True)
  y2 = apply(params, x2, causal=True)
  np.testing.assert_allclose(y1[:, :t + 1], y2[:, :t + 1], atol=1e-5, rtol=1e-5)
  # The later positions do see the change, and a non-causal encoder leaks it backwards.
  assert np.abs(np.asarray(y1[:, t + 1:] - y2[:, t + 1:])).max() > 1e-2
  z1 = apply(params, x, causal=False)
  z2 = apply(params, x2, causal=False)
  assert np.abs(np.asarray(z1[:, :t + 1] - z2[:, :t + 1])).max() > 1e-2


def test_key_mask_hides_padded_tokens(make_params):
  enc = _encoder()
  x = _inputs()
  key_mask = jnp.arange(L)[None, :] < jnp.array([[5], [3]])  # [B, L]: 5 and 3 valid tokens
  params = make_params(enc, x, key_mask=key_mask)
  apply = enc.apply
  noise = jax.random.normal(jax.random.key(9), x.shape) * 5.0
  x2 = jnp.where(key_mask[..., None], x, noise)  # change only the masked tokens
  y1 = apply(params, x, key_mask=key_mask)
  y2 = apply(params, x2, key_mask=key_mask)
  valid = np.asarray(key_mask)
  np.testing.assert_allclose(np.asarray(y1)[valid], np.asarray(y2)[valid], atol=1e-5, rtol=1e-5)
  # Without the mask the padded tokens leak into the valid positions.
  leak = np.asarray(apply(params, x) - apply(params, x2))[valid]
  assert np.abs(leak).max() > 1e-2


def test_dropout_only_in_train_mode(make_params):
  enc = _encoder(dropout=0.5)
  x = _inputs()
  params = make_params(enc, x)
  apply = enc.apply
  eval1 = apply(params, x, train=False)
  no_dropout = _encoder(dropout=0.0).apply(params, x, train=False)
  np.testing.assert_array_equal(eval1, no_dropout)
  tr_a = apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
  tr_a2 = apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
  tr_b = apply(params, x, train=True, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(tr_a, tr_a2)  # randomness only through the explicit key
  assert np.abs(np.asarray(tr_a - tr_b)).max() > 1e-2
  assert np.abs(np.asarray(tr_a - eval1)).max() > 1e-2


def test_remat_matches_plain_outputs_and_grads(make_params):
  x = _inputs()
  plain, remat = _encoder(depth=1, dropout=0.1), _encoder(depth=1, dropout=0.1, remat=True)
  params = make_params(plain, x)
  # Same parameter tree, so checkpoints do not depend on the remat setting.
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(remat.init, jax.random.key(1), x))

  def loss(p, model):
    y = model.apply(p, x, causal=True, train=True, rngs={"dropout": jax.random.key(4)})
    return jnp.sum(y ** 2)

  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, plain)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(p, remat)))(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g1, g2)


def test_bfloat16_compute_keeps_float32_params(make_params):
  enc = _encoder(dtype=jnp.bfloat16)
  x = _inputs()
  params = make_params(enc, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  y = enc.apply(params, x)
  assert y.dtype == jnp.bfloat16 and y.shape == (B, L, W)
  y32 = _encoder().apply(params, x)
  np.testing.assert_allclose(np.asarray(y, np.float32), y32, atol=0.1, rtol=0.1)


def test_bad_inputs_raise_clear_errors():
  enc = _encoder()
  with pytest.raises(ValueError, match="expected `x` with 3 dims"):
    jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((B, W)))
  with pytest.raises(ValueError, match="not divisible by num_heads=3"):
    jax.eval_shape(_encoder(num_heads=3).init, jax.random.key(0), _inputs())
  with pytest.raises(ValueError, match="key_mask shape"):
    jax.eval_shape(lambda: enc.init(jax.random.key(0), _inputs(),
                                    key_mask=jnp.ones((B, L + 1), bool)))
