"""Tests for the text tower: padding invariance, pooling, causal attention, dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.models.text_transformer import TextTransformer, pool_tokens

TINY = dict(vocab_size=50, max_len=16, width=32, depth=2, num_heads=4, mlp_dim=64, embed_dim=24)
# Right-padded rows of lengths 5, 3 and 8.
IDS = np.array([[7, 3, 9, 4, 2, 0, 0, 0],
                [5, 8, 1, 0, 0, 0, 0, 0],
                [2, 4, 6, 8, 10, 12, 14, 16]], np.int32)


@pytest.fixture
def params(make_params):
  """One parameter set serves every variant: pool, causal, dropout and dtype add no parameters."""
  return make_params(TextTransformer(**TINY), IDS)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype, params):
  model = TextTransformer(**TINY, dtype=dtype)
  abstract = jax.eval_shape(model.init, jax.random.key(0), IDS)
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)  # noqa: E731
  assert shapes(abstract) == shapes(params)  # float32 parameters whatever the compute dtype
  assert params["params"]["pos_embed"]["pos_embedding"].shape == (16, 32)
  assert params["params"]["token_embed"]["embedding"].shape == (50, 32)
  out = model.apply(params, IDS)
  assert out.shape == (3, 24) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  if dtype == jnp.bfloat16:
    ref = TextTransformer(**TINY).apply(params, IDS)
    np.testing.assert_allclose(out, ref, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("pool", ["eos", "mean", "first"])
@pytest.mark.parametrize("causal", [True, False])
def test_padding_invariance(pool, causal, params):
  apply = TextTransformer(**TINY, pool=pool, causal=causal).apply
  out = apply(params, IDS)
  longer = np.pad(IDS, ((0, 0), (0, 8)))  # 8 more pad tokens → length 16 = max_len
  np.testing.assert_allclose(apply(params, longer), out, atol=1e-5, rtol=1e-5)
  # Sanity: a real token in place of padding does change row 0 (except where causality hides it).
  changed = IDS.copy()
  changed[0, 5] = 11
  delta = np.abs(np.asarray(apply(params, changed) - out))[0].max()
  assert delta < 1e-5 if (pool == "first" and causal) else delta > 1e-4


def test_eos_pool_reads_last_valid_token(params):
  model = TextTransformer(**TINY, pool="eos")
  out, state = model.apply(params, IDS, capture_intermediates=True, mutable=("intermediates",))
  tokens = state["intermediates"]["encoder"]["__call__"][0]  # [B, L, W]
  last = np.array([4, 2, 7])
  expected = tokens[np.arange(3), last] @ params["params"]["head"]["proj"]["kernel"]
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_pool_tokens_values():
  x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
  valid = jnp.array([[True, True, False, False], [True, True, True, True]])
  np.testing.assert_allclose(pool_tokens(x, valid, "eos"), np.stack([x[0, 1], x[1, 3]]))
  np.testing.assert_allclose(pool_tokens(x, valid, "first"), x[:, 0])
  np.testing.assert_allclose(pool_tokens(x, valid, "mean"),
                             np.stack([x[0, :2].mean(0), x[1].mean(0)]))
  with pytest.raises(ValueError, match="unknown pool"):
    pool_tokens(x, valid, "max")


def test_causal_first_pool_ignores_later_tokens(params):
  # With causal attention, position 0 sees only itself, so pool="first" depends on ids[:, 0] only.
  apply = TextTransformer(**TINY, pool="first", causal=True).apply
  other = IDS.copy()
  other[:, 1:] = np.where(other[:, 1:] > 0, 49 - other[:, 1:], 0)
  np.testing.assert_allclose(apply(params, other), apply(params, IDS),
                             atol=1e-5, rtol=1e-5)


def test_dropout_only_in_train_mode(params):
  apply = TextTransformer(**TINY, dropout=0.3).apply
  np.testing.assert_array_equal(apply(params, IDS), TextTransformer(**TINY).apply(params, IDS))
  a = apply(params, IDS, train=True, rngs={"dropout": jax.random.key(1)})
  b = apply(params, IDS, train=True, rngs={"dropout": jax.random.key(2)})
  assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_bad_inputs_raise_clear_errors():
  init = lambda ids: jax.eval_shape(TextTransformer(**TINY).init, jax.random.key(0), ids)  # noqa
  with pytest.raises(ValueError, match="longer than max_len=16"):
    init(np.zeros((1, 17), np.int32))
  with pytest.raises(TypeError, match="int dtype, found float32"):
    init(np.zeros((1, 8), np.float32))
  with pytest.raises(ValueError, match="expected `ids` with 2 dims"):
    init(np.zeros((8,), np.int32))
