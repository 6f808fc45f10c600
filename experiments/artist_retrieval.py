"""Cross-modal artist retrieval (Ferraro et al. 2023) on SAS ⋈ hetrec2011-lastfm-2k.
Results, evidence and what was rejected: docs/results/artist_retrieval.md.

  mmcl data build artists --sas ../shared/data/artist-similarity-sas \
      --hetrec ../shared/data/hetrec2011-lastfm-2k --output data/artists --drop-fraction 0.2
  mmcl train --config experiments/artist_retrieval.py --workdir workdirs/artist_retrieval
  mmcl eval  --workdir workdirs/artist_retrieval

Modalities: CF and tags (hetrec, 64-d each) and the Last.fm biography (all-MiniLM-L6-v2, 384-d),
20% of the availability bits dropped at random on top of what the name join leaves missing.
`mmcl eval` evaluates the test queries (10% of the SAS artists) against the whole catalogue and
writes eval/<step>/artist_retrieval.md with the baselines. Select settings with
`--set task.eval_queries=validation`, never on the test queries.

Variants (`--config experiments/artist_retrieval.py:VARIANT`):
  (none)    the recommended run, chosen on the validation queries: the text projector has a fixed
            residual path (the biography embedding's top-128 principal directions on the training
            rows, weight SKIP_WEIGHT); 2,000 steps of batch 512, checkpoints every 500, evaluated
            at SELECTED_STEP (`mmcl eval --step`), 3–8 minutes on a loaded 2-core CPU.
  first     the first attempt (no residual path; evaluated at step 2,000).
  multipos  the default plus the multi-positive loss: ground-truth neighbours among the training
            artists are positives too (weight 0.3; measured with skip weight 10, where it did not
            help); add `--set data.single_modality_rows=true` to also train on the training
            artists that have a single modality.
  tiny      a few steps of small projectors, for tests.
  d256      the 256-d shared space option.
"""

from mmcl.tasks import make_config

SKIP_WEIGHT = 30.0
SELECTED_STEP = 2000


def get_config(arg: str | None = None):
  c = make_config("artist_retrieval")
  c.seed = 0
  c.data.dir = "data/artists"
  c.data.global_batch_size = 512
  c.data.text_oversample = 8

  c.task.temperature = 0.1
  c.model.embed_dim = 128
  c.model.hidden_dim = 512
  c.model.dropout = 0.3

  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"

  c.train.total_steps = 2000
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 4
  c.train.val_batches = 1
  c.train.keep_best = 0
  c.model.skip_modalities = ("text",)
  c.model.skip_weight = SKIP_WEIGHT

  if arg == "first":
    c.model.skip_modalities = ()
  elif arg == "multipos":
    c.task.positives = "neighbours"
    c.task.neighbour_weight = 0.3
  elif arg == "tiny":
    c.model.skip_modalities = ()
    c.data.global_batch_size = 64
    c.data.text_oversample = 2
    c.model.embed_dim = 16
    c.model.hidden_dim = 32
    c.optim.warmup_steps = 2
    c.train.total_steps = 30
    c.train.log_every = 10
    c.train.checkpoint_every = 30
    c.train.progress_bar = False
    c.train.async_checkpointing = False
  elif arg == "d256":
    c.model.embed_dim = 256
  elif arg is not None:
    raise ValueError(f"unknown variant {arg!r} of experiments/artist_retrieval.py "
                     "(known: first, multipos, tiny, d256)")
  return c
