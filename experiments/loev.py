"""LOEV / LOEV++ (Guinot et al. 2025) and the SimCLR baseline on the procedural music set.
Results, evidence and what was rejected: docs/results/loev.md.

  mmcl train --config experiments/loev.py --workdir workdirs/loev            # LOEV
  mmcl train --config experiments/loev.py:plusplus --workdir workdirs/loevpp # LOEV++
  mmcl train --config experiments/loev.py:simclr --workdir workdirs/simclr   # baseline
  mmcl eval  --workdir workdirs/loev

The first run renders the procedural clip sets (2,400 training clips into data.dir, 400 held-out
clips into data.eval_dir; about a minute each on a 2-core CPU). Views are 2 s at 16 kHz, augmented
on the host with librosa (pitch shift, time stretch) and the base chain; log-mel and CNN run on
the device. `mmcl eval` writes eval/<step>/loev_eval.json: key / tempo probes, equivariance R² and
kNN hits per subspace.

Variants (`--config experiments/loev.py:VARIANT`):
  (none)    LOEV: invariant head + one head per tracked augmentation on one trunk.
  plusplus  LOEV++: the last CNN stage replicated into K + 1 branches.
  simclr    the all-invariant single-head baseline.
  tiny      a few steps of a very small model on a small set, for tests.
  long      the 300-step setting trained for 2,000 steps, with views drawn from a bank of 8
            augmented views per training clip (`data.view_bank`: on the fly, the tracked chain
            costs about as much CPU as the training step, so the three runs of the comparison
            augment once and share the bank; 28 view pairs per clip), and checkpoints every 250
            steps for equivariance curves. 0.62 s/step alone on a quiet 2-core CPU, about 70 min
            for the three runs of a comparison side by side.
  v4        4 views per clip and 16 clips per batch (the same 64 views per step as the default
            32 × 2): with two views per clip, a view that received augmentation k leaves its clip
            without positives in head k, so head k never sees a same-clip view as a negative and
            nothing pushes it to tell transformed from clean; with four, the untransformed views
            of a clip are positives and its transformed views explicit negatives of each other
            (docs/results/loev.md).
  wide      the trunk at twice the channels, (16, 32, 64, 128) instead of (8, 16, 32, 64): the
            narrow trunk is sized for a 2-core CPU; with three heads on it, LOEV loses tempo
            against SimCLR in two seeds of three (docs/results/loev.md).
  lin       linear projection heads (model.head_hidden = 0) instead of one hidden layer of 512.
Variants combine with an underscore: plusplus_long, simclr_long, long_v4, plusplus_long_v4,
long_v4_wide, plusplus_long_v4_lin, tiny_plusplus, tiny_simclr.

The recommended configurations (docs/results/loev.md), each method against the baseline at the
same trunk, views and seed, on the shared view bank:
  LOEV      long_v4_wide           against simclr_long_v4_wide
  LOEV++    plusplus_long_v4_lin   against simclr_long_v4
  mmcl train --config experiments/loev.py:long_v4_wide --workdir workdirs/loev_wide --set seed=1
  mmcl eval --workdir workdirs/loev_wide --step 2000
  (likewise simclr_long_v4_wide → workdirs/simclr_wide, plusplus_long_v4_lin →
   workdirs/loevpp_lin, simclr_long_v4 → workdirs/simclr_v4), then
  python experiments/analysis/loev_compare.py --loev workdirs/loev_wide \
      --simclr workdirs/simclr_wide --plusplus workdirs/loevpp_lin \
      --simclr-plusplus workdirs/simclr_v4 --step 2000
Also measured, not used: `--set model.head_dim=0` for LOEV++ / SimCLR (no projection heads: the
loss acts on each branch itself).
"""

from mmcl.tasks import make_config


def get_config(arg: str | None = None):
  c = make_config("loev")
  c.seed = 0
  tokens = [t for t in (arg or "").split("_") if t]
  kinds = [t for t in tokens if t in ("plusplus", "simclr")]
  sizes = [t for t in tokens if t in ("tiny", "long")]
  flags = [t for t in tokens if t in ("v4", "wide", "lin")]
  if (len(kinds) > 1 or len(sizes) > 1 or len(set(flags)) != len(flags)
      or len(kinds) + len(sizes) + len(flags) != len(tokens)):
    raise ValueError(f"unknown variant {arg!r} of experiments/loev.py (known: plusplus, simclr, "
                     "tiny, long, v4, wide, lin, and combinations such as tiny_plusplus, "
                     "simclr_long, long_v4_wide or plusplus_long_v4_lin)")
  c.task.variant = {"plusplus": "loev++", "simclr": "simclr"}.get(kinds[0] if kinds else "",
                                                                  "loev")
  size = sizes[0] if sizes else ""
  c.data.dir = "data/music_train"
  c.data.eval_dir = "data/music_eval"
  c.data.global_batch_size = 32
  # Sized for a 2-core CPU (docs/results/loev.md); the trunk is configurable (model.channels, ...).
  c.model.channels = (8, 16, 32, 64)

  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 0.0

  c.train.total_steps = 300
  c.train.log_every = 20
  c.train.checkpoint_every = 150
  c.train.val_batches = 0
  c.train.keep_best = 0

  if size == "long":
    c.data.view_bank = 8
    c.data.view_bank_workers = 2
    c.optim.warmup_steps = 100
    c.train.total_steps = 2000
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 10
  if "v4" in flags:
    c.data.num_views = 4
    c.data.global_batch_size //= 2
  if size == "tiny":
    c.data.num_clips = 64
    c.data.num_eval_clips = 40
    c.data.global_batch_size = 8
    c.data.clip_seconds = 0.5
    c.data.source_seconds = 0.7
    c.model.channels = (4, 8)
    c.model.head_hidden = 16
    c.model.head_dim = 8
    c.model.n_mels = 32
    c.optim.warmup_steps = 2
    c.train.total_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 6
    c.train.progress_bar = False
    c.train.async_checkpointing = False
  if "wide" in flags:
    c.model.channels = (16, 32, 64, 128)
  if "lin" in flags:
    c.model.head_hidden = 0
  return c
