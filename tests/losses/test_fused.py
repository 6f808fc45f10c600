"""impl="fused" (Pallas kernels, interpret mode on CPU) equals the dense kernel; Triton lowering.

Values and gradients (embeddings, logit_scale, logit_bias) in float32 at rtol 1e-5, for batches that
are and are not multiples of the tile, D that is not a power of two (zero-padded in the kernels),
masks with rows missing on one or both sides, weights, two-column duplicate groups, InfoNCE, SigLIP
and SupCon, a forward pass with several row tiles per program, and under shard_map on 8 CPU devices.
The kernels are also lowered for CUDA with jax.export (no GPU needed): that runs Pallas's Triton
lowering, which rejects non-power-of-two blocks and primitives Triton lacks, and type-checks the
kernels under shard_map with check_vma=True. The GPU numerics are in test_fused_gpu.py.
"""
import functools
import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from loss_reference import assert_close, random_embeddings
from mmcl import losses
from mmcl.losses import common, dense, fused, probe, sharded
from mmcl.losses.common import DIAGONAL, SideMeta

BENCH = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench" / "loss.py"


def _options(n, seed=0):
  """Weights, rows missing on either side (row 3 on both) and 2-column duplicate groups."""
  rng = np.random.default_rng(seed)
  a_valid = rng.random(n) > 0.2
  b_valid = rng.random(n) > 0.2
  a_valid[3] = b_valid[3] = False
  groups = np.stack([rng.integers(0, n // 3, n), rng.integers(-1, n // 2, n)], 1)
  return dict(weights=jnp.asarray(rng.uniform(0.2, 2.0, n).astype(np.float32)),
              a_valid=jnp.asarray(a_valid), b_valid=jnp.asarray(b_valid),
              group_ids=jnp.asarray(groups.astype(np.int32)))


def _value_and_grads(fn, *args):
  return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


def _check_same(got, want, rtol=1e-5, what=""):
  assert_close(got[0], want[0], rtol, f"{what} value")
  for i, (x, y) in enumerate(zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True)):
    assert_close(x, y, rtol, f"{what} grad {i}")


@pytest.mark.parametrize("n,dim,block,with_options", [
    (40, 16, 16, True),   # 40 = 2.5 tiles: padded rows and columns
    (64, 24, 32, False),  # D = 24 padded to 32
])
def test_infonce_fused_equals_dense(n, dim, block, with_options):
  a, b = random_embeddings(n, n, dim)
  s = jnp.float32(12.0)
  opts = _options(n, seed=n) if with_options else {}

  def loss(impl):
    return lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl=impl, block_size=block,
                                          **opts)

  _check_same(_value_and_grads(loss("fused"), a, b, s), _value_and_grads(loss("dense"), a, b, s),
              what=f"infonce B={n} D={dim} tile={block}")


@pytest.mark.parametrize("n,dim,block,with_options", [(40, 16, 16, True), (64, 24, 32, False)])
def test_sigmoid_fused_equals_dense(n, dim, block, with_options):
  a, b = random_embeddings(n + 1, n, dim)
  s, c = jnp.float32(10.0), jnp.float32(-5.0)
  opts = _options(n, seed=n + 1) if with_options else {}

  def loss(impl):
    return lambda a, b, s, c: losses.sigmoid_loss(a, b, logit_scale=s, logit_bias=c, impl=impl,
                                                  block_size=block, **opts)

  _check_same(_value_and_grads(loss("fused"), a, b, s, c),
              _value_and_grads(loss("dense"), a, b, s, c), what=f"sigmoid B={n} D={dim}")


def test_supcon_fused_equals_dense():
  """Label-defined positives, self-exclusion and the positive sums go through the same kernels."""
  n = 48
  (z,) = random_embeddings(7, n, 16, count=1)
  rng = np.random.default_rng(7)
  clip_ids = jnp.asarray(np.arange(n) % (n // 3), jnp.int32)  # 3 views per clip
  exclude = jnp.asarray(rng.random(n) < 0.2)
  valid = jnp.asarray(rng.random(n) > 0.1)

  def loss(impl):
    return lambda z, s: losses.supcon(z, logit_scale=s, clip_ids=clip_ids, exclude=exclude,
                                      valid=valid, impl=impl, block_size=16)

  _check_same(_value_and_grads(loss("fused"), z, jnp.float32(8.0)),
              _value_and_grads(loss("dense"), z, jnp.float32(8.0)), what="supcon")


def test_forward_with_several_row_tiles_per_program():
  """With P = 2 programs for 5 row tiles, each program folds 3 row tiles (the last one empty
  padding) into one column partial; statistics and their VJP equal the dense kernel's."""
  rows_n, cols_n = 80, 56
  a, b = random_embeddings(3, rows_n, 16)
  b = b[:cols_n]
  rng = np.random.default_rng(3)
  rows = SideMeta(index=jnp.arange(rows_n, dtype=jnp.int32),
                  valid=jnp.asarray(rng.random(rows_n) > 0.2))
  cols = SideMeta(index=jnp.arange(cols_n, dtype=jnp.int32),
                  valid=jnp.asarray(rng.random(cols_n) > 0.2))
  plan = fused._make_plan(DIAGONAL, a, b, rows, 16, 2, True)
  assert fused._forward_layout(plan, rows_n) == (2, 3)
  w_rows = jnp.asarray(rng.uniform(size=rows_n), jnp.float32)
  w_cols = jnp.asarray(rng.uniform(size=cols_n), jnp.float32)

  def stats(kernel):
    def fn(a, b, s):
      st = kernel(a, b, s, rows, cols)
      return (jnp.sum(w_rows * common.finite_or_zero(st.row_lse))
              + jnp.sum(w_cols * common.finite_or_zero(st.col_lse)))
    return fn

  got = _value_and_grads(stats(functools.partial(
      fused.softmax_stats, rule=DIAGONAL, want_cols=True, want_pos=False, block_size=16,
      row_programs=2)), a, b, jnp.float32(9.0))
  want = _value_and_grads(stats(functools.partial(
      dense.softmax_stats, rule=DIAGONAL, want_cols=True, want_pos=False)), a, b, jnp.float32(9.0))
  _check_same(got, want, what="P=2 programs")


def test_bfloat16_operands():
  """bf16 operands, f32 accumulation: bf16 gradients within bf16 accuracy of the f32 reference."""
  n = 48
  a, b = random_embeddings(11, n, 32)
  s = jnp.float32(10.0)
  ref = _value_and_grads(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="dense"),
                         a, b, s)
  got = _value_and_grads(
      lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="fused", block_size=16),
      a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), s)
  assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
  _check_same(got, ref, rtol=2e-2, what="bf16 vs f32 reference")


