"""MLP projector: maps a feature vector (e.g. a precomputed artist or audio feature) to the shared
embedding space.

x [B, d_in] → (Dense(h) → [LayerNorm] → activation → Dropout) for each h in hidden_dims
            → Dense(out_dim) → [LayerNorm] → [B, out_dim] float32.

Example, the artist projector d_m → 512 → D with ReLU, dropout 0.3 and an output LayerNorm:
  MLP(hidden_dims=(512,), out_dim=D, activation="relu", dropout=0.3, layer_norm="output")
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcl.models.layers import KERNEL_INIT, Dtype, check_array, check_choice, mlp_activation
from mmcl.models.registry import register_model

LAYER_NORMS = ("none", "hidden", "output", "both")


@register_model("mlp")
class MLP(nn.Module):
  """Multi-layer perceptron projector.

  Attributes:
    hidden_dims: widths of the hidden layers, in order (empty → a single linear layer).
    out_dim: output width.
    activation: one of `mmcl.models.layers.MLP_ACTIVATIONS`, applied after every hidden layer
      (never after the last).
    dropout: dropout rate after every hidden activation (train only).
    layer_norm: "none"; "hidden" (LayerNorm on each hidden layer, before its activation);
      "output" (LayerNorm on the output); or "both".
    use_bias: biases in the Dense layers.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  hidden_dims: Sequence[int] = (512,)
  out_dim: int = 512
  activation: str = "relu"
  dropout: float = 0.0
  layer_norm: str = "none"
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """x: [B, d_in] float → [B, out_dim] float32 (extra leading dims are kept: [..., d_in])."""
    if x.ndim < 2:
      raise ValueError(f"MLP: expected `x` with shape [B, d_in], found shape {tuple(x.shape)}.")
    check_array(x, where="MLP", name="x", ndim=x.ndim, kind="float")
    check_choice(self.layer_norm, LAYER_NORMS, where="MLP", name="layer_norm")
    act = mlp_activation(self.activation, where="MLP")
    dense = lambda n, name: nn.Dense(  # noqa: E731
        n, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=KERNEL_INIT, name=name)
    norm = lambda name: nn.LayerNorm(  # noqa: E731
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    h = x
    for i, width in enumerate(self.hidden_dims):
      h = dense(width, f"hidden_{i}")(h)
      if self.layer_norm in ("hidden", "both"):
        h = norm(f"ln_hidden_{i}")(h)
      h = act(h)
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = dense(self.out_dim, "out")(h)
    if self.layer_norm in ("output", "both"):
      h = norm("ln_out")(h)
    return h.astype(jnp.float32)
