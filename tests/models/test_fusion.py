"""MMSRec fusion encoder: missing modalities, masking, item tower as length-1 sequences."""
import jax
import jax.numpy as jnp
import numpy as np

from mmcl.models.fusion import FusionEncoder, fusion_flops


def _setup():
  enc = FusionEncoder(num_modalities=2, width=16, depth=1, num_heads=2, mlp_dim=32, max_len=5,
                      dropout=0.0)
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  feats = (jax.random.normal(k[0], (2, 5, 6)), jax.random.normal(k[1], (2, 5, 4)))
  avail = jnp.ones((2, 5, 2), bool).at[0, :2].set(False)
  params = jax.jit(enc.init)(jax.random.PRNGKey(1), feats, avail, jnp.zeros((2, 5), bool))
  # One compiled program per input signature (eager dispatch compiles every operation apart).
  return jax.jit(enc.apply), params, feats, avail


def test_missing_modality_values_are_ignored():
  apply, params, feats, avail = _setup()
  avail = avail.at[1, 3, 1].set(False)  # position 3 of row 1 lacks modality 1
  y = apply(params, feats, avail)
  garbage = (feats[0], feats[1].at[1, 3].set(1e3).at[0, :2].set(-1e3))
  y2 = apply(params, garbage, avail)
  np.testing.assert_allclose(y, y2, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(y[0, :2]), 0.0)  # padding positions
  assert np.isfinite(np.asarray(y)).all()


def test_masked_position_hides_its_content():
  apply, params, feats, avail = _setup()
  masked = jnp.zeros((2, 5), bool).at[:, 4].set(True)
  y = apply(params, feats, avail, masked)
  changed = (feats[0].at[:, 4].set(5.0), feats[1].at[:, 4].set(-5.0))
  np.testing.assert_allclose(y[:, 4], apply(params, changed, avail, masked)[:, 4], atol=1e-5)
  # Without the mask, the content matters.
  assert np.abs(np.asarray(apply(params, feats, avail)[:, 4]
                           - apply(params, changed, avail)[:, 4])).max() > 1e-3


def test_bidirectional_context_and_flops():
  apply, params, feats, avail = _setup()
  changed = (feats[0].at[1, 4].set(3.0), feats[1])
  assert np.abs(np.asarray(apply(params, feats, avail)[1, 0]
                           - apply(params, changed, avail)[1, 0])).max() > 1e-4
  assert fusion_flops(5, 2, 16, 2, 32, (6, 4)) > fusion_flops(5, 2, 16, 1, 32, (6, 4)) > 0
