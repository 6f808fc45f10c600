"""Memory stays linear in the batch: XLA's compiled memory analysis, compile only (nothing runs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmcl import losses
from mmcl.losses import sharded


def _temp_bytes(fn, *args, argnums):
  compiled = jax.jit(jax.value_and_grad(fn, argnums=argnums)).lower(*args).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("this backend reports no compiled memory analysis")
  return analysis.temp_size_in_bytes


def test_tiled_forward_backward_never_materialises_the_logit_matrix():
  b, d = 65_536, 256
  emb = jax.ShapeDtypeStruct((b, d), jnp.float32)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  ids = jax.ShapeDtypeStruct((b,), jnp.int32)
  limit = 0.05 * b * b * 4  # 5% of one float32 [B, B] matrix (≈ 819 MiB)
  temps = {
      "infonce": _temp_bytes(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="tiled"),
                             emb, emb, scalar, argnums=(0, 1, 2)),
      "sigmoid_loss": _temp_bytes(
          lambda a, b, s, c: losses.sigmoid_loss(a, b, logit_scale=s, logit_bias=c, impl="tiled"),
          emb, emb, scalar, scalar, argnums=(0, 1, 2, 3)),
      "supcon": _temp_bytes(
          lambda z, s, ids: losses.supcon(z, logit_scale=s, clip_ids=ids, impl="tiled"),
          emb, scalar, ids, argnums=(0, 1)),
  }
  for name, temp in temps.items():
    assert temp < limit, f"{name}: {temp / 2**20:.0f} MiB of temporaries, limit {limit / 2**20:.0f}"


def test_memory_analysis_sees_a_dense_logit_matrix():
  """Control: the same analysis does report the [B, B] matrix of the dense kernel."""
  b, d = 8192, 256
  emb = jax.ShapeDtypeStruct((b, d), jnp.float32)
  temp = _temp_bytes(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="dense"),
                     emb, emb, jax.ShapeDtypeStruct((), jnp.float32), argnums=(0, 1, 2))
  assert temp > b * b * 4


def test_sharded_per_device_memory_grows_at_most_linearly_with_devices():
  """Per-device temporaries at a fixed per-device batch, on 1, 4 and 8 devices: the growth per
  added device is constant (the gathered embeddings and their gradient), with no B_g² term."""
  local, d = 2048, 64
  counts = (1, 4, 8)
  if len(jax.devices()) < max(counts):
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  temps = []
  for n in counts:
    mesh = jax.make_mesh((n,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])
    emb = jax.ShapeDtypeStruct((n * local, d), jnp.float32,
                               sharding=NamedSharding(mesh, P("data")))
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    temps.append(_temp_bytes(
        lambda a, b, s, mesh=mesh: sharded.infonce_over_mesh(a, b, mesh, logit_scale=s,
                                                             impl="tiled", block_size=512),
        emb, emb, scale, argnums=(0, 1, 2)))
  t1, t4, t8 = np.asarray(temps, np.float64)
  slope_low, slope_high = (t4 - t1) / 3, (t8 - t4) / 4
  embedding_bytes = local * d * 4
  # A B_g² term γ·n² would make the second slope 12/5 of the first.
  assert slope_high <= 1.1 * slope_low + embedding_bytes, temps
  # Each added device costs a few [B_l, D] buffers (gathered rows, their gradient), no more.
  assert slope_high <= 8 * embedding_bytes, temps
  global_batch = max(counts) * local
  assert t8 < 0.05 * global_batch**2 * 4, temps
