"""GPU checks of impl="fused": the compiled Triton kernels against float32 dense.

Skipped off a GPU: test_fused.py checks the same kernels on CPU in Pallas interpret mode (exact
parity with the dense kernel) and their Triton lowering. Here, on fresh random unit embeddings
cast to bfloat16 (float32 accumulation in the kernels), the relative error ‖x − x_ref‖ / ‖x_ref‖
of the loss, of both embedding gradients and of the logit scale (and bias) gradients must be
≤ 1e-2 against the dense loss of the float32 embeddings computed at full float32 precision
(bf16 rounding alone gives ~3e-3), for B ∈ {1000, 4096, 12345} (1000 and 12345 are not
multiples of any tile) and D ∈ {128, 256, 512, 1024}; the same with masks, weights and duplicate
groups; float32 operands (IEEE float32 dots in Triton) to 1e-4; and the sharded path (shard_map
with check_vma=True) on a one-GPU mesh.

  .venv/bin/pytest tests/losses/test_fused_gpu.py -v -s    # -s prints every measured error
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from mmcl import losses
from mmcl.losses import sharded

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="needs a GPU: checks the compiled Triton kernels of impl='fused' against the float32 "
           "reference (tests/losses/test_fused.py covers them in interpret mode on CPU)")

BATCHES = (1000, 4096, 12345)
DIMS = (128, 256, 512, 1024)
BF16_RTOL = 1e-2
F32_RTOL = 1e-4


def _unit(key, n, d):
  x = jax.random.normal(key, (n, d), jnp.float32)
  return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def _inputs(n, d, seed):
  ka, kb = jax.random.split(jax.random.key(seed))
  return _unit(ka, n, d), _unit(kb, n, d)


def _options(n, seed):
  rng = np.random.default_rng(seed)
  a_valid, b_valid = rng.random(n) > 0.1, rng.random(n) > 0.1
  groups = np.stack([rng.integers(0, n // 4, n), rng.integers(-1, n // 2, n)], 1)
  return dict(weights=jnp.asarray(rng.uniform(0.2, 2.0, n), jnp.float32),
              a_valid=jnp.asarray(a_valid), b_valid=jnp.asarray(b_valid),
              group_ids=jnp.asarray(groups, jnp.int32))


def _value_and_grads(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


def _reference(fn, *args):
  """Dense float32 loss and gradients with float32 (not TF32) matmuls."""
  with jax.default_matmul_precision("highest"):
    return _value_and_grads(fn, *args)


def _check(got, want, rtol, what):
  names = ["loss"] + [f"grad {i}" for i in range(len(got[1]))]
  leaves = [got[0], *got[1]], [want[0], *want[1]]
  errors = {}
  for name, x, y in zip(names, *leaves, strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.all(np.isfinite(x)), f"{what} {name}: non-finite values"
    errors[name] = float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))
  print(f"{what}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
  bad = {k: v for k, v in errors.items() if v > rtol}
  assert not bad, f"{what}: relative error above {rtol}: {bad}"


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", BATCHES)
def test_infonce_bf16_within_1e2_of_f32_reference(n, d):
  a, b = _inputs(n, d, seed=n + d)
  s = jnp.float32(20.0)
  want = _reference(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="dense"), a, b, s)
  got = _value_and_grads(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="fused"),
                         a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), s)
  _check(got, want, BF16_RTOL, f"infonce bf16 B={n} D={d}")


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", BATCHES)
def test_sigmoid_bf16_within_1e2_of_f32_reference(n, d):
  a, b = _inputs(n, d, seed=2 * n + d)
  s, c = jnp.float32(10.0), jnp.float32(-10.0)

  def loss(impl):
    return lambda a, b, s, c: losses.sigmoid_loss(a, b, logit_scale=s, logit_bias=c, impl=impl)

  want = _reference(loss("dense"), a, b, s, c)
  got = _value_and_grads(loss("fused"), a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), s, c)
  _check(got, want, BF16_RTOL, f"sigmoid bf16 B={n} D={d}")


@pytest.mark.parametrize("n,d", [(1000, 128), (12345, 512), (4096, 1024)])
def test_masks_weights_and_groups_bf16(n, d):
  a, b = _inputs(n, d, seed=3 * n + d)
  s, c = jnp.float32(20.0), jnp.float32(-10.0)
  opts = _options(n, seed=n)
  want = _reference(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="dense", **opts),
                    a, b, s)
  got = _value_and_grads(
      lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="fused", **opts),
      a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), s)
  _check(got, want, BF16_RTOL, f"infonce bf16 + options B={n} D={d}")

  def sig(impl):
    return lambda a, b, s, c: losses.sigmoid_loss(a, b, logit_scale=s, logit_bias=c, impl=impl,
                                                  **opts)

  want = _reference(sig("dense"), a, b, s, c)
  got = _value_and_grads(sig("fused"), a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), s, c)
  _check(got, want, BF16_RTOL, f"sigmoid bf16 + options B={n} D={d}")


def test_float32_operands_match_dense_to_1e4():
  n, d = 5000, 256
  a, b = _inputs(n, d, seed=7)
  s, c = jnp.float32(20.0), jnp.float32(-10.0)
  opts = _options(n, seed=7)
  for impl_loss, args in (
      (lambda impl: lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl=impl, **opts),
       (a, b, s)),
      (lambda impl: lambda a, b, s, c: losses.sigmoid_loss(
          a, b, logit_scale=s, logit_bias=c, impl=impl, **opts), (a, b, s, c))):
    want = _reference(impl_loss("dense"), *args)
    got = _value_and_grads(impl_loss("fused"), *args)
    _check(got, want, F32_RTOL, f"float32 B={n} D={d} ({len(args)} args)")


def test_sharded_over_one_gpu_mesh_with_check_vma():
  """The fused kernel per device block inside shard_map (check_vma=True, compiled kernels)."""
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
  n, d = 4096, 512
  a, b = _inputs(n, d, seed=9)
  s = jnp.float32(20.0)
  opts = _options(n, seed=9)
  want = _reference(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="dense", **opts),
                    a, b, s)
  got = _value_and_grads(lambda a, b, s: sharded.infonce_over_mesh(
      a, b, mesh, logit_scale=s, impl="fused", **opts), a.astype(jnp.bfloat16),
      b.astype(jnp.bfloat16), s)
  _check(got, want, BF16_RTOL, f"sharded infonce bf16 B={n} D={d}")