def _mesh():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def test_sharded_on_8_devices_equals_single_device_dense():
  """8 local rows per device (half a 16-row tile), negatives gathered from all devices."""
  mesh = _mesh()
  n = 64
  a, b = random_embeddings(21, n, 16)
  s, c = jnp.float32(12.0), jnp.float32(-4.0)
  opts = _options(n, seed=21)
  got = _value_and_grads(lambda a, b, s: sharded.infonce_over_mesh(
      a, b, mesh, logit_scale=s, impl="fused", block_size=16, **opts), a, b, s)
  want = _value_and_grads(lambda a, b, s: losses.infonce(a, b, logit_scale=s, impl="dense",
                                                         **opts), a, b, s)
  _check_same(got, want, what="sharded infonce")
  got = _value_and_grads(lambda a, b, s, c: sharded.sigmoid_loss_over_mesh(
      a, b, mesh, logit_scale=s, logit_bias=c, impl="fused", block_size=16, **opts), a, b, s, c)
  want = _value_and_grads(lambda a, b, s, c: losses.sigmoid_loss(
      a, b, logit_scale=s, logit_bias=c, impl="dense", **opts), a, b, s, c)
  _check_same(got, want, what="sharded sigmoid")


def test_interpret_mode_refuses_check_vma_with_a_clear_error():
  mesh = _mesh()
  a, b = random_embeddings(22, 16, 16)
  per_device = lambda a, b: losses.infonce(a, b, logit_scale=1.0, impl="fused",  # noqa: E731
                                           axis_name="data")
  with pytest.raises(NotImplementedError, match="check_vma=False"):
    jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P())(a, b)


