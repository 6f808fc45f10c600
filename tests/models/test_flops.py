"""The analytic FLOPs formulas agree with XLA's cost analysis."""
import jax
import jax.numpy as jnp
import pytest

from mmcl.models import flops
from mmcl.models.mlp import MLP
from mmcl.models.text_transformer import TextTransformer
from mmcl.models.vit import ViT

# Width 256 keeps the uncounted elementwise work (GELU, LayerNorm, softmax) at ~5% of the total.
WIDE = dict(width=256, depth=1, num_heads=4, mlp_dim=1024, embed_dim=128)


def _xla_flops(model, example):
  abstract = jax.eval_shape(model.init, jax.random.key(0), example)
  cost = jax.jit(model.apply).lower(abstract, example).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per device program
    cost = cost[0]
  return cost["flops"]


@pytest.mark.parametrize("model,example", [
    (ViT(patch_size=8, pool="cls", **WIDE), jnp.zeros((1, 32, 32, 3))),
    (ViT(patch_size=8, pool="gap", **WIDE), jnp.zeros((1, 32, 32, 3))),
    (TextTransformer(vocab_size=64, max_len=32, **WIDE), jnp.ones((1, 32), jnp.int32)),
    (MLP(hidden_dims=(512,), out_dim=256), jnp.zeros((1, 512))),
])
def test_analytic_flops_match_xla(model, example):
  analytic = flops.forward_flops(model, example.shape[1:])
  measured = _xla_flops(model, example)
  # XLA also counts elementwise ops, so it sits slightly above the matmul-only count.
  assert analytic <= measured * 1.001
  assert measured <= 1.10 * analytic, (analytic, measured)


def test_vit_b16_matches_published_count():
  vit = ViT(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, embed_dim=512)
  # ViT-B/16 at 224²: 17.6 G multiply-accumulates (the "GFLOPs" timm and fvcore quote),
  # i.e. 35.1 GFLOPs.
  assert 35.0e9 < flops.forward_flops(vit, (224, 224, 3)) < 35.3e9
  with pytest.raises(TypeError, match="no FLOPs formula"):
    flops.forward_flops(object(), (3,))
