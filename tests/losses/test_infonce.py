"""infonce: literal reference, dense = tiled, open_clip parity, edge cases, entry checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loss_reference import (assert_close, infonce_reference, load_open_clip_loss,
                            random_embeddings)
from mmcl import losses
from mmcl.losses import common


def _options(n, seed=0):
  """Weights, missing rows on both sides (one all-invalid row) and 2-column duplicate groups."""
  rng = np.random.default_rng(seed)
  weights = rng.uniform(0.2, 2.0, n).astype(np.float32)
  a_valid = rng.random(n) > 0.2
  b_valid = rng.random(n) > 0.2
  a_valid[3] = b_valid[3] = False
  groups = np.stack([rng.integers(0, n // 3, n), rng.integers(-1, n // 2, n)], 1).astype(np.int32)
  return dict(weights=jnp.asarray(weights), a_valid=jnp.asarray(a_valid),
              b_valid=jnp.asarray(b_valid), group_ids=jnp.asarray(groups))


def _value_and_grads(fn, a, b, s):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(a, b, s)


def _check_same(got, want, rtol=1e-5, what=""):
  (v1, g1), (v2, g2) = got, want
  assert_close(v1, v2, rtol, f"{what} value")
  for name, x, y in zip(("d/da", "d/db", "d/ds"), g1, g2, strict=True):
    assert_close(x, y, rtol, f"{what} {name}")


@functools.lru_cache(maxsize=None)
def _reference_case():
  """(a, b, s, options, reference value and gradients), computed once for both impls."""
  n = 37
  a, b = random_embeddings(0, n, 16)
  s = jnp.float32(7.0)
  opts = _options(n)
  np_opts = {k: np.asarray(v) for k, v in opts.items()}  # static for the literal reference
  ref = _value_and_grads(
      lambda a, b, s: infonce_reference(a, b, s, np_opts["weights"], np_opts["a_valid"],
                                        np_opts["b_valid"], np_opts["group_ids"]), a, b, s)
  return a, b, s, opts, ref


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_matches_literal_reference_with_every_option(impl):
  a, b, s, opts, ref = _reference_case()
  got = _value_and_grads(
      lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl=impl, block_size=8, **opts), a, b, s)
  _check_same(got, ref, what=impl)


@pytest.mark.parametrize("n,block,with_options", [(64, 16, False), (130, 32, True)])
def test_tiled_equals_dense(n, block, with_options):
  a, b = random_embeddings(n, n, 24)
  s = jnp.float32(20.0)
  opts = _options(n, seed=n) if with_options else {}

  def loss(impl):
    return lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl=impl, block_size=block, **opts)

  _check_same(_value_and_grads(loss("tiled"), a, b, s), _value_and_grads(loss("dense"), a, b, s),
              what=f"B={n} block={block}")


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_no_valid_pair_gives_zero_loss_and_zero_gradients(impl):
  n = 13
  a, b = random_embeddings(1, n, 16)
  a_valid = jnp.asarray(np.arange(n) % 2 == 0)
  b_valid = ~a_valid  # every row misses one side: no pair is valid
  value, grads = _value_and_grads(
      lambda a, b, s: losses.infonce(a, b, logit_scale=s, a_valid=a_valid, b_valid=b_valid,
                                     impl=impl, block_size=4), a, b, jnp.float32(10.0))
  assert float(value) == 0.0
  for g in grads:
    assert np.all(np.asarray(g) == 0.0)


def test_invalid_rows_take_no_part():
  """Rows with a missing side behave as if they were not in the batch at all."""
  n = 20
  a, b = random_embeddings(2, n, 16)
  valid = jnp.asarray(np.arange(n) % 3 != 0)
  keep = np.flatnonzero(np.asarray(valid))
  masked = jax.jit(lambda a, b: losses.infonce(a, b, logit_scale=5.0, a_valid=valid,
                                                b_valid=valid, impl="tiled", block_size=8))(a, b)
  dropped = jax.jit(lambda a, b: losses.infonce(a, b, logit_scale=5.0, impl="dense"))(
      a[keep], b[keep])
  assert_close(masked, dropped, what="masked vs dropped rows")


def test_weights_are_a_weighted_mean_of_per_pair_losses():
  """Scaling all weights changes nothing; weight 0 on a pair drops its anchor terms only."""
  n = 16
  a, b = random_embeddings(3, n, 16)
  w = jnp.linspace(0.5, 2.0, n)
  loss = jax.jit(lambda w, impl: losses.infonce(a, b, logit_scale=10.0, weights=w, impl=impl,
                                                block_size=8), static_argnums=1)
  base = loss(w, "tiled")
  assert_close(loss(3.0 * w, "dense"), base, what="scaled weights")
  uniform = loss(jnp.ones_like(w), "dense")
  assert abs(float(base) - float(uniform)) > 1e-4  # the weights do matter


def test_duplicate_groups_only_remove_negatives():
  """Two identical (query, document) pairs in a batch: without groups each copy is the other's
  hardest negative; with a shared group id that negative is gone (and nothing else changes)."""
  a, b = random_embeddings(4, 8, 16)
  a = a.at[7].set(a[0])
  b = b.at[7].set(b[0])
  groups = jnp.asarray([0, 1, 2, 3, 4, 5, 6, 0], jnp.int32)
  loss = jax.jit(lambda g, impl: losses.infonce(a, b, logit_scale=10.0, group_ids=g, impl=impl,
                                                block_size=3), static_argnums=1)
  grouped = loss(groups, "tiled")
  plain = jax.jit(lambda: losses.infonce(a, b, logit_scale=10.0, impl="dense"))()
  assert float(grouped) < float(plain)
  assert_close(grouped, infonce_reference(a, b, 10.0, groups=np.asarray(groups)),
               what="groups vs reference")
  # Negative ids match nothing: all −1 is the same as no groups.
  none = loss(-jnp.ones((8,), jnp.int32), "dense")
  assert_close(none, plain, what="ids -1 vs no groups")


def test_open_clip_clip_loss_parity():
  module, reason = load_open_clip_loss()
  if module is None:
    pytest.skip(reason)
  import torch
  n, d = 64, 32
  a, b = random_embeddings(5, n, d)
  s = 1.0 / 0.07
  ta = torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=True)
  tb = torch.tensor(np.asarray(b), dtype=torch.float64, requires_grad=True)
  ts = torch.tensor(s, dtype=torch.float64, requires_grad=True)
  ref = module.ClipLoss()(ta, tb, ts)
  ref.backward()
  # The dense kernel is compared here (the tiled one equals it: test_tiled_equals_dense);
  # test_sigmoid compares the tiled kernel with open_clip directly.
  value, (ga, gb, gs) = _value_and_grads(
      lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="dense"), a, b, jnp.float32(s))
  assert_close(value, ref.item(), what="loss vs open_clip")
  assert_close(ga, ta.grad.numpy(), what="d/da vs open_clip")
  assert_close(gb, tb.grad.numpy(), what="d/db vs open_clip")
  assert_close(gs, ts.grad.item(), what="d/ds vs open_clip")


def test_bfloat16_inputs_tiled_matches_dense():
  n = 48
  a, b = random_embeddings(6, n, 32)
  a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  dense = _value_and_grads(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="dense"),
                           a, b, jnp.float32(10.0))
  tiled = _value_and_grads(
      lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="tiled", block_size=16),
      a, b, jnp.float32(10.0))
  assert tiled[1][0].dtype == jnp.bfloat16
  # The gradient matmuls run in bfloat16 in the tiled kernel (as on an accelerator): ~1e-2.
  _check_same(tiled, dense, rtol=2e-2, what="bf16")


def test_impl_choice_and_entry_checks():
  a, b = random_embeddings(7, 8, 16)
  assert common.resolve_impl("auto", 4096, 4096, "t") == "dense"
  assert common.resolve_impl("auto", 4096, 4097, "t") == "tiled"
  with pytest.raises(ValueError, match="power of two"):  # impl="fused" is tested in test_fused.py
    losses.infonce(a, b, logit_scale=1.0, impl="fused", block_size=12)
  with pytest.raises(ValueError, match="impl must be one of"):
    losses.infonce(a, b, logit_scale=1.0, impl="blocked")
  with pytest.raises(ValueError, match="same shape"):
    losses.infonce(a, b[:, :8], logit_scale=1.0)
  with pytest.raises(ValueError, match=r"\[B, D\]"):
    losses.infonce(a[0], b[0], logit_scale=1.0)
  with pytest.raises(TypeError, match="floating"):
    losses.infonce(a.astype(jnp.int32), b.astype(jnp.int32), logit_scale=1.0)
  with pytest.raises(ValueError, match="logit_scale"):
    losses.infonce(a, b, logit_scale=jnp.ones((1,)))
  with pytest.raises(TypeError, match="a_valid.*bool"):
    losses.infonce(a, b, logit_scale=1.0, a_valid=jnp.ones((8,), jnp.int32))
  with pytest.raises(ValueError, match=r"weights.*\(8,\)"):
    losses.infonce(a, b, logit_scale=1.0, weights=jnp.ones((7,)))
  with pytest.raises(TypeError, match="group_ids.*integer"):
    losses.infonce(a, b, logit_scale=1.0, group_ids=jnp.ones((8,)))
  with pytest.raises(ValueError, match="block_size"):
    losses.infonce(a, b, logit_scale=1.0, impl="tiled", block_size=0)
