"""supcon: literal reference (with LOEV exclusions), dense = tiled, edge cases, entry checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loss_reference import assert_close, random_embeddings, supcon_reference
from mmcl import losses


def _value_and_grads(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


def _views(n_clips, n_views, d, seed):
  """Views of n_clips clips ordered view-major (as a [V, B] batch flattened), unit rows."""
  (z,) = random_embeddings(seed, n_clips * n_views, d, count=1)
  clip_ids = jnp.tile(jnp.arange(n_clips, dtype=jnp.int32), n_views)
  return z, clip_ids


def test_dense_and_tiled_match_literal_reference():
  z, clip_ids = _views(19, 2, 16, seed=20)  # N = 38, not a multiple of the tile
  rng = np.random.default_rng(2)
  exclude = rng.random(38) < 0.5  # "augmentation k was applied" on about half the views
  valid = rng.random(38) > 0.1
  s = jnp.float32(10.0)
  ref = _value_and_grads(
      lambda z, s: supcon_reference(z, s, np.asarray(clip_ids), exclude, valid), z, s)
  for impl in ("dense", "tiled"):
    got = _value_and_grads(
        lambda z, s, impl=impl: losses.supcon(z, logit_scale=s, clip_ids=clip_ids,
                                              exclude=jnp.asarray(exclude),
                                              valid=jnp.asarray(valid), impl=impl, block_size=8),
        z, s)
    assert_close(got[0], ref[0], what=f"{impl} value")
    assert_close(got[1][0], ref[1][0], what=f"{impl} d/dz")
    assert_close(got[1][1], ref[1][1], what=f"{impl} d/ds")


def test_tiled_equals_dense_three_views():
  z, clip_ids = _views(43, 3, 24, seed=21)  # N = 129
  s = jnp.float32(14.0)

  def loss(impl):
    return lambda z, s: losses.supcon(z, logit_scale=s, clip_ids=clip_ids, impl=impl,
                                      block_size=32)

  got, want = _value_and_grads(loss("tiled"), z, s), _value_and_grads(loss("dense"), z, s)
  assert_close(got[0], want[0], what="value")
  assert_close(got[1][0], want[1][0], what="d/dz")
  assert_close(got[1][1], want[1][1], what="d/ds")


def test_two_views_without_exclusions_is_nt_xent():
  """With 2 views and nothing excluded SupCon is SimCLR's NT-Xent: the mean over all 2B anchors of
  −log softmax over the other 2B − 1 views at the anchor's other view."""
  z, clip_ids = _views(10, 2, 16, seed=22)
  s = 5.0
  sim = s * (z @ z.T)
  sim = jnp.where(jnp.eye(20, dtype=bool), -jnp.inf, sim)
  partner = (jnp.arange(20) + 10) % 20
  nt_xent = -jnp.mean(jax.nn.log_softmax(sim, axis=1)[jnp.arange(20), partner])
  got = jax.jit(lambda z: losses.supcon(z, logit_scale=s, clip_ids=clip_ids, impl="tiled",
                                        block_size=8))(z)
  assert_close(got, nt_xent, what="NT-Xent")


def test_everything_excluded_gives_zero():
  z, clip_ids = _views(4, 2, 16, seed=23)
  value, (gz, gs) = _value_and_grads(
      lambda z, s: losses.supcon(z, logit_scale=s, clip_ids=clip_ids,
                                 exclude=jnp.ones((8,), bool), impl="tiled", block_size=3),
      z, jnp.float32(10.0))
  assert float(value) == 0.0
  assert np.all(np.asarray(gz) == 0) and float(gs) == 0.0


def test_entry_checks():
  z, clip_ids = _views(4, 2, 16, seed=24)
  with pytest.raises(TypeError, match="clip_ids.*integer"):
    losses.supcon(z, logit_scale=1.0, clip_ids=clip_ids.astype(jnp.float32))
  with pytest.raises(ValueError, match=r"clip_ids.*\(8,\)"):
    losses.supcon(z, logit_scale=1.0, clip_ids=clip_ids[:4])
  with pytest.raises(TypeError, match="exclude.*bool"):
    losses.supcon(z, logit_scale=1.0, clip_ids=clip_ids, exclude=jnp.zeros((8,)))
  with pytest.raises(ValueError, match=r"`z` must be \[B, D\]"):
    losses.supcon(z[None], logit_scale=1.0, clip_ids=clip_ids)
