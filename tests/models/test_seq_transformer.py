"""SASRec sequence encoder: causality, padding invariance, shapes and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.models.seq_transformer import SequenceEncoder, seq_encoder_flops


def _setup(causal=True):
  enc = SequenceEncoder(max_len=6, num_blocks=2, num_heads=2, dropout=0.0, causal=causal)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 8))
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]], bool)
  params = enc.init(jax.random.PRNGKey(1), x, mask)
  return enc, params, x, mask


def test_causal_outputs_ignore_the_future():
  enc, params, x, mask = _setup()
  y = enc.apply(params, x, mask)
  x2 = x.at[:, 4:].set(jax.random.normal(jax.random.PRNGKey(2), (3, 2, 8)))
  y2 = enc.apply(params, x2, mask)
  np.testing.assert_allclose(y[:, :4], y2[:, :4], atol=1e-5)
  assert np.abs(np.asarray(y[:, 5] - y2[:, 5])).max() > 1e-3


def test_bidirectional_outputs_see_the_future():
  enc, params, x, mask = _setup(causal=False)
  x2 = x.at[:, 5].set(0.0)
  assert np.abs(np.asarray(enc.apply(params, x, mask)[1, 0] - enc.apply(params, x2, mask)[1, 0])
                ).max() > 1e-4


def test_padding_tokens_do_not_matter():
  enc, params, x, mask = _setup()
  x2 = jnp.where(mask[..., None], x, 100.0)  # garbage in the padding rows
  y, y2 = enc.apply(params, x, mask), enc.apply(params, x2, mask)
  np.testing.assert_allclose(np.asarray(y)[np.asarray(mask)], np.asarray(y2)[np.asarray(mask)],
                             atol=1e-5)
  assert np.isfinite(np.asarray(y)).all()


def test_dropout_only_in_training():
  enc = SequenceEncoder(max_len=6, num_blocks=1, dropout=0.5)
  x, mask = jnp.ones((2, 6, 4)), jnp.ones((2, 6), bool)
  p = enc.init(jax.random.PRNGKey(0), x, mask)
  a = enc.apply(p, x, mask, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  b = enc.apply(p, x, mask, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert np.abs(np.asarray(a - b)).max() > 1e-3
  np.testing.assert_allclose(enc.apply(p, x, mask), enc.apply(p, x, mask))


def test_wrong_length_is_a_clear_error():
  enc, params, x, mask = _setup()
  with pytest.raises(ValueError, match="max_len"):
    enc.apply(params, x[:, :5], mask[:, :5])


def test_flops_grow_with_blocks():
  assert seq_encoder_flops(50, 50, 2) == 2 * seq_encoder_flops(50, 50, 1) > 0
