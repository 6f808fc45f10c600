"""multimodal_infonce: missing modalities, pairs with < 2 rows, pair selection, entry checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loss_reference import assert_close, multimodal_reference, random_embeddings
from mmcl import losses


def _batch(n=21, d=16, seed=30):
  audio, cf, text = random_embeddings(seed, n, d, count=3)
  rng = np.random.default_rng(seed)
  valid = {"audio": rng.random(n) > 0.3, "cf": rng.random(n) > 0.3, "text": np.zeros(n, bool)}
  valid["text"][[2, 5]] = True  # text present on only two rows
  valid["audio"][[2, 5]] = True
  valid["cf"][2] = False  # so text∧cf has < 2 rows and contributes nothing
  return {"audio": audio, "cf": cf, "text": text}, valid


def test_matches_reference_that_drops_absent_rows():
  embeddings, valid = _batch()
  assert (valid["text"] & valid["cf"]).sum() < 2 <= (valid["text"] & valid["audio"]).sum()
  s = jnp.float32(10.0)
  ref_value, ref_grads = jax.jit(jax.value_and_grad(
      lambda e, s: multimodal_reference(e, valid, s), argnums=(0, 1)))(embeddings, s)
  jvalid = {k: jnp.asarray(v) for k, v in valid.items()}
  # Tiled here; the dense kernel equals it (test_infonce) and runs in the next test.
  for impl in ("tiled",):
    value, grads = jax.jit(jax.value_and_grad(
        lambda e, s, impl=impl: losses.multimodal_infonce(e, jvalid, logit_scale=s, impl=impl,
                                                          block_size=8),
        argnums=(0, 1)))(embeddings, s)
    assert_close(value, ref_value, what=f"{impl} value")
    for name in embeddings:
      assert_close(grads[0][name], ref_grads[0][name], what=f"{impl} d/d{name}")
    assert_close(grads[1], ref_grads[1], what=f"{impl} d/ds")


def test_pair_losses_selection_and_nothing_present():
  embeddings, valid = _batch()
  jvalid = {k: jnp.asarray(v) for k, v in valid.items()}
  loss, pairs = jax.jit(lambda e, v: losses.multimodal_infonce(
      e, v, logit_scale=10.0, impl="dense", return_pair_losses=True))(embeddings, jvalid)
  assert sorted(pairs) == ["audio:cf", "audio:text", "cf:text"]
  assert not bool(pairs["cf:text"][1]) and bool(pairs["audio:cf"][1])
  assert_close(loss, (pairs["audio:cf"][0] + pairs["audio:text"][0]) / 2, what="mean of pairs")
  both = jvalid["cf"] & jvalid["audio"]
  only, direct = jax.jit(lambda e, v: (
      losses.multimodal_infonce(e, v, logit_scale=10.0, impl="dense", pairs=[("cf", "audio")]),
      losses.infonce(e["cf"], e["audio"], logit_scale=10.0, a_valid=both, b_valid=both,
                     impl="dense")))(embeddings, jvalid)
  assert_close(only, direct, what="one selected pair")
  nothing = {k: jnp.zeros_like(v) for k, v in jvalid.items()}
  assert float(jax.jit(lambda e, v: losses.multimodal_infonce(e, v, logit_scale=10.0))(
      embeddings, nothing)) == 0.0


def test_entry_checks():
  embeddings, valid = _batch()
  jvalid = {k: jnp.asarray(v) for k, v in valid.items()}
  with pytest.raises(ValueError, match="at least 2"):
    losses.multimodal_infonce({"audio": embeddings["audio"]}, None, logit_scale=1.0)
  with pytest.raises(ValueError, match="keys of `embeddings`"):
    losses.multimodal_infonce(embeddings, {"audio": jvalid["audio"]}, logit_scale=1.0)
  with pytest.raises(ValueError, match="same shape"):
    losses.multimodal_infonce({**embeddings, "cf": embeddings["cf"][:, :8]}, None,
                              logit_scale=1.0)
  with pytest.raises(ValueError, match="two different modality names"):
    losses.multimodal_infonce(embeddings, jvalid, logit_scale=1.0, pairs=[("audio", "lyrics")])
  with pytest.raises(ValueError, match=r"valid\['cf'\].*\(21,\)"):
    losses.multimodal_infonce(embeddings, {**jvalid, "cf": jvalid["cf"][:5]}, logit_scale=1.0)