def _cuda_kernels(fn, *args) -> list[str]:
  """Names of the Triton kernels in `fn`'s StableHLO lowered for CUDA."""
  exported = jax.export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  text = exported.mlir_module()
  assert text.count("custom_call @__gpu$xla.gpu.triton") == len(re.findall(r'name = "mmcl_', text))
  return re.findall(r'name = "(mmcl_\w+)"', text)


def test_kernels_lower_to_triton_for_cuda(monkeypatch):
  """Forward and backward of every loss through Pallas's Triton lowering (compiled, not
  interpreted), bf16, B not a multiple of the tile, D = 1000 (padded to 1024), every option, and
  sharded under shard_map with check_vma=True."""
  monkeypatch.setattr(fused, "default_interpret", lambda: False)
  n, dim = 1000, 1000
  emb = jax.ShapeDtypeStruct((n, dim), jnp.bfloat16)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  opts = _options(n)
  softmax = ["mmcl_softmax_forward", "mmcl_softmax_backward_da", "mmcl_softmax_backward_db"]
  sigmoid = ["mmcl_sigmoid_forward", "mmcl_sigmoid_backward_da", "mmcl_sigmoid_backward_db"]
  grads = lambda f, k: jax.value_and_grad(f, argnums=tuple(range(k)))  # noqa: E731

  assert _cuda_kernels(grads(lambda a, b, s: losses.infonce(
      a, b, logit_scale=s, impl="fused", **opts), 3), emb, emb, scalar) == softmax
  assert _cuda_kernels(grads(lambda a, b, s, c: losses.sigmoid_loss(
      a, b, logit_scale=s, logit_bias=c, impl="fused", **opts), 4),
      emb, emb, scalar, scalar) == sigmoid
  clip_ids = jnp.arange(n, dtype=jnp.int32) // 2
  assert _cuda_kernels(grads(lambda z, s: losses.supcon(
      z, logit_scale=s, clip_ids=clip_ids, exclude=opts["a_valid"], impl="fused"), 2),
      emb, scalar) == softmax
  mesh = _mesh()
  sharded_emb = jax.ShapeDtypeStruct((64, 24), jnp.float32)
  assert _cuda_kernels(grads(lambda a, b, s: sharded.infonce_over_mesh(
      a, b, mesh, logit_scale=s, impl="fused", **_options(64)), 3),
      sharded_emb, sharded_emb, scalar) == softmax


def test_impl_choice_and_tile_checks(monkeypatch):
  assert common.resolve_impl("fused", 8, 8, "t") == "fused"
  assert common.resolve_impl("auto", 4096, 4097, "t") == "tiled"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  # On a GPU "auto" picks the fused kernels once their one-time check passed (probe.py; its failing
  # and disagreeing cases are tested in tests/reliability/test_nonfinite.py).
  monkeypatch.setattr(probe, "fused_usable", lambda: True)
  assert common.resolve_impl("auto", 4096, 4097, "t") == "fused"
  monkeypatch.setattr(probe, "fused_usable", lambda: False)
  assert common.resolve_impl("auto", 4096, 4097, "t") == "tiled"
  assert common.resolve_impl("auto", 4096, 4096, "t") == "dense"
  monkeypatch.undo()
  a, b = random_embeddings(23, 8, 16)
  for bad in (24, 8, 0):
    with pytest.raises(ValueError, match="power of two"):
      losses.infonce(a, b, logit_scale=1.0, impl="fused", block_size=bad)
  assert fused.default_tile(200) == 64 and fused.default_tile(1024) == 32


def test_bench_script_accepts_impl_fused():
  if not BENCH.is_file():
    pytest.skip(f"{BENCH} not found")
  spec = importlib.util.spec_from_file_location("bench_loss_fused", BENCH)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rows = bench.main(["--batch", "40", "--dim", "8", "--loss", "infonce", "--impl", "fused",
                     "--block-size", "16", "--repeats", "1", "--warmup", "0",
                     "--matmul-size", "64"])
  assert [(r["impl"], r["batch"], r["status"]) for r in rows] == [("fused", 40, "ok")]
  assert rows[0]["useful_tflops"] == pytest.approx(6 * 40**2 * 8 / (rows[0]["ms"] * 1e-3) / 1e12,
                                                   rel=0.02, abs=1e-5)
