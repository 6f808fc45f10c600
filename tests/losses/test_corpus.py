"""corpus_softmax: dense and tiled kernels, on one device and with the corpus split over 8 devices,
equal a literal per-query reference in value, gradients (queries, corpus, logit scale) and ranks.

The corpus has 37 rows (not a multiple of the chunk 4 nor of the 8 devices), some rows are not
candidates, some queries are invalid, one query's target is not a candidate (so it must not count).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from loss_reference import assert_close, random_embeddings
from mmcl import losses
from mmcl.losses import sharded

B, N, D = 11, 37, 8


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  q, = random_embeddings(seed, B, D, count=1)
  c, = random_embeddings(seed + 1, N, D, count=1)
  corpus_valid = rng.random(N) > 0.25
  corpus_valid[0] = False  # padding row
  targets = rng.choice(np.flatnonzero(corpus_valid), B)
  targets[3] = 0  # a target that is not a candidate: the query is left out
  valid = rng.random(B) > 0.2
  valid[3] = True
  weights = rng.uniform(0.5, 2.0, B).astype(np.float32)
  return q, c, jnp.asarray(targets, jnp.int32), dict(
      valid=jnp.asarray(valid), corpus_valid=jnp.asarray(corpus_valid),
      weights=jnp.asarray(weights))


def _reference(q, c, s, targets, valid, corpus_valid, weights):
  """Σ_{i∈V} w_i (log Σ_{j∈A} e^{z_ij} − z_{i,t_i}) / Σ_{i∈V} w_i, one query at a time."""
  cv, t = np.asarray(corpus_valid), np.asarray(targets)
  use = [i for i in range(B) if valid[i] and cv[t[i]]]
  allowed = np.flatnonzero(cv)
  terms = []
  for i in use:
    z = s * (c[allowed] @ q[i])
    terms.append(weights[i] * (jax.nn.logsumexp(z) - s * jnp.dot(q[i], c[t[i]])))
  return sum(terms) / np.sum(np.asarray(weights)[use])


def _reference_ranks(q, c, s, targets, corpus_valid):
  z = float(s) * np.asarray(q, np.float64) @ np.asarray(c, np.float64).T
  t = np.asarray(targets)
  above = (z > z[np.arange(B), t][:, None]) & np.asarray(corpus_valid)[None, :]
  above[np.arange(B), t] = False
  return above.sum(1)


def _value_and_grads(fn, q, c, s):
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(q, c, s)


def _check(got, want, what):
  assert_close(got[0], want[0], what=f"{what} value")
  for name, x, y in zip(("queries", "corpus", "scale"), got[1], want[1], strict=True):
    assert_close(x, y, rtol=2e-5, what=f"{what} grad {name}")


@pytest.fixture(scope="module")
def reference():
  q, c, targets, opts = _problem()
  s = jnp.float32(10.0)
  host = {k: np.asarray(v) for k, v in opts.items()}  # the reference's loops run on the host
  want = _value_and_grads(lambda q, c, s: _reference(q, c, s, np.asarray(targets), **host),
                          q, c, s)
  return q, c, s, targets, opts, want


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_one_device_matches_reference(reference, impl):
  q, c, s, targets, opts, want = reference
  got = _value_and_grads(lambda q, c, s: losses.corpus_softmax(
      q, c, targets, logit_scale=s, impl=impl, block_size=4, **opts), q, c, s)
  _check(got, want, impl)
  _, ranks = jax.jit(lambda: losses.corpus_softmax(q, c, targets, logit_scale=s, impl=impl,
                                                   block_size=4, return_ranks=True, **opts))()
  np.testing.assert_array_equal(ranks, _reference_ranks(q, c, s, targets, opts["corpus_valid"]))


@pytest.mark.parametrize("impl", ["dense", "tiled"])
def test_corpus_split_over_8_devices_matches_reference(reference, impl):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  q, c, s, targets, opts, want = reference
  got = _value_and_grads(lambda q, c, s: sharded.corpus_softmax_over_mesh(
      q, c, targets, mesh, logit_scale=s, impl=impl, block_size=3, **opts), q, c, s)
  _check(got, want, f"8 devices {impl}")
  _, ranks = jax.jit(lambda: sharded.corpus_softmax_over_mesh(
      q, c, targets, mesh, logit_scale=s, impl=impl, block_size=3, return_ranks=True, **opts))()
  np.testing.assert_array_equal(ranks, _reference_ranks(q, c, s, targets, opts["corpus_valid"]))


def test_nothing_valid_is_zero_with_zero_gradients_and_bad_inputs_are_named():
  q, c, targets, opts = _problem(1)
  opts["valid"] = jnp.zeros((B,), bool)
  loss, grads = _value_and_grads(lambda q, c, s: losses.corpus_softmax(
      q, c, targets, logit_scale=s, impl="tiled", block_size=4, **opts), q, c, jnp.float32(5.0))
  assert float(loss) == 0.0 and all(not np.any(g) for g in grads)
  with pytest.raises(ValueError, match="targets"):
    losses.corpus_softmax(q, c, targets[:3], logit_scale=1.0)
  with pytest.raises(ValueError, match="impl"):
    losses.corpus_softmax(q, c, targets, logit_scale=1.0, impl="fused")
