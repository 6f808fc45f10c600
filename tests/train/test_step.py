"""The generic train step: sharded == single device, gradient accumulation, non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmcl.config import Config
from mmcl.parallel import mesh as mesh_lib
from mmcl.parallel import sharding as sharding_lib
from mmcl.train.config import base_config
from mmcl.train.optim import make_optimizer
from mmcl.train.state import TrainState
from mmcl.train.step import make_train_step


def _loss(params, batch, rng, *, train):
  """Per-example weighted squared error of a 2-layer MLP: x [B, 64] → y [B, 4]."""
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  y = h @ params["w2"]
  loss = jnp.mean(jnp.sum((y - batch["y"]) ** 2, axis=-1) * batch["w"])
  return loss, {"mean_y": jnp.mean(y)}


def _setup(n_devices, param_sharding="fsdp", accum=1, lr=0.05):
  # SGD: Adam divides by sqrt(v), which turns float reduction-order noise in near-zero gradients into
  # visible update differences; SGD keeps the comparison about the sharding, not about Adam.
  c = base_config()
  c.optim.name = "sgd"
  c.optim.lr = lr
  c.optim.warmup_steps = 0
  tx, schedule = make_optimizer(c.optim, 10)
  mesh = mesh_lib.make_mesh(devices=jax.devices()[:n_devices])
  rng = np.random.default_rng(0)
  params = {"w1": rng.normal(size=(64, 256)).astype(np.float32) * 0.1,
            "b1": np.zeros(256, np.float32),
            "w2": rng.normal(size=(256, 4)).astype(np.float32) * 0.1}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(1))
  shardings = sharding_lib.tree_shardings(state, sharding_lib.STRATEGIES[param_sharding], mesh)
  state = jax.device_put(state, shardings)
  step = jax.jit(make_train_step(_loss, tx, schedule, grad_accum_steps=accum, mesh=mesh),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)))
  return mesh, state, step, shardings


def _batches(n=3, b=32):
  rng = np.random.default_rng(1)
  return [{"x": rng.normal(size=(b, 64)).astype(np.float32),
           "y": rng.normal(size=(b, 4)).astype(np.float32),
           "w": np.ones(b, np.float32)} for _ in range(n)]


def _run(n_devices, **kw):
  mesh, state, step, shardings = _setup(n_devices, **kw)
  losses = []
  for b in _batches():
    state, m = step(state, mesh_lib.host_batch_to_global(mesh, b))
    losses.append(float(m["loss"]))
  return jax.device_get(state.params), losses, shardings


def test_sharded_step_equals_single_device():
  p1, l1, _ = _run(1)
  p8, l8, shardings = _run(8)
  # FSDP really shards the big weight over the 8 devices.
  assert shardings.params["w1"].spec == jax.sharding.PartitionSpec(None, "data") or \
      shardings.params["w1"].spec == jax.sharding.PartitionSpec("data", None)
  np.testing.assert_allclose(l8, l1, rtol=1e-6)
  for k in p1:
    np.testing.assert_allclose(p8[k], p1[k], rtol=1e-5, atol=1e-7)
  assert l1[-1] < l1[0]


def test_gradient_accumulation_matches_full_batch():
  p1, l1, _ = _run(8, accum=1)
  p4, l4, _ = _run(8, accum=4)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  for k in p1:
    np.testing.assert_allclose(p4[k], p1[k], rtol=1e-5, atol=1e-7)


def test_nonfinite_step_leaves_state_unchanged():
  mesh, state, step, _ = _setup(8)
  b = _batches(1)[0]
  before = jax.device_get(state.params)
  b["w"][3] = np.nan
  new_state, m = step(state, mesh_lib.host_batch_to_global(mesh, b))
  assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
  after = jax.device_get(new_state.params)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k])


def test_indivisible_accumulation_is_a_clear_error():
  mesh, state, step, _ = _setup(8, accum=3)
  with pytest.raises(ValueError, match="not divisible by train.grad_accum_steps=3"):
    step(state, mesh_lib.host_batch_to_global(mesh, _batches(1)[0]))


def test_schedule_warmup_and_cosine():
  c = base_config()
  c.optim.lr, c.optim.warmup_steps, c.optim.end_lr_ratio = 1.0, 10, 0.1
  _, sched = make_optimizer(c.optim, 110)
  assert float(sched(0)) == 0.0 and abs(float(sched(5)) - 0.5) < 1e-6
  assert abs(float(sched(10)) - 1.0) < 1e-6 and abs(float(sched(110)) - 0.1) < 1e-6


def test_mesh_errors_name_the_key():
  with pytest.raises(ValueError, match="mesh.model=3"):
    mesh_lib.make_mesh(model=3)
  with pytest.raises(ValueError, match="mesh.data=3"):
    mesh_lib.make_mesh(data=3)


def _dual_encoder(mesh):
  """A linear two-tower model with the sharded InfoNCE: embed / loss_from_embeddings / loss."""
  from mmcl.losses.sharded import infonce_over_mesh

  def embed(params, batch, rng, *, train):
    a = jnp.tanh(batch["x"] @ params["wa"])
    b = jnp.tanh(batch["y"] @ params["wb"])
    norm = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    return {"a": norm(a), "b": norm(b)}

  def emb_loss(params, emb, batch):
    scale = jnp.exp(params["t"])
    return infonce_over_mesh(emb["a"], emb["b"], mesh, logit_scale=scale), {"scale": scale}

  def loss(params, batch, rng, *, train):
    return emb_loss(params, embed(params, batch, rng, train=train), batch)
  return embed, emb_loss, loss


def _run_dual(accum, grad_cache):
  c = base_config()
  c.optim.name, c.optim.lr, c.optim.warmup_steps = "sgd", 0.5, 0
  tx, schedule = make_optimizer(c.optim, 10)
  mesh = mesh_lib.make_mesh()
  embed, emb_loss, loss = _dual_encoder(mesh)
  rng = np.random.default_rng(0)
  params = {"wa": rng.normal(size=(16, 8)).astype(np.float32),
            "wb": rng.normal(size=(12, 8)).astype(np.float32), "t": np.float32(2.0)}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     rng=jax.random.PRNGKey(1))
  step = jax.jit(make_train_step(loss, tx, schedule, grad_accum_steps=accum, mesh=mesh,
                                 grad_cache=(embed, emb_loss) if grad_cache else None))
  losses = []
  for _ in range(3):
    z = rng.normal(size=(64, 8)).astype(np.float32)
    batch = {"x": np.concatenate([z, rng.normal(size=(64, 8)).astype(np.float32)], 1),
             "y": np.concatenate([z, rng.normal(size=(64, 4)).astype(np.float32)], 1)}
    state, m = step(state, mesh_lib.host_batch_to_global(mesh, batch))
    losses.append(float(m["loss"]))
  return jax.device_get(state.params), losses


def test_grad_cache_equals_full_batch_for_in_batch_negatives():
  p_full, l_full = _run_dual(1, False)
  p_gc, l_gc = _run_dual(4, True)
  p_acc, l_acc = _run_dual(4, False)
  np.testing.assert_allclose(l_gc, l_full, rtol=1e-5)
  for k in p_full:
    np.testing.assert_allclose(p_gc[k], p_full[k], rtol=1e-5, atol=1e-6)
  # Plain accumulation sees only 16 negatives per micro-batch: a different (lower) loss.
  assert l_acc[0] < l_full[0] - 0.5
