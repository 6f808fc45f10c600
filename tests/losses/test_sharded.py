"""Sharded losses on 8 CPU devices equal the single-device dense loss on the global batch.

Global batches are 8 × 9 = 72 rows (or views) and tiles are 4, so local batches are not multiples of
the tile; the options include rows that are invalid everywhere. Gradients are compared for the
embeddings and for logit_scale / logit_bias.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from loss_reference import assert_close, random_embeddings
from mmcl import losses
from mmcl.losses import sharded

N_DEV, LOCAL = 8, 9
N = N_DEV * LOCAL


def _mesh(shape=(N_DEV,), names=("data",)):
  if len(jax.devices()) < np.prod(shape):
    pytest.skip(f"needs {np.prod(shape)} devices "
                "(XLA_FLAGS=--xla_force_host_platform_device_count)")
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _value_and_grads(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


def _check_same(got, want, what):
  assert_close(got[0], want[0], what=f"{what} value")
  for i, (x, y) in enumerate(zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True)):
    assert_close(x, y, what=f"{what} grad {i}")


def _pair_options(seed=0):
  rng = np.random.default_rng(seed)
  a_valid, b_valid = rng.random(N) > 0.2, rng.random(N) > 0.2
  a_valid[10:13] = False  # a run of rows missing on one device
  b_valid[10:13] = False
  return dict(weights=jnp.asarray(rng.uniform(0.2, 2.0, N).astype(np.float32)),
              a_valid=jnp.asarray(a_valid), b_valid=jnp.asarray(b_valid),
              group_ids=jnp.asarray(rng.integers(-1, N // 3, (N, 2)).astype(np.int32)))


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_infonce(impl):
  mesh = _mesh()
  a, b = random_embeddings(40, N, 16)
  s = jnp.float32(12.0)
  opts = _pair_options()
  got = _value_and_grads(lambda a, b, s: sharded.infonce_over_mesh(
      a, b, mesh, logit_scale=s, impl=impl, block_size=4, **opts), a, b, s)
  want = _value_and_grads(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="dense",
                                                         **opts), a, b, s)
  _check_same(got, want, f"sharded {impl}")


# The collective logic is shared by both kernels; the dense kernel runs sharded in test_infonce.
@pytest.mark.parametrize("impl", ["tiled"])
def test_sigmoid_loss(impl):
  mesh = _mesh()
  a, b = random_embeddings(41, N, 16)
  args = (a, b, jnp.float32(10.0), jnp.float32(-4.0))
  opts = _pair_options(seed=1)
  got = _value_and_grads(lambda a, b, s, c: sharded.sigmoid_loss_over_mesh(
      a, b, mesh, logit_scale=s, logit_bias=c, impl=impl, block_size=4, **opts), *args)
  want = _value_and_grads(lambda a, b, s, c: losses.sigmoid_loss(
      a, b, logit_scale=s, logit_bias=c, impl="dense", **opts), *args)
  _check_same(got, want, f"sharded {impl}")


@pytest.mark.parametrize("impl", ["tiled"])
def test_supcon(impl):
  mesh = _mesh()
  (z,) = random_embeddings(42, N, 16, count=1)
  # Views of one clip sit on different devices (view-major layout), so positives cross devices.
  clip_ids = jnp.tile(jnp.arange(N // 2, dtype=jnp.int32), 2)
  rng = np.random.default_rng(2)
  exclude = jnp.asarray(rng.random(N) < 0.4)
  valid = jnp.asarray(rng.random(N) > 0.1)
  kw = dict(clip_ids=clip_ids, exclude=exclude, valid=valid)
  got = _value_and_grads(lambda z, s: sharded.supcon_over_mesh(
      z, mesh, logit_scale=s, impl=impl, block_size=4, **kw), z, jnp.float32(10.0))
  want = _value_and_grads(lambda z, s: losses.supcon(z, logit_scale=s, impl="dense", **kw),
                          z, jnp.float32(10.0))
  _check_same(got, want, f"sharded {impl}")


def test_multimodal_infonce_tiled():
  mesh = _mesh()
  audio, cf, text = random_embeddings(43, N, 16, count=3)
  embeddings = {"audio": audio, "cf": cf, "text": text}
  rng = np.random.default_rng(3)
  valid = {k: jnp.asarray(rng.random(N) > 0.3) for k in embeddings}
  # text∧cf present on exactly one row of the global batch: that pair must not contribute, even
  # though no single device can tell from its own rows.
  valid["text"] = jnp.zeros((N,), bool).at[jnp.asarray([5, 40])].set(True)
  valid["cf"] = valid["cf"].at[5].set(True).at[40].set(False)
  valid["audio"] = valid["audio"].at[5].set(True).at[40].set(True)
  got = _value_and_grads(lambda e, s: sharded.multimodal_infonce_over_mesh(
      e, valid, mesh, logit_scale=s, impl="tiled", block_size=4), embeddings, jnp.float32(10.0))
  want = _value_and_grads(lambda e, s: losses.multimodal_infonce(
      e, valid, logit_scale=s, impl="dense"), embeddings, jnp.float32(10.0))
  _check_same(got, want, "sharded multimodal")


def test_gradients_taken_inside_shard_map_on_a_2d_mesh():
  """A trainer that differentiates per device (inside shard_map) gets the local rows' share of the
  global gradient, and the full gradient for the replicated logit_scale; here the batch is split
  over two mesh axes at once."""
  mesh = _mesh((4, 2), ("data", "fsdp"))
  axes = ("data", "fsdp")
  a, b = random_embeddings(44, N // 9 * 4, 16)  # 32 rows, 4 per device
  s = jnp.float32(10.0)

  def per_device(a, b, s):
    return jax.value_and_grad(
        lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="tiled", block_size=3,
                                       axis_name=axes), argnums=(0, 1, 2))(a, b, s)

  got = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(axes), P(axes), P()),
                              out_specs=(P(), (P(axes), P(axes), P()))))(a, b, s)
  want = _value_and_grads(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="dense"),
                          a, b, s)
  _check_same(got, want, "grad inside shard_map")


def test_over_mesh_checks_divisibility_and_axis():
  mesh = _mesh()
  a, b = random_embeddings(45, 12, 16)
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    sharded.infonce_over_mesh(a, b, mesh, logit_scale=1.0)
  with pytest.raises(ValueError, match="not in the mesh axes"):
    sharded.infonce_over_mesh(a, b, mesh, "batch", logit_scale=1.0)
