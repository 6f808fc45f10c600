"""open_clip's own webdataset training loader (open_clip_train.data.get_wds_dataset), timed.

Runs in its own virtual environment (open_clip_torch + torchvision + webdataset on the CPU torch
build), created by `experiments/bench/data.py --peers`:

  python openclip_runner.py PHOTO_SET_DIR --batches 40 --warmup 3 --workers 2

The transform is open_clip's training `image_transform` matched to mmcl's: random-resized-crop
with scale 0.08-1 (open_clip's default is 0.9-1) and bilinear interpolation, a horizontal flip
added, CLIP mean/std; captions go through open_clip's tokenizer, as in its training runs. Its
loader decodes with PIL (`wds.decode("pilrgb")`) in `--workers` DataLoader worker processes.

The PyPI torchvision wheel is built against CUDA torch; beside the CPU torch build its C++
extension does not load, and `import torchvision` then fails registering fake kernels for the
detection ops `nms` / `qnms`. Declaring those two op schemas first (they are never called here)
lets torchvision's Python transforms import; the data path is unchanged.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import cputime  # noqa: E402
import torch  # noqa: E402

try:
  import torchvision  # noqa: F401
except RuntimeError:
  _lib = torch.library.Library("torchvision", "DEF")  # pylint: disable=invalid-name
  _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
  for name in [m for m in sys.modules if m.startswith("torchvision")]:
    del sys.modules[name]
  import torchvision  # noqa: F401

import open_clip  # noqa: E402
from open_clip.transform import AugmentationCfg  # noqa: E402
from open_clip_train.data import get_wds_dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("photo_set")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--workers", type=int, default=2)
  args = p.parse_args()
  shards = sorted(str(s) for s in (pathlib.Path(args.photo_set) / "wds").glob("*.tar"))
  preprocess = open_clip.image_transform(224, is_train=True, mean=MEAN, std=STD,
                                         interpolation="bilinear",
                                         aug_cfg=AugmentationCfg(scale=(0.08, 1.0)))
  preprocess = transforms.Compose([*preprocess.transforms[:1], transforms.RandomHorizontalFlip(),
                                   *preprocess.transforms[1:]])
  total = (args.warmup + args.batches) * args.batch
  ns = argparse.Namespace(
      train_data="::".join(shards), val_data=None, train_num_samples=total,
      train_data_upsampling_factors=None, dataset_resampled=True, batch_size=args.batch,
      workers=args.workers, world_size=1, seed=0)
  info = get_wds_dataset(ns, preprocess, is_train=True, epoch=0,
                         tokenizer=open_clip.get_tokenizer("ViT-B-32"))
  it = iter(info.dataloader)
  for _ in range(args.warmup):
    images, _ = next(it)
  cpu0, t0 = cputime.tree_cpu_seconds(), time.perf_counter()
  for _ in range(args.batches):
    images, _ = next(it)
  wall, cpu = time.perf_counter() - t0, cputime.tree_cpu_seconds() - cpu0
  print(json.dumps(cputime.report(args.batches * args.batch, wall, cpu,
                                  output=f"{images.dtype} {list(images.shape)}",
                                  open_clip=open_clip.__version__, torch=torch.__version__)))


if __name__ == "__main__":
  main()
