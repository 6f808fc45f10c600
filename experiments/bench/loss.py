"""Benchmark of the contrastive losses: forward + backward time, useful TFLOP/s, memory.

  .venv/bin/python experiments/bench/loss.py --dim 256 --dtype float32 --batch 1024 2048 4096
  .venv/bin/python experiments/bench/loss.py --dim 512 --dtype bfloat16 \
      --batch 16384 65536 262144 1048576 --impl tiled          # on a GPU, unchanged
  .venv/bin/python experiments/bench/loss.py --dim 512 --dtype bfloat16 --loss infonce \
      --batch 65536 262144 1048576 4194304 --impl fused tiled  # the Pallas kernels (GPU)

For every loss × impl × batch size it jits value_and_grad with respect to the embeddings and the
logit scale (and bias), then reports

  - the median time of --repeats runs after --warmup runs,
  - useful TFLOP/s = 6 · B² · D / t per logit matrix (2 B²D for the logits, 4 B²D for the two
    gradient products; the tiled kernel's recomputation is not counted as useful), times the
    number of modality pairs for multimodal_infonce,
  - its share of the bf16/f32 matmul peak measured in the same run ([M, M] @ [M, M] in --dtype),
  - the compiled peak memory (XLA's memory analysis: arguments + outputs + temporaries) and, where
    the backend reports it, the device's runtime high-water mark (monotone over the run).

A configuration that runs out of memory is reported as OOM and the run goes on. With --sharded the
losses run over all local devices through mmcl.losses.sharded (the batch is global). Output: a
Markdown table on stdout, and the rows as JSON with --json PATH.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.parallel import mesh as mesh_lib
from mmcl import losses
from mmcl.losses import sharded

LOSSES = ("infonce", "sigmoid_loss", "supcon", "multimodal_infonce")
# "fused" (Pallas) runs in interpret mode off a GPU: correct but far too slow to time there, so it
# is in the default list only on a GPU.
IMPLS = ("dense", "tiled", "fused")
MODALITIES = ("audio", "cf", "text")


def _parse(argv: list[str] | None) -> argparse.Namespace:
  cpu = jax.default_backend() == "cpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dim", type=int, default=256, help="embedding dimension D")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--batch", type=int, nargs="+",
                 default=[1024, 2048, 4096] if cpu else [16384, 65536, 262144],
                 help="global batch sizes B")
  p.add_argument("--loss", nargs="+", default=list(LOSSES), choices=LOSSES)
  p.add_argument("--impl", nargs="+", default=["dense", "tiled"] if cpu else list(IMPLS),
                 choices=IMPLS)
  p.add_argument("--block-size", type=int, default=None,
                 help="tile edge (default: per backend for tiled, per D for fused)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--matmul-size", type=int, default=2048 if cpu else 8192,
                 help="M for the [M, M] @ [M, M] matmul peak")
  p.add_argument("--sharded", action="store_true",
                 help="run over all local devices with mmcl.losses.sharded")
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  return p.parse_args(argv)


def _time(fn: Callable[[], object], repeats: int, warmup: int, best: bool = False) -> float:
  """Median (or, with `best`, minimum) wall time of fn() in seconds, waiting for the device."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times) if best else statistics.median(times)


def matmul_peak(size: int, dtype, repeats: int, warmup: int) -> float:
  """TFLOP/s of an [M, M] @ [M, M] matmul in `dtype` (accumulating in float32), from its fastest
  run (a peak: what the device can do when nothing else competes)."""
  ka, kb = jax.random.split(jax.random.key(0))
  x = jax.random.normal(ka, (size, size), dtype)
  y = jax.random.normal(kb, (size, size), dtype)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  t = _time(lambda: f(x, y), max(repeats, 10), warmup, best=True)
  return 2 * size**3 / t / 1e12


