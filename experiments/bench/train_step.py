"""CLIP train-step throughput and MFU: the generic mmcl step on a CLIP ViT-B/16 dual encoder.

  # one GPU, synthetic batches already on the device, bf16:
  python experiments/bench/train_step.py --preset vit-b16 --batch 256 --dtype bfloat16
  # fed by the grain pipeline from an ArrayRecord image–text set at 224 px (stall fraction):
  mmcl data convert --format image-captions --input /path/to/images+captions --output data/it224
  python experiments/bench/train_step.py --preset vit-b16 --batch 256 --data data/it224
  # a global batch of 32,768 with exact gradients (gradient caching, micro-batches of 256):
  python experiments/bench/train_step.py --preset vit-b16 --batch 32768 --grad-accum 128 --grad-cache
  # anything runs on the CPU at small size, e.g.:
  python experiments/bench/train_step.py --preset tiny --batch 64 --steps 5

Model FLOPs per pair are counted analytically (`mmcl.models.flops`, matmuls only, 2·MACs; ViT-B/16 at
224 px ≈ 35 GFLOPs + text tower at 77 tokens ≈ 6 GFLOPs forward, ×3 for a training step).
MFU = model FLOPs / step time / peak, with the datasheet dense bf16 peak of the device (H100/H200:
989 TFLOP/s) and, beside it, the ratio to a bf16 matmul peak measured in the same run. It also times
how long an asynchronous orbax save of the whole train state blocks the training loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

PRESETS = {
    # open_clip ViT-B-16: vision width 768, 12 layers, 12 heads; text width 512, 12 layers, 8 heads.
    "vit-b16": dict(image_size=224, patch=16, v_width=768, v_depth=12, v_heads=12, v_mlp=3072,
                    t_width=512, t_depth=12, t_heads=8, t_mlp=2048, context=77, vocab=49408,
                    embed=512),
    "tiny": dict(image_size=32, patch=8, v_width=64, v_depth=2, v_heads=2, v_mlp=128,
                 t_width=64, t_depth=2, t_heads=2, t_mlp=128, context=16, vocab=1000, embed=32),
}
DATASHEET_PEAK = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def matmul_peak(dtype, n: int = 8192, repeats: int = 10) -> float:
  """FLOP/s of the fastest of `repeats` [n, n] @ [n, n] products in `dtype` on the default device."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def top_ops(trace_dir: str, steps: int, n: int = 25) -> list[dict]:
  """The `n` op names with the most total time in the newest perfetto trace under `trace_dir`.

  Sums complete ("X") events per name over the device threads of the trace (GPU streams; on a
  host-only run, the XLA CPU threads), per step, and their share of the summed time.
  """
  import collections
  import glob
  import gzip
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(paths[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {}
  for e in events:  # process names: pick the device ("/device:GPU:0 ...") processes
    if e.get("ph") == "M" and e.get("name") == "process_name":
      names[e["pid"]] = e.get("args", {}).get("name", "")
  device_pids = {p for p, name in names.items() if "/device:" in name}
  host_only = not device_pids
  if host_only:  # CPU-only trace: every process, less Python frames and executor wrappers
    device_pids = set(names)
  skip = lambda name: host_only and (name.startswith("$") or "Thunk" in name or "Pjit" in name)
  total = collections.Counter()
  count = collections.Counter()
  for e in events:
    if (e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e
        and not skip(e["name"])):
      total[e["name"]] += e["dur"]
      count[e["name"]] += 1
  whole = sum(total.values()) or 1
  return [{"op": k, "ms_per_step": v / 1e3 / steps, "share": v / whole,
           "calls_per_step": count[k] / steps} for k, v in total.most_common(n)]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="vit-b16")
  p.add_argument("--batch", type=int, default=256, help="global batch")
  p.add_argument("--grad-accum", type=int, default=1)
  p.add_argument("--grad-cache", action="store_true", help="exact gradients with --grad-accum")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
  p.add_argument("--remat", action="store_true", help="rematerialise each Transformer block")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--data", default=None, help="ArrayRecord image–text dataset for the fed run")
  p.add_argument("--no-checkpoint", action="store_true", help="skip the async-save timing")
  p.add_argument("--json", default=None, help="also write the results here")
  p.add_argument("--profile", default=None,
                 help="trace --steps more steps into this folder (perfetto JSON) and report the "
                      "top ops by device time")
  args = p.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import numpy as np

  from mmcl.losses.sharded import infonce_over_mesh
  from mmcl.models import flops as flops_lib
  from mmcl.models.text_transformer import TextTransformer
  from mmcl.models.vit import ViT
  from mmcl.parallel import mesh as mesh_lib
  from mmcl.parallel import sharding as sharding_lib
  from mmcl.train.config import base_config
  from mmcl.train.optim import make_optimizer
  from mmcl.train.state import TrainState
  from mmcl.train.step import make_train_step

  cfg = PRESETS[args.preset]
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  mesh = mesh_lib.make_mesh()
  vit = ViT(patch_size=cfg["patch"], width=cfg["v_width"], depth=cfg["v_depth"],
            num_heads=cfg["v_heads"], mlp_dim=cfg["v_mlp"], embed_dim=cfg["embed"], pool="cls",
            dtype=dtype, remat=args.remat)
  txt = TextTransformer(vocab_size=cfg["vocab"], max_len=cfg["context"], width=cfg["t_width"],
                        depth=cfg["t_depth"], num_heads=cfg["t_heads"], mlp_dim=cfg["t_mlp"],
                        embed_dim=cfg["embed"], causal=True, pool="eos", dtype=dtype,
                        remat=args.remat)
  s = cfg["image_size"]
  norm = lambda v: v * jax.lax.rsqrt(jnp.sum(v * v, -1, keepdims=True) + 1e-12)

  def embed(params, batch, rng, *, train):
    return {"image": norm(vit.apply({"params": params["image"]}, batch["image"])),
            "text": norm(txt.apply({"params": params["text"]}, batch["text"]))}

  def emb_loss(params, emb, batch):
    scale = jnp.exp(params["t"])
    return infonce_over_mesh(emb["image"], emb["text"], mesh, logit_scale=scale), {}

  def loss(params, batch, rng, *, train):
    return emb_loss(params, embed(params, batch, rng, train=train), batch)

  def init(key):
    k1, k2 = jax.random.split(key)
    params = {"image": vit.init(k1, jnp.zeros((1, s, s, 3)))["params"],
              "text": txt.init(k2, jnp.ones((1, cfg["context"]), jnp.int32))["params"],
              "t": jnp.asarray(np.log(1 / 0.07), jnp.float32)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=key)

  oc = base_config().optim
  tx, schedule = make_optimizer(oc, 10_000)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding_lib.tree_shardings(abstract, sharding_lib.STRATEGIES["replicate"], mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
  step = jax.jit(make_train_step(loss, tx, schedule, grad_accum_steps=args.grad_accum, mesh=mesh,
                                 grad_cache=(embed, emb_loss) if args.grad_cache else None),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  rng = np.random.default_rng(0)
  host = {"image": rng.normal(size=(args.batch, s, s, 3)).astype(np.float32),
          "text": rng.integers(1, cfg["vocab"], size=(args.batch, cfg["context"]), dtype=np.int32)}
  batch = mesh_lib.host_batch_to_global(mesh, host)

  def timed(get_batch, steps):
    nonlocal state
    for _ in range(args.warmup):
      state, m = step(state, get_batch())
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, get_batch())
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps

  t_step = timed(lambda: batch, args.steps)
  flops_fwd = (flops_lib.vit_flops(vit, (s, s, 3))
               + flops_lib.text_transformer_flops(txt, cfg["context"]))
  n_dev = jax.device_count()
  kind = jax.devices()[0].device_kind
  peak = DATASHEET_PEAK.get(kind)
  measured = matmul_peak(dtype, n=8192 if jax.default_backend() == "gpu" else 1024)
  model_flops = 3 * flops_fwd * args.batch / t_step
  out = {"date": time.strftime("%Y-%m-%d"), "device": f"{n_dev}× {kind}", "preset": args.preset,
         "batch": args.batch, "grad_accum": args.grad_accum, "grad_cache": args.grad_cache,
         "dtype": args.dtype, "remat": args.remat, "step_s": t_step,
         "samples_per_s": args.batch / t_step, "gflops_fwd_per_pair": flops_fwd / 1e9,
         "model_tflops_per_s": model_flops / 1e12,
         "matmul_peak_tflops_measured": measured / 1e12,
         "ratio_to_measured_matmul_peak": model_flops / (measured * n_dev)}
  if peak:
    out["mfu_datasheet"] = model_flops / (peak * n_dev)

  if args.data:
    from data_pipelines import pipelines
    it = pipelines.build_train_iterator(
        {"dir": args.data, "global_batch_size": args.batch, "image_size": s,
         "max_text_len": cfg["context"], "seed": 0, "num_threads": os.cpu_count() or 2})
    t_fed = timed(lambda: mesh_lib.put_on_mesh(
        {k: v for k, v in next(it).items() if k in ("image", "text")}, mesh), args.steps)
    out["fed_step_s"] = t_fed
    out["fed_samples_per_s"] = args.batch / t_fed
    out["stall_fraction"] = max(0.0, (t_fed - t_step) / t_fed)

  if args.profile:
    with jax.profiler.trace(args.profile, create_perfetto_trace=True):
      timed(lambda: batch, args.steps)
    out["profile_top_ops"] = top_ops(args.profile, args.warmup + args.steps)

  if not args.no_checkpoint:
    from mmcl.train.checkpoint import Checkpointer
    with tempfile.TemporaryDirectory() as d:
      ck = Checkpointer(d, keep=1, async_save=True)
      t0 = time.perf_counter()
      ck.save(1, state, None)
      out["async_save_blocking_s"] = time.perf_counter() - t0
      ck.close()

  print(json.dumps(out, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
