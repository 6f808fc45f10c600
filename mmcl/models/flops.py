"""Analytic forward-pass FLOPs per example, for MFU and throughput reports.

Only matrix multiplications are counted, at 2 FLOPs per multiply-accumulate (the convention of
PaLM's MFU, Chowdhery et al. 2022, App. B); elementwise work (LayerNorm, GELU, softmax, residual
adds) is a few percent for realistic widths and is left out. Attention is counted in full (QK^T
and AV over all L×L pairs): XLA computes the masked and causal entries too. A training step costs
about 3× the forward FLOPs (backward = 2× forward), plus one more forward per remat'ed block.
"""
from __future__ import annotations

from collections.abc import Sequence

from mmcl.models.mlp import MLP
from mmcl.models.text_transformer import TextTransformer
from mmcl.models.vit import ViT, num_patches


def dense_flops(tokens: int, d_in: int, d_out: int) -> int:
  """FLOPs of `tokens` vectors through a d_in → d_out linear map: 2·tokens·d_in·d_out."""
  return 2 * tokens * d_in * d_out


def encoder_flops(seq_len: int, width: int, depth: int, mlp_dim: int) -> int:
  """Forward FLOPs of `depth` Transformer blocks over one sequence of `seq_len` tokens.

  Per block, with L = seq_len, W = width, M = mlp_dim:
    QKV projections 2·L·W·3W, scores QK^T 2·L·L·W, weighted values AV 2·L·L·W,
    output projection 2·L·W·W, MLP 2·L·W·M·2.
  """
  n, w = seq_len, width
  per_block = (dense_flops(n, w, 3 * w) + 2 * (2 * n * n * w) + dense_flops(n, w, w)
               + dense_flops(n, w, mlp_dim) + dense_flops(n, mlp_dim, w))
  return depth * per_block


def vit_flops(model: ViT, image_shape: Sequence[int]) -> int:
  """Forward FLOPs of `model` for one image of shape (H, W, C)."""
  if len(image_shape) != 3:
    raise ValueError(f"vit_flops: expected image_shape (H, W, C), found {tuple(image_shape)}.")
  h, w, c = image_shape
  n = num_patches((h, w), model.patch_size)
  tokens = n + (1 if model.pool == "cls" else 0)
  patch_embed = dense_flops(n, model.patch_size * model.patch_size * c, model.width)
  return (patch_embed + encoder_flops(tokens, model.width, model.depth, model.mlp_dim)
          + dense_flops(1, model.width, model.embed_dim))


def text_transformer_flops(model: TextTransformer, seq_len: int) -> int:
  """Forward FLOPs of `model` for one sequence of `seq_len` ids (padding included: it is computed).

  The token embedding is a gather and costs no matmul FLOPs.
  """
  return (encoder_flops(seq_len, model.width, model.depth, model.mlp_dim)
          + dense_flops(1, model.width, model.embed_dim))


def mlp_flops(model: MLP, in_dim: int) -> int:
  """Forward FLOPs of `model` for one input vector of width `in_dim`."""
  dims = [in_dim, *model.hidden_dims, model.out_dim]
  return sum(dense_flops(1, a, b) for a, b in zip(dims[:-1], dims[1:]))


def forward_flops(model: ViT | TextTransformer | MLP, example_shape: Sequence[int]) -> int:
  """Forward FLOPs per example for any tower; `example_shape` is one example's input shape.

  ViT: (H, W, C); TextTransformer: (L,); MLP: (d_in,).
  """
  if isinstance(model, ViT):
    return vit_flops(model, example_shape)
  if isinstance(model, TextTransformer):
    if len(example_shape) != 1:
      raise ValueError(f"forward_flops: TextTransformer takes (L,), found {tuple(example_shape)}.")
    return text_transformer_flops(model, example_shape[0])
  if isinstance(model, MLP):
    if len(example_shape) != 1:
      raise ValueError(f"forward_flops: MLP takes (d_in,), found {tuple(example_shape)}.")
    return mlp_flops(model, example_shape[0])
  raise TypeError(f"forward_flops: no FLOPs formula for {type(model).__qualname__}.")
