"""sigmoid_loss: literal reference, dense = tiled, open_clip SigLipLoss parity, edge cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loss_reference import (assert_close, load_open_clip_loss, random_embeddings,
                            sigmoid_reference)
from mmcl import losses


def _value_and_grads(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


def _check_same(got, want, rtol=1e-5, what=""):
  assert_close(got[0], want[0], rtol, f"{what} value")
  for i, (x, y) in enumerate(zip(got[1], want[1], strict=True)):
    assert_close(x, y, rtol, f"{what} grad {i}")


def test_dense_and_tiled_match_literal_reference_with_every_option():
  n = 29
  a, b = random_embeddings(10, n, 16)
  rng = np.random.default_rng(1)
  weights = rng.uniform(0.2, 2.0, n).astype(np.float32)
  a_valid, b_valid = rng.random(n) > 0.2, rng.random(n) > 0.2
  a_valid[0] = True
  b_valid[0] = False  # a row with negatives only
  groups = rng.integers(-1, n // 3, (n, 1)).astype(np.int32)
  args = (a, b, jnp.float32(10.0), jnp.float32(-5.0))
  ref = _value_and_grads(
      lambda a, b, s, c: sigmoid_reference(a, b, s, c, weights, a_valid, b_valid, groups), *args)
  for impl in ("dense", "tiled"):
    got = _value_and_grads(
        lambda a, b, s, c, impl=impl: losses.sigmoid_loss(
            a, b, logit_scale=s, logit_bias=c, weights=jnp.asarray(weights),
            a_valid=jnp.asarray(a_valid), b_valid=jnp.asarray(b_valid),
            group_ids=jnp.asarray(groups), impl=impl, block_size=8), *args)
    _check_same(got, ref, what=impl)


@pytest.mark.parametrize("n,block", [(64, 16), (130, 32)])
def test_tiled_equals_dense(n, block):
  a, b = random_embeddings(n, n, 32)
  args = (a, b, jnp.float32(10.0), jnp.float32(-10.0))

  def loss(impl):
    return lambda a, b, s, c: losses.sigmoid_loss(a, b, logit_scale=s, logit_bias=c, impl=impl,
                                                  block_size=block)

  _check_same(_value_and_grads(loss("tiled"), *args), _value_and_grads(loss("dense"), *args),
              what=f"B={n}")


def test_open_clip_siglip_loss_parity():
  module, reason = load_open_clip_loss()
  if module is None:
    pytest.skip(reason)
  import torch
  n, d = 37, 16
  a, b = random_embeddings(11, n, d)
  s, c = 10.0, -10.0
  tensors = [torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=True) for x in (a, b)]
  ts = torch.tensor(s, dtype=torch.float64, requires_grad=True)
  tc = torch.tensor(c, dtype=torch.float64, requires_grad=True)
  ref = module.SigLipLoss()(tensors[0], tensors[1], ts, tc)
  ref.backward()
  ref_grads = (tensors[0].grad.numpy(), tensors[1].grad.numpy(), ts.grad.item(), tc.grad.item())
  value, grads = _value_and_grads(
      lambda a, b, s, c: losses.sigmoid_loss(a, b, logit_scale=s, logit_bias=c, impl="tiled",
                                             block_size=16), a, b, jnp.float32(s), jnp.float32(c))
  assert_close(value, ref.item(), what="loss vs open_clip")
  for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
    assert_close(g, r, what=f"grad {i} vs open_clip")


def test_no_valid_row_gives_zero_and_checks_bias():
  a, b = random_embeddings(12, 6, 16)
  value, grads = _value_and_grads(
      lambda a, b, s, c: losses.sigmoid_loss(a, b, logit_scale=s, logit_bias=c,
                                             a_valid=jnp.zeros((6,), bool), impl="tiled"),
      a, b, jnp.float32(10.0), jnp.float32(-10.0))
  assert float(value) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in grads)
  with pytest.raises(ValueError, match="logit_bias"):
    losses.sigmoid_loss(a, b, logit_scale=1.0, logit_bias=jnp.zeros((2,)))