def _problem(loss: str, impl: str, b: int, d: int, dtype, block_size, mesh):
  """(loss function of differentiable args, the args, useful flops)."""
  keys = jax.random.split(jax.random.key(b), 4)

  def unit(k):
    x = jax.random.normal(k, (b, d), jnp.float32)
    return (x / jnp.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)

  scale = jnp.float32(10.0)
  kw = dict(impl=impl, block_size=block_size)
  flops = 6 * b * b * d
  if loss == "infonce":
    args = (unit(keys[0]), unit(keys[1]), scale)
    if mesh is None:
      fn = lambda a, bb, s: losses.infonce(a, bb, logit_scale=s, **kw)  # noqa: E731
    else:
      fn = lambda a, bb, s: sharded.infonce_over_mesh(a, bb, mesh, logit_scale=s, **kw)  # noqa
  elif loss == "sigmoid_loss":
    args = (unit(keys[0]), unit(keys[1]), scale, jnp.float32(-10.0))
    if mesh is None:
      fn = lambda a, bb, s, c: losses.sigmoid_loss(a, bb, logit_scale=s, logit_bias=c, **kw)  # noqa
    else:
      fn = lambda a, bb, s, c: sharded.sigmoid_loss_over_mesh(  # noqa: E731
          a, bb, mesh, logit_scale=s, logit_bias=c, **kw)
  elif loss == "supcon":
    # B views of B/2 clips (2 views each).
    clip_ids = jnp.arange(b, dtype=jnp.int32) % (b // 2)
    args = (unit(keys[0]), scale)
    if mesh is None:
      fn = lambda z, s: losses.supcon(z, logit_scale=s, clip_ids=clip_ids, **kw)  # noqa: E731
    else:
      fn = lambda z, s: sharded.supcon_over_mesh(z, mesh, logit_scale=s, clip_ids=clip_ids,  # noqa
                                                 **kw)
  else:
    embeddings = {m: unit(k) for m, k in zip(MODALITIES, keys[:3], strict=True)}
    rng = np.random.default_rng(0)
    valid = {m: jnp.asarray(rng.random(b) > 0.2) for m in MODALITIES}
    args = (embeddings, scale)
    flops *= len(MODALITIES) * (len(MODALITIES) - 1) // 2
    if mesh is None:
      fn = lambda e, s: losses.multimodal_infonce(e, valid, logit_scale=s, **kw)  # noqa: E731
    else:
      fn = lambda e, s: sharded.multimodal_infonce_over_mesh(e, valid, mesh, logit_scale=s,  # noqa
                                                             **kw)
  return fn, args, flops


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _runtime_peak() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def bench_one(loss, impl, b, args, dtype, peak_tflops, mesh) -> dict:
  row = dict(loss=loss, impl=impl, batch=b, dim=args.dim, dtype=args.dtype)
  fn, fn_args, flops = _problem(loss, impl, b, args.dim, dtype, args.block_size, mesh)
  step = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(fn_args)))))
  try:
    start = time.perf_counter()
    compiled = step.lower(*fn_args).compile()
    row["compile_s"] = round(time.perf_counter() - start, 2)
    mem = compiled.memory_analysis()
    if mem is not None:
      row["compiled_peak_bytes"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                    + mem.output_size_in_bytes)
      row["compiled_peak_MiB"] = round(row["compiled_peak_bytes"] / 2**20, 1)
    t = _time(lambda: compiled(*fn_args), args.repeats, args.warmup)
  except Exception as e:  # noqa: BLE001 (an OOM is a result, anything else is re-raised)
    if not _is_oom(e):
      raise
    row["status"] = "OOM"
    return row
  row.update(status="ok", ms=round(t * 1e3, 4), useful_tflops=round(flops / t / 1e12, 5))
  row["pct_of_matmul_peak"] = round(100 * flops / t / 1e12 / peak_tflops, 1)
  peak = _runtime_peak()
  if peak is not None:
    row["runtime_high_water_MiB"] = round(peak / 2**20, 1)
  return row


def _device_line() -> str:
  return mesh_lib.describe_devices()


def main(argv: list[str] | None = None) -> list[dict]:
  args = _parse(argv)
  dtype = jnp.dtype(args.dtype)
  mesh = None
  if args.sharded:
    mesh = jax.make_mesh((len(jax.devices()),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
  peak = matmul_peak(args.matmul_size, dtype, args.repeats, args.warmup)
  where = f"sharded over {len(jax.devices())} devices" if mesh is not None else "one device"
  print(f"# device: {_device_line()} ({where}); jax {jax.__version__}; D={args.dim} {args.dtype}; "
        f"block_size={args.block_size or losses.common.default_block_size()}"
        f"{'' if args.block_size else f' (fused: {losses.fused.default_tile(args.dim)})'}; "
        f"matmul peak {peak:.3f} TFLOP/s ([{args.matmul_size}]^2 {args.dtype})", flush=True)
  header = ("loss", "impl", "B", "ms", "useful TFLOP/s", "% matmul peak", "compiled peak MiB",
            "runtime high-water MiB")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  rows = []
  for loss in args.loss:
    for impl in args.impl:
      for b in args.batch:
        row = bench_one(loss, impl, b, args, dtype, peak, mesh)
        row["matmul_peak_tflops"] = round(peak, 3)
        rows.append(row)
        cells = (loss, impl, b, row.get("ms", row.get("status")), row.get("useful_tflops", "-"),
                 row.get("pct_of_matmul_peak", "-"), row.get("compiled_peak_MiB", "-"),
                 row.get("runtime_high_water_MiB", "n/a"))
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=_device_line(), jax=jax.__version__, rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
