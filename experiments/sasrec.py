"""SASRec (Kang & McAuley, ICDM 2018) with the paper's hyper-parameters and protocol.
Results, evidence and what was rejected: docs/results/sasrec.md.

  mmcl data convert --format sasrec --input ../shared/data/amazon-videogames-sasrec/Video.txt \
      --output data/games
  mmcl train --config experiments/sasrec.py --workdir workdirs/sasrec_games
  mmcl eval  --workdir workdirs/sasrec_games

Other datasets (convert first, then `--config experiments/sasrec.py:VARIANT`):
  ml100k      mmcl data convert --format recbole --input ../shared/data/ml-100k --output data/ml100k
  beauty      mmcl data convert --format s3rec --input ../shared/data/amazon-beauty-s3rec/Beauty.txt \
                  --attributes ../shared/data/amazon-beauty-s3rec/Beauty_item2attributes.json \
                  --output data/beauty
  scientific  mmcl data convert --format unisrec --input ../shared/data/amazon-scientific-unisrec \
                  --output data/scientific

Variants:
  (none) / games  the paper's "Games" file: 2 blocks, 1 head, d 50, maxlen 50, dropout 0.5, Adam
                  lr 1e-3 β2 0.98 (constant), batch 128, 200 epochs (242 steps each).
  ml100k          dense movie data: maxlen 200, dropout 0.2 (the paper's ML-1M setting).
  beauty, scientific  sparse Amazon data: the Games setting.
  scientific_cold     the same on scientific with MMSRec's held-out items removed from training
                      (data made by experiments/analysis/mmsrec_cold.py, which also scores it).
  tiny            a few steps of a very small model on data/tiny_seq (for tests).
Evaluation: valid/test, 100 sampled never-interacted negatives (10,000-user cap) and full ranking.
"""

from mmcl.tasks import make_config

_DATA = {"games": ("data/games", 31013), "beauty": ("data/beauty", 22363),
         "scientific": ("data/scientific", 8442), "ml100k": ("data/ml100k", 943),
         "scientific_cold": ("data/scientific_cold", 8441)}


def get_config(arg: str | None = None):
  c = make_config("sasrec")
  c.seed = 0
  name = arg or "games"
  c.data.global_batch_size = 128
  c.data.max_len = 50
  c.model.hidden = 50
  c.model.num_blocks = 2
  c.model.num_heads = 1
  c.model.dropout = 0.5

  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip_norm = None

  c.train.val_batches = 0  # the paper trains a fixed number of epochs; no checkpoint selection
  c.train.log_every = 50
  c.train.keep_best = 0
  c.train.keep_checkpoints = 12
  c.train.async_checkpointing = False

  if name == "tiny":
    c.data.dir = "data/tiny_seq"
    c.data.global_batch_size = 16
    c.data.max_len = 8
    c.model.hidden = 16
    c.model.num_blocks = 1
    c.model.dropout = 0.1
    c.train.total_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.train.progress_bar = False
    c.task.eval_max_users = None
    c.task.eval_num_negatives = 10
    c.task.eval_batch_size = 64
    return c
  if name not in _DATA:
    raise ValueError(f"unknown variant {arg!r} of experiments/sasrec.py (known: games, ml100k, "
                     f"beauty, scientific, scientific_cold, tiny)")
  c.data.dir, num_users = _DATA[name]
  epochs = 200
  if name == "ml100k":
    c.data.max_len = 200
    c.model.dropout = 0.2
  steps_per_epoch = num_users // c.data.global_batch_size
  c.train.total_steps = epochs * steps_per_epoch
  c.train.checkpoint_every = 20 * steps_per_epoch
  return c
