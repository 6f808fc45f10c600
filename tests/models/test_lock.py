"""Tests for locked / top-N-unlocked / tuned towers (mmcl.models.lock) with the trainer optimizer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmcl.models.bert import BertTower
from mmcl.models.lock import TowerLock, count_frozen, frozen_filter, stop_frozen_gradients
from mmcl.models.vit import ViT
from mmcl.parallel.sharding import tree_paths
from mmcl.train.config import base_config
from mmcl.train.optim import make_optimizer

VIT = dict(patch_size=4, width=16, depth=3, num_heads=2, mlp_dim=32, embed_dim=8, pre_norm=True)
BERT = dict(vocab_size=64, max_position=16, width=16, depth=3, num_heads=2, mlp_dim=32, embed_dim=8)


@pytest.fixture
def params(make_params):
  """A two-tower parameter tree with the real towers' paths and shapes (random values)."""
  image = make_params(ViT(**VIT), np.zeros((1, 8, 8, 3), np.float32))["params"]
  text = make_params(BertTower(**BERT), np.ones((1, 4), np.int32), seed=1)["params"]
  return {"image": image, "text": text, "log_logit_scale": np.zeros((), np.float32)}


def test_top_n_selects_the_top_blocks_and_the_layers_above(params):
  frozen = frozen_filter(TowerLock("image", "top", depth=3, unlocked_blocks=1),
                         TowerLock("text", "top", depth=3, unlocked_blocks=2))
  trained = {p for p in tree_paths(params) if not frozen(p)}
  prefixes = {"/".join(p.split("/")[:3]) for p in trained}
  assert prefixes == {
      "image/encoder/block_2", "image/encoder/ln_final", "image/head/proj",
      "text/encoder/block_1", "text/encoder/block_2", "text/head/proj", "log_logit_scale"}
  # The stems stay frozen: patch / token embeddings, CLS, position tables, the pre-LN.
  for path in ("image/patch_embed/kernel", "image/cls", "image/pos_embed/pos_embedding",
               "image/ln_pre/scale", "image/encoder/block_1/attn/qkv/kernel",
               "text/embeddings/word/embedding", "text/encoder/block_0/fc1/kernel"):
    assert frozen(path), path


def test_modes_locked_tuned_and_head_only(params):
  paths = tree_paths(params)
  locked = frozen_filter(TowerLock("image", "locked"), TowerLock("text", "tuned"))
  assert all(locked(p) == p.startswith("image/") for p in paths)
  head_only = frozen_filter(TowerLock("image", "top", depth=3, unlocked_blocks=0))
  assert {p for p in paths if p.startswith("image/") and not head_only(p)} == {
      "image/encoder/ln_final/scale", "image/encoder/ln_final/bias", "image/head/proj/kernel"}
  with pytest.raises(ValueError, match="unlocked_blocks"):
    TowerLock("image", "top", depth=3, unlocked_blocks=4)
  with pytest.raises(ValueError, match="mode"):
    TowerLock("image", "frozen")
  with pytest.raises(ValueError, match="overlap"):
    frozen_filter(TowerLock("image", "locked"), TowerLock("image/encoder", "tuned"))
  with pytest.raises(ValueError, match="depth=2"):
    frozen_filter(TowerLock("image", "top", depth=2, unlocked_blocks=1))(
        "image/encoder/block_2/mlp/fc1/kernel")


def test_frozen_params_get_no_update_and_no_optimizer_state(params):
  frozen = frozen_filter(TowerLock("image", "locked"),
                         TowerLock("text", "top", depth=3, unlocked_blocks=1))
  optim = base_config().optim
  optim.warmup_steps = 0
  tx, _ = make_optimizer(optim, 10, frozen)
  grads = jax.tree.map(lambda p: jnp.ones_like(p), params)

  @jax.jit
  def init_and_update(grads, params):  # one compilation for both
    state = tx.init(params)
    return state, tx.update(grads, state, params)[0]

  state, updates = init_and_update(grads, params)
  n_frozen, n_trained = count_frozen(params, frozen)
  assert n_frozen > 0 and n_trained > 0
  # Adam keeps two moments per trained element and nothing for frozen ones (plus step counters).
  state_elements = sum(int(np.size(x)) for x in jax.tree.leaves(state))
  assert 2 * n_trained <= state_elements < 2 * n_trained + 16
  new = optax.apply_updates(params, updates)
  for path, old, upd, now in zip(tree_paths(params), jax.tree.leaves(params),
                                 jax.tree.leaves(updates), jax.tree.leaves(new)):
    if frozen(path):
      assert not np.any(np.asarray(upd)), path
      np.testing.assert_array_equal(now, old)
    else:
      assert np.any(np.asarray(upd)), path


def test_stop_frozen_gradients_zeroes_frozen_grads(params):
  frozen = frozen_filter(TowerLock("image", "top", depth=3, unlocked_blocks=1))

  def loss(p):
    p = stop_frozen_gradients(p, frozen)
    return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))

  grads = jax.jit(jax.grad(loss))(params)
  for path, g, p in zip(tree_paths(grads), jax.tree.leaves(grads), jax.tree.leaves(params)):
    np.testing.assert_array_equal(g, np.zeros_like(p) if frozen(path) else 2 * np.asarray(p))
