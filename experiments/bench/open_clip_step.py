"""open_clip's own CLIP training step, timed the same way as `train_step.py` (the reference row).

The step is open_clip_train's `train_one_epoch` inner loop without data loading: images and token
ids already on the device, `torch.autocast(bfloat16)` (its `--precision amp_bf16`), the model's
forward (`open_clip.create_model("ViT-B-16")`, SDPA attention as open_clip builds it), its
`ClipLoss`, backward, `torch.optim.AdamW` (open_clip's defaults: lr 5e-4, wd 0.2 on weights,
betas (0.9, 0.98), eps 1e-6) and the `logit_scale.clamp_(0, ln 100)` after the update.
`--compile` wraps the model in `torch.compile` (open_clip_train's `--torchcompile`).

FLOPs per pair are counted with the same analytic formula as the mmcl row (`mmcl.models.flops`,
matmuls only, backward = 2× forward), so the two MFU columns are comparable: ViT-B/16 at 224 px and
a 77-token text tower ≈ 41 GFLOPs forward per pair. MFU is against the datasheet dense bf16 peak
(H100/H200 SXM: 989 TFLOP/s) and, beside it, against a bf16 matmul peak measured in the same run.

On a GPU machine whose image has torch, torchvision, timm, huggingface_hub, regex but not
open_clip, ftfy, wcwidth: `bash experiments/bench/gpu_wheels.sh` where there is network access,
then on the GPU machine `bash experiments/bench/gpu_suite.sh openclip clip` (with `.whl/`), which runs
  python3 experiments/bench/open_clip_step.py --batch 256 [--compile] --json $OUT/....json
beside `train_step.py --preset vit-b16 --batch 256` on the same machine.
On the CPU, at toy size (checks the script, says nothing about speed; needs a torchvision that
imports beside the installed torch — the PyPI wheel is a CUDA build):
  python experiments/bench/open_clip_step.py --preset tiny --batch 8 --steps 2 --warmup 1 \
      --device cpu --precision fp32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

# Same towers as train_step.py's presets, in open_clip's configuration vocabulary.
PRESETS = {
    "vit-b16": dict(model_name="ViT-B-16"),
    "tiny": dict(embed_dim=32,
                 vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, mlp_ratio=2.0,
                                 patch_size=8),
                 text_cfg=dict(context_length=16, vocab_size=1000, width=64, heads=2, layers=2)),
}
DATASHEET_PEAK = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12}


def analytic_flops_per_pair(model) -> tuple[int, int, int]:
  """(forward FLOPs per pair, image size, context length) of an open_clip CLIP model.

  Counts the towers with `mmcl.models.flops.encoder_flops`, the formula behind the mmcl row.
  """
  from mmcl.models.flops import dense_flops, encoder_flops
  v = model.visual
  size = v.image_size[0] if isinstance(v.image_size, tuple) else v.image_size
  patch = v.patch_size[0] if isinstance(v.patch_size, tuple) else v.patch_size
  width = v.conv1.out_channels
  blocks = v.transformer.resblocks
  mlp = blocks[0].mlp.c_fc.out_features
  n = (size // patch) ** 2
  image = (dense_flops(n, patch * patch * 3, width) + encoder_flops(n + 1, width, len(blocks), mlp)
           + dense_flops(1, width, v.proj.shape[1]))
  t_blocks = model.transformer.resblocks
  t_width = model.transformer.width
  t_mlp = t_blocks[0].mlp.c_fc.out_features
  ctx = model.context_length
  text = (encoder_flops(ctx, t_width, len(t_blocks), t_mlp)
          + dense_flops(1, t_width, model.text_projection.shape[1]))
  return image + text, size, ctx


def matmul_peak(torch, device, dtype, n: int = 8192, repeats: int = 10) -> float:
  """FLOP/s of the fastest of `repeats` [n, n] @ [n, n] products in `dtype` on `device`."""
  x = torch.ones((n, n), dtype=dtype, device=device)
  best = float("inf")
  for _ in range(repeats + 1):
    _sync(torch, device)
    t = time.perf_counter()
    x @ x
    _sync(torch, device)
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def _sync(torch, device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default="vit-b16")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=5,
                 help="untimed steps first (torch.compile compiles during these)")
  p.add_argument("--compile", action="store_true", help="torch.compile the model")
  p.add_argument("--precision", choices=("amp_bf16", "fp32"), default="amp_bf16")
  p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)

  import torch
  try:
    import open_clip
  except ImportError as e:  # the GPU image lacks it: see the module docstring
    print(f"open_clip_step: cannot import open_clip ({e}); carry open_clip_torch, ftfy and "
          f"wcwidth as wheels (module docstring)", file=sys.stderr)
    return 2

  device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
  torch.manual_seed(0)
  if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  preset = PRESETS[args.preset]
  if "model_name" in preset:
    model = open_clip.create_model(preset["model_name"], device=device)
  else:
    model = open_clip.CLIP(**preset).to(device)
  model.train()
  flops_fwd, size, ctx = analytic_flops_per_pair(model)

  # open_clip_train.main's optimizer: no weight decay on gains, biases, embeddings, logit_scale.
  exclude = lambda n, q: (q.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
                          or "logit_scale" in n)
  named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
  optimizer = torch.optim.AdamW(
      [{"params": [q for n, q in named if exclude(n, q)], "weight_decay": 0.0},
       {"params": [q for n, q in named if not exclude(n, q)], "weight_decay": 0.2}],
      lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
  loss_fn = open_clip.ClipLoss()
  step_model = torch.compile(model) if args.compile else model
  autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)
              if args.precision == "amp_bf16" else torch.autocast(device.type, enabled=False))

  gen = torch.Generator(device="cpu").manual_seed(0)
  images = torch.randn((args.batch, 3, size, size), generator=gen).to(device)
  texts = torch.randint(1, model.vocab_size, (args.batch, ctx), generator=gen).to(device)

  def step() -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      image_features, text_features, logit_scale = step_model(images, texts)
      loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
      model.logit_scale.clamp_(0, math.log(100))
    return loss

  t_compile = time.perf_counter()
  for _ in range(args.warmup):
    loss = step()
  _sync(torch, device)
  t_compile = time.perf_counter() - t_compile
  first_loss = float(loss.detach())
  t0 = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  _sync(torch, device)
  t_step = (time.perf_counter() - t0) / args.steps
  if not math.isfinite(float(loss.detach())):
    raise FloatingPointError(f"open_clip_step: non-finite loss {float(loss)}")

  kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  dtype = torch.bfloat16 if args.precision == "amp_bf16" else torch.float32
  measured = matmul_peak(torch, device, dtype, n=8192 if device.type == "cuda" else 512)
  model_flops = 3 * flops_fwd * args.batch / t_step
  out = {"date": time.strftime("%Y-%m-%d"), "device": f"1× {kind}", "framework": "open_clip",
         "open_clip": open_clip.__version__, "torch": torch.__version__, "preset": args.preset,
         "batch": args.batch, "precision": args.precision, "compile": args.compile,
         "warmup_s": t_compile, "step_s": t_step, "samples_per_s": args.batch / t_step,
         "gflops_fwd_per_pair": flops_fwd / 1e9, "model_tflops_per_s": model_flops / 1e12,
         "matmul_peak_tflops_measured": measured / 1e12,
         "ratio_to_measured_matmul_peak": model_flops / measured,
         "loss_first": first_loss, "loss_last": float(loss.detach())}
  peak = next((v for k, v in DATASHEET_PEAK.items() if kind.startswith(k)), None)
  if peak:
    out["mfu_datasheet"] = model_flops / peak
  print(json.dumps(out, indent=2))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # mmcl.models imports jax
  sys.exit(main())
