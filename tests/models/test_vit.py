"""Tests for the ViT image tower."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.models.vit import ViT

B, H, C = 2, 16, 3
N = (H // 4) ** 2  # patch tokens
TINY = dict(patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, embed_dim=24)


def _images(seed=0):
  return jax.random.uniform(jax.random.key(seed), (B, H, H, C), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(dtype, make_params):
  model = ViT(**TINY, dtype=dtype)
  params = make_params(model, _images())
  # make_params mirrors jax.eval_shape(model.init): float32 parameters even for bf16 compute.
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert params["params"]["pos_embed"]["pos_embedding"].shape == (N + 1, 32)
  assert params["params"]["patch_embed"]["kernel"].shape == (4, 4, C, 32)
  out = model.apply(params, _images())
  assert out.shape == (B, 24) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  if dtype == jnp.bfloat16:
    ref = ViT(**TINY).apply(params, _images())
    np.testing.assert_allclose(out, ref, atol=0.1, rtol=0.1)


def test_deterministic_init_and_apply():
  # depth 1: compiling the random initialisers is the slow part of this test on CPU.
  model = ViT(**{**TINY, "depth": 1})
  init = jax.jit(model.init)
  p1 = init(jax.random.key(0), _images())
  jax.tree.map(np.testing.assert_array_equal, p1, init(jax.random.key(0), _images()))
  p3 = init(jax.random.key(1), _images())
  assert not np.allclose(p1["params"]["head"]["proj"]["kernel"],
                         p3["params"]["head"]["proj"]["kernel"])
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(p1, _images()), apply(p1, _images()))
  # Different images give different embeddings.
  assert np.abs(np.asarray(apply(p1, _images()) - apply(p1, _images(5)))).max() > 1e-3


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_pooling_reads_the_right_tokens(pool, make_params):
  model = ViT(**TINY, pool=pool)
  params = make_params(model, _images())
  out, state = model.apply(params, _images(), capture_intermediates=True,
                           mutable=("intermediates",))
  tokens = state["intermediates"]["encoder"]["__call__"][0]  # [B, N(+1), W] after final LN
  kernel = params["params"]["head"]["proj"]["kernel"]
  if pool == "cls":
    assert tokens.shape == (B, N + 1, 32) and "cls" in params["params"]
    expected = tokens[:, 0] @ kernel
  else:
    assert tokens.shape == (B, N, 32) and "cls" not in params["params"]
    expected = tokens.mean(axis=1) @ kernel
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_dropout_only_in_train_mode(make_params):
  model = ViT(**TINY, dropout=0.3)
  params = make_params(model, _images())
  apply = model.apply
  np.testing.assert_array_equal(apply(params, _images()), ViT(**TINY).apply(params, _images()))
  a = apply(params, _images(), train=True, rngs={"dropout": jax.random.key(1)})
  b = apply(params, _images(), train=True, rngs={"dropout": jax.random.key(2)})
  assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_bad_inputs_raise_clear_errors():
  model = ViT(**TINY)
  init = lambda m, x: jax.eval_shape(m.init, jax.random.key(0), x)  # noqa: E731
  with pytest.raises(ValueError, match="not divisible by patch_size=4"):
    init(model, jnp.zeros((1, 18, 16, 3)))
  with pytest.raises(ValueError, match="expected `images` with 4 dims"):
    init(model, jnp.zeros((16, 16, 3)))
  with pytest.raises(TypeError, match="float dtype, found int32"):
    init(model, jnp.zeros((1, 16, 16, 3), jnp.int32))
  with pytest.raises(TypeError, match="uint8 images but no pixel_mean"):
    init(model, jnp.zeros((1, 16, 16, 3), jnp.uint8))
  with pytest.raises(ValueError, match="`pool` must be one of"):
    init(ViT(**TINY, pool="max"), _images())


def test_uint8_pixels_are_normalised_in_the_tower_as_the_host_did(make_params):
  from data_pipelines import image_ops, image_text  # the host normalisations batches used to get
  from mmcl.models.layers import normalize_pixels
  every = np.arange(256, dtype=np.uint8)[:, None].repeat(3, 1)  # [256, 3]: every pixel value
  for mean, std, host in ((image_ops.CLIP_MEAN, image_ops.CLIP_STD, image_ops.normalize),
                          (image_text.IMAGE_MEAN, image_text.IMAGE_STD,
                           image_text.normalize_images)):
    device = np.asarray(jax.jit(lambda x: normalize_pixels(x, mean, std))(every))
    ref = host(every[None])[0]
    assert device.dtype == np.float32
    # Equal within float32 rounding: XLA may fuse pixel * scale - shift into one multiply-add,
    # which skips one rounding of the product, so allow one unit in the last place of the
    # larger operand (the result itself can be near 0 after the subtraction).
    scale = np.asarray([1 / (255 * s) for s in std], np.float32)
    shift = np.asarray([m / s for m, s in zip(mean, std)], np.float32)
    ulp = np.spacing(np.maximum(np.abs(every * scale), np.abs(shift)))
    assert (np.abs(device - ref) <= ulp).all(), np.abs(device - ref).max()
    exact = (every / 255.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(device, exact, rtol=0, atol=2e-6)
  model = ViT(**{**TINY, "depth": 1}, pixel_mean=image_ops.CLIP_MEAN, pixel_std=image_ops.CLIP_STD)
  pixels = np.asarray(jax.random.randint(jax.random.key(3), (B, H, H, C), 0, 256), np.uint8)
  params = make_params(model, _images())
  on_device = model.apply(params, jnp.asarray(pixels))
  on_host = model.apply(params, jnp.asarray(image_ops.normalize(pixels)))
  np.testing.assert_allclose(on_device, on_host, rtol=1e-5, atol=1e-6)
  with pytest.raises(TypeError, match="no pixel_mean/pixel_std"):
    ViT(**{**TINY, "depth": 1}).apply(params, jnp.asarray(pixels))
