"""MMSRec (Song et al., arXiv:2304.13277): ID-free items, one fusion encoder for sequences and items,
combinatorial contrastive pretraining and cloze fine-tuning with a full softmax over all items.
Results, evidence and what was rejected: docs/results/mmsrec.md.

  (data/scientific and data/features/scientific_minilm.npy as in experiments/demure.py)
  mmcl train --config experiments/mmsrec.py:scientific_pretrain --workdir workdirs/mmsrec_sci_pre
  mmcl train --config experiments/mmsrec.py:scientific --workdir workdirs/mmsrec_sci \
      --set task.init_from=workdirs/mmsrec_sci_pre
  mmcl eval  --workdir workdirs/mmsrec_sci --step BEST   (best = highest val/recall@10 checkpoint)

The CPU-size runs of docs/results/mmsrec.md (cloze from scratch; cold start):

  mmcl train --config experiments/mmsrec.py:scientific_small --workdir workdirs/mmsrec_sci_small \
      --set train.total_steps=786 --set train.checkpoint_every=131 --set train.val_batches=8
  mmcl eval  --workdir workdirs/mmsrec_sci_small --step 786
  mmcl train --config experiments/mmsrec.py:scientific_cold_small \
      --workdir workdirs/mmsrec_sci_small_cold --set train.total_steps=262 \
      --set train.checkpoint_every=131 --set train.val_batches=8
  mmcl eval  --workdir workdirs/mmsrec_sci_small_cold --step 262

Variants:
  scientific / scientific_pretrain   amazon-scientific-unisrec (UniSRec split), the paper's sizes
                                     (d 512, 2 layers, 8 heads, FFN 1024), τ 0.05; fine-tuning AdamW
                                     lr 1e-3, pretraining lr 5e-5, grad clip 1.0.
  scientific_cold                    the same with 10% of the items held out of training entirely
                                     (baselines on the same split: experiments/analysis/mmsrec_cold.py).
  ml100k / ml100k_pretrain           the same on ml-100k (for transfer: pretrain on one, fine-tune
                                     on the other with task.init_from).
  small                              suffix `_small` on any of the above: d 128, FFN 256, 4 heads
                                     (what fits a 2-core CPU).
  tiny                               tests.
"""

from mmcl.tasks import make_config

_DATA = {"scientific": ("data/scientific", 8442, 20), "ml100k": ("data/ml100k", 943, 100)}


def get_config(arg: str | None = None):
  c = make_config("mmsrec")
  c.seed = 0
  arg = arg or "scientific"
  small = arg.endswith("_small")
  name = arg.removesuffix("_small")
  c.data.global_batch_size = 64
  c.data.max_len = 20
  c.data.mask_prob = 0.2
  c.task.temperature = 0.05
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.01
  c.optim.grad_clip_norm = 1.0
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.train.best_metric = "val/recall@10"
  c.train.best_mode = "max"
  c.train.keep_best = 1
  c.train.log_every = 20
  c.train.async_checkpointing = False

  if name == "tiny":
    c.data.dir = "data/tiny_seq"
    c.data.global_batch_size = 16
    c.data.max_len = 8
    c.model.width = 32
    c.model.depth = 1
    c.model.num_heads = 2
    c.model.mlp_dim = 64
    c.task.lexical_dim = 8
    c.optim.lr = 3e-3
    c.train.total_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 6
    c.train.val_batches = 1
    c.train.progress_bar = False
    c.task.eval_batch_size = 64
    c.task.eval_ks = (1, 10)
    return c
  base = name.removesuffix("_pretrain").removesuffix("_cold")
  if base not in _DATA:
    raise ValueError(f"unknown variant {arg!r} of experiments/mmsrec.py (known: scientific, "
                     f"scientific_pretrain, scientific_cold, ml100k, ml100k_pretrain, each with an "
                     f"optional _small suffix; tiny)")
  c.data.dir, num_users, epochs = _DATA[base]
  c.data.text_features = f"data/features/{base}_minilm.npy"
  steps_per_epoch = num_users // c.data.global_batch_size
  c.train.total_steps = epochs * steps_per_epoch
  c.train.checkpoint_every = max(steps_per_epoch, c.train.total_steps // 10)
  c.train.val_batches = max(1, 2048 // c.data.global_batch_size)
  if name.endswith("_pretrain"):
    c.task.stage = "pretrain"
    c.optim.lr = 5e-5
    c.train.val_batches = 0
    c.train.keep_best = 0
  else:
    c.optim.lr = 1e-3
  if name.endswith("_cold"):
    c.task.cold_item_fraction = 0.1
  if small:
    c.model.width = 128
    c.model.num_heads = 4
    c.model.mlp_dim = 256
  return c
