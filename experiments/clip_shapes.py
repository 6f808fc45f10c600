"""CLIP-style image–text dual encoder on the built-in procedural shapes dataset (the quickstart).
Results, evidence and what was rejected: docs/results/clip.md.

  mmcl data build-shapes --output data/shapes
  mmcl train --config experiments/clip_shapes.py --workdir workdirs/clip_shapes
  mmcl eval  --workdir workdirs/clip_shapes

The same recipe on pairs you hold (webdataset shards, a tfds ArrayRecord build, parquet files;
streamed, see BUILD.md "Streamed sources"):

  mmcl train --config experiments/clip_shapes.py:tiny --workdir workdirs/clip_wds \
             --set data.source='webdataset:/data/shards/{00000..00099}.tar'

Variants (`--config experiments/clip_shapes.py:VARIANT`):
  (none)   the quickstart: ~2 minutes on a 2-core CPU, text→image Recall@1 far above chance.
  tiny     a few steps of a very small model, for tests.
  sigmoid  the same with the SigLIP loss.
  gpu      wider towers, bf16, bigger batch: for an accelerator.
"""

from mmcl.tasks import make_config


def get_config(arg: str | None = None):
  c = make_config("clip")
  c.seed = 0
  c.data.dir = "data/shapes"
  c.data.global_batch_size = 256
  c.data.max_text_len = 40  # captions are at most 36 word pieces + BOS/EOS

  c.model.embed_dim = 128
  c.model.image.patch_size = 4
  c.model.image.width = 96
  c.model.image.depth = 3
  c.model.image.num_heads = 4
  c.model.image.mlp_dim = 192
  c.model.text.width = 96
  c.model.text.depth = 2
  c.model.text.num_heads = 4
  c.model.text.mlp_dim = 192

  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 20
  c.optim.schedule = "cosine"

  c.train.total_steps = 160  # ~8 epochs of the 5,000 training pairs
  c.train.log_every = 10
  c.train.checkpoint_every = 80
  c.train.val_batches = 2

  if arg == "tiny":
    c.data.global_batch_size = 32
    c.data.image_size = 32  # webdataset/tfds/parquet sources (shapes datasets fix their own)
    c.model.embed_dim = 32
    c.model.image.patch_size = 8
    c.model.image.width = 32
    c.model.image.depth = 1
    c.model.image.num_heads = 2
    c.model.image.mlp_dim = 64
    c.model.text.width = 32
    c.model.text.depth = 1
    c.model.text.num_heads = 2
    c.model.text.mlp_dim = 64
    # A constant learning rate: the compiled train step then does not depend on
    # train.total_steps, so runs of different lengths share one compilation (the tests' cache).
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.train.total_steps = 8
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.train.val_batches = 1
    c.train.progress_bar = False
  elif arg == "sigmoid":
    c.task.loss = "sigmoid"
  elif arg == "gpu":
    c.data.global_batch_size = 4096
    c.model.embed_dim = 256
    c.model.image.width = 384
    c.model.image.depth = 6
    c.model.image.num_heads = 6
    c.model.image.mlp_dim = 1536
    c.model.text.width = 384
    c.model.text.depth = 6
    c.model.text.num_heads = 6
    c.model.text.mlp_dim = 1536
    c.train.compute_dtype = "bfloat16"
    c.train.total_steps = 2000
  elif arg is not None:
    raise ValueError(f"unknown variant {arg!r} of experiments/clip_shapes.py "
                     "(known: tiny, sigmoid, gpu)")
  return c
