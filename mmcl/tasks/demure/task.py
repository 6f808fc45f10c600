"""Demure: denoising multi-modal sequential recommendation (Yao et al., arXiv:2305.01915).

No public code exists; this is our reading of arXiv:2305.01915, every piece a config key.
Items are represented by frozen modality features x^m (`task.modalities`):
  text     sentence embeddings of the item text by the pretrained text tower (all-MiniLM-L6-v2,
           precomputed with `mmcl features`, path in `data.text_features`); when that path is
           empty, the TF-IDF + SVD fallback below is used instead;
  lexical  TF-IDF + truncated SVD of the item text (`data_pipelines.featurize.tfidf_svd`,
           computed at start-up, seeded), a second, lexical view of the same text (the datasets
           here have no images).
Backbone (1): token x̃_t^m = W_m x_t^m, token_t = Σ_m x̃_t^m (+ optional ID embedding), SASRec's
causal encoder (`mmcl.models.seq_transformer`); the item side scores with e_i = Σ_m W_m x_i^m (+ ID).
L_rec (`task.rec_loss`): SASRec's BCE with one sampled negative per position (default), or
cross-entropy over all N items (full softmax); the denoising-off ablation uses the same one.
Contribution (2): c_{t,m} = |⟨∂L_rec/∂x̃_t^m, x̃_t^m⟩| (`task.contribution` = abs, the paper) or
−⟨∂L_rec/∂x̃_t^m, x̃_t^m⟩ (signed: the first-order loss increase when the token is removed) from a
dropout-free pass with the current parameters (no gradient flows through it), normalised per (user
sequence, modality) by its mean |c| over the sequence's real positions (`task.score_normalisation`;
design choice: modalities of different scale become comparable); in each sequence the lowest
fraction ρ (`task.noise_fraction`) of its (t, m) pairs are flagged noise.
`task.contribution_path_steps` = K > 1 averages the gradient over K points of the path from the
empty sequence to the input (integrated gradients), which follows the token's effect where the
encoder saturates.
Extensions, all off by default: `task.score_pooling` = batch_item averages the scores of an item's
occurrences in the batch; `task.item_scores` takes the flags from a per-(item, modality) table, the
scores averaged over all training occurrences at a warm-up checkpoint (`item-scores` command
below), and `task.flag_scope` = global flags that table's lowest ρ over all training pairs
instead of per row; `task.flag_after_steps` trains plain L_rec for that many steps before flagging.
Views (3): denoised = flagged modality tokens removed; noisy = the original sequence.
Loss (4): L = L_rec(denoised) + λ·InfoNCE(h_denoised, h_noisy; τ) with in-batch negatives over the
whole global batch (`mmcl.losses.sharded`), h = L2-normalised output at the most recent position
(`task.cl_positions` = all: at every real position, each prefix its own pair).
`task.denoise = False` gives the baseline: L = L_rec(original).
Planted noise (for evaluation of the contribution scores): `task.plant_noise_modality` replaces that
modality's features of a random fraction of items by Gaussian vectors with the original row norms,
drawn once per item (`task.plant_noise_mode` = fixed) or again at every occurrence (resample), or
by the clean features of a random item at every occurrence (swap); the evaluator reports the AUC of
−c (low contribution ⇒ noise) against the planted labels, per position and averaged per item.
With `task.item_scores`, the evaluator also scores the denoised history ("<split>_denoised/...").
Tool: `python -m mmcl.tasks.demure item-scores --workdir W --step S --mode signed [--path-steps K]
--output F.npy`.

`data.source` is '' (data.dir) or arrayrecord:DIR: a webdataset / tfds / parquet stream is refused
in one line, since the task needs random access to the item catalogue (every item's text features,
computed over all items at start-up) and each user's whole interaction history.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines import sources as sources_lib
from data_pipelines.featurize import MODALITIES
from mmcl.config import Config, ConfigError
from mmcl.eval import seqrec
from mmcl.models import seq_transformer
from mmcl.tasks.demure import analysis, evaluate, export
from mmcl.tasks.demure.data import (PLANT_NOISE_MODES, StepCountingIterator, load_item_features,
                                    training_rows)
from mmcl.tasks.demure.loss import demure_loss, lowest_fraction_threshold, noise_flags
from mmcl.tasks.demure.model import DemureModel, DemureNet, ItemFeatures
from mmcl.train.config import data_view
from mmcl.train.task import CorpusExport, Task, TowerExport


# Why `data.source` must be an ArrayRecord dataset (no stream) for this task.
SOURCE_NEEDS = ("random access to the item catalogue (every item's text features, computed over all "
                "items at start-up) and each user's whole interaction history")


class DemureTask(Task):
  """Multi-modal SASRec with gradient×input denoising and a denoised/noisy contrastive term."""

  primary_metric = "valid/full/ndcg@10"

  @classmethod
  def declare_config(cls, c: Config) -> None:
    sources_lib.define_arrayrecord_only(c.data, SOURCE_NEEDS)
    t = c.task
    t.define("modalities", MODALITIES, f"item modalities, a subset of {MODALITIES}")
    t.define("denoise", True, "Demure's denoising (False = the same backbone without it)")
    t.define("contribution", "abs", "contribution score: abs = |⟨∂L/∂x̃, x̃⟩| (the paper), signed "
             "= −⟨∂L/∂x̃, x̃⟩ (first-order loss increase when the token is removed)",
             choices=("abs", "signed"))
    t.define("contribution_path_steps", 1,
             "K: 1 = gradient×input at the input (the paper); K > 1 = integrated gradients "
             "(Sundararajan et al. 2017): the gradient averaged over K midpoints α = (k − ½)/K of "
             "the path from the empty sequence (every modality token scaled by α together) to the "
             "input, times the input. The first-order score misses the saturation of the encoder "
             "(a token's local gradient can point the other way from its effect); the path "
             "average follows L_rec(x) − L_rec(0) and costs K gradient passes")
    t.define("score_normalisation", "sequence",
             "contribution normalisation: sequence = divide by the mean |c| of the (sequence, "
             "modality) (modalities of different scale become comparable); position = the "
             "modality's share Σ-normalised over the token's modalities (removes the position's "
             "overall weight); none", choices=("sequence", "position", "none"))
    t.define("score_pooling", "none",
             "none = per-position scores (the paper); batch_item = each score replaced by the mean "
             "over the batch's occurrences of the same item and modality (an extension: a "
             "stateless smoothing of the per-(item, modality) score over occurrences)",
             choices=("none", "batch_item"))
    t.define("item_scores", "",
             "path of an [N + 1, M] .npy of per-(item, modality) contribution scores, each the "
             "mean over all the training occurrences, from a warm-up checkpoint (`python -m "
             "mmcl.tasks.demure item-scores`); when set, flags come from it instead of from the "
             "per-position scores of the current batch (an extension: the paper scores positions; "
             "'' = the paper)")
    t.define("noise_fraction", 0.2, "ρ: lowest-contribution fraction of (t, m) pairs flagged noise")
    t.define("flag_scope", "sequence",
             "sequence = the lowest ρ of each row's real (t, m) pairs (the paper's rule); global = "
             "one threshold, the ρ-quantile of the table's scores over all the training rows' "
             "real pairs, so a row without noise loses nothing and a short row is not spared "
             "(needs task.item_scores)", choices=("sequence", "global"))
    t.define("cl_weight", 0.1, "λ: weight of InfoNCE(h_denoised, h_noisy)")
    t.define("cl_temperature", 0.1, "τ of that InfoNCE")
    t.define("loss_impl", "auto", "kernel of that InfoNCE (see mmcl.losses): auto, dense, tiled, "
             "fused (Pallas kernels)", choices=("auto", "dense", "tiled", "fused"))
    t.define("cl_positions", "last",
             "where the two views are contrasted: last = the output at the most recent position "
             "(one pair per row; the paper's sequence representation); all = every real position "
             "(the prefix ending there: one pair per position, the other rows' prefixes as "
             "negatives, the same row's other prefixes excluded). L_rec averages over all positions, "
             "so with 'last' the most recent output, the one that ranks at inference, takes the "
             "whole λ·InfoNCE against 1/L of L_rec; 'all' keeps that ratio λ at every position, "
             "as in CL4SRec / DuoRec, which train on each prefix", choices=("last", "all"))
    t.define("cl_stop_gradient", False,
             "True: the denoised view's output is a fixed target of the InfoNCE (no gradient "
             "through it), so the term only teaches the noisy view to agree with the denoised one "
             "and the denoised representation, which L_rec trains, is shaped by L_rec alone; "
             "False = the paper (gradient through both views)")
    t.define("cl_window", 0,
             "with cl_positions = all: contrast only the most recent this many positions (0 = all "
             "L). The InfoNCE's cost grows with (B·window)², and on short-sequence data "
             "(amazon-scientific-unisrec: median 4 training items) a window of 16 holds nearly "
             "every real position of the left-padded rows")
    t.define("flag_after_steps", 0,
             "warm-up: before this global step the loss is plain L_rec(original) (no flags, no "
             "InfoNCE), because the contributions of an untrained model say nothing; 0 = the "
             "paper (flagging from the first step)")
    t.define("lexical_dim", 64, "width of the TF-IDF + SVD features")
    t.define("plant_noise_modality", "", "modality whose features are replaced by random vectors "
             "for a fraction of items ('' = none)")
    t.define("plant_noise_item_fraction", 0.2, "fraction of items given planted noise")
    t.define("plant_noise_seed", 0, "seed of the planted items and vectors")
    t.define("plant_noise_mode", "fixed",
             "how the planted items' features are noised: fixed = one Gaussian vector per item, "
             "drawn once (to the model it is an ID embedding, i.e. informative); resample = a "
             "fresh Gaussian vector of the item's norm at every occurrence in an input sequence "
             "(uninformative); swap = the clean features of a uniformly drawn item at every "
             "occurrence (real content that did not drive the behaviour). Under resample / swap "
             "the candidate (item-table) side uses the expectation of the draw (0 / the mean row)",
             choices=PLANT_NOISE_MODES)
    t.define("plant_noise_side", "both",
             "where resample / swap noise acts: both = in the input sequences, and the candidate "
             "(item-table) side takes the expectation of the draw (the item's features are "
             "corrupt); input = in the input sequences only, the candidates keep their clean "
             "features (the paper's premise: the item's content is real, but this modality did "
             "not drive the user's past interactions with it, so it is noise in the history "
             "only)", choices=("both", "input"))
    t.define("rec_loss", "bce", "L_rec: bce = SASRec's BCE with one sampled negative per position "
             "(the paper's backbone); softmax = cross-entropy over all N items (full softmax, a "
             "stronger backbone for both arms)", choices=("bce", "softmax"))
    t.define("num_candidate_draws", 4, "candidates drawn per position to find an unseen negative")
    seqrec.declare_eval_config(t, ks=(5, 10, 20), num_negatives=0)
    m = c.model
    m.define("hidden", 64, "token / hidden width d")
    m.define("num_blocks", 2, "self-attention blocks")
    m.define("num_heads", 1, "attention heads")
    m.define("dropout", 0.2, "dropout rate")
    m.define("use_id_embedding", False, "add a learned item-ID embedding to the modality tokens")
    seqrec.declare_sequence_data(c)
    c.data.define("text_features", "", "precomputed item text embeddings (X.npy + X.ids.txt keyed "
                "by item_id, from `mmcl features`); '' = TF-IDF + SVD fallback")

  def __init__(self, config: Config, mesh):
    super().__init__(config, mesh)
    try:
      config.data.dir = sources_lib.arrayrecord_dir(config.data.source, config.data.dir,
                                                    needs=SOURCE_NEEDS)
    except sources_lib.SourceConfigError as e:
      raise ConfigError(f"config key 'data.source' = {config.data.source!r}: {e}") from None
    t, d = config.task, config.data
    bad = [m for m in t.modalities if m not in MODALITIES]
    if bad or not t.modalities:
      raise ValueError(f"config key task.modalities = {t.modalities!r}: expected a non-empty "
                       f"subset of {MODALITIES}")
    if t.plant_noise_modality and t.plant_noise_modality not in t.modalities:
      raise ValueError(f"config key task.plant_noise_modality = {t.plant_noise_modality!r} is "
                       f"not one of task.modalities {t.modalities!r}")
    self.num_items = int(records.load_metadata(d.dir, build_hint=pipelines.BUILD_HINT)["num_items"])
    feats, self.noisy_np, occurrence = load_item_features(
        d.dir, self.num_items, t, text_features=d.text_features, seed=config.seed)
    self.item_score_table = None  # [N + 1, M] (task.item_scores) or None
    if t.item_scores:
      table = np.load(t.item_scores)
      if table.shape != (self.num_items + 1, len(t.modalities)):
        raise ValueError(f"config key task.item_scores = {t.item_scores}: shape {table.shape}, "
                         f"expected [N + 1, M] = {(self.num_items + 1, len(t.modalities))}")
      self.item_score_table = table.astype(np.float32)
    if t.cl_window and (t.cl_positions != "all" or not 0 < t.cl_window <= d.max_len):
      raise ValueError(f"config key task.cl_window = {t.cl_window}: expected 0, or 1..data.max_len "
                       f"({d.max_len}) with task.cl_positions = 'all' (is {t.cl_positions!r})")
    m = config.model
    self.net = DemureNet(
        DemureModel(num_modalities=len(feats), num_items=self.num_items, hidden=m.hidden,
                    max_len=d.max_len, num_blocks=m.num_blocks, num_heads=m.num_heads,
                    dropout=m.dropout, use_id_embedding=m.use_id_embedding),
        ItemFeatures(tuple(feats), occurrence, t.plant_noise_mode))
    self.scorer = evaluate.PositionScorer(self.net, t, mesh)
    self.flag_threshold = None  # task.flag_scope = global: flag table scores at or below it
    if t.flag_scope == "global":
      if self.item_score_table is None:
        raise ValueError("config key task.flag_scope = 'global' needs task.item_scores (the "
                         "threshold is a quantile of that table over the training rows)")
      self.flag_threshold = self._global_threshold()

  def _global_threshold(self) -> float:
    """The `task.noise_fraction` quantile of the item-score table over every real (t, m) pair of
    the training rows (task.flag_scope = global)."""
    inputs, _ = self.training_rows()
    scores = self.item_score_table[inputs[inputs != 0]]
    rho = self.config.task.noise_fraction
    threshold = lowest_fraction_threshold(scores, rho)
    share = float((scores <= threshold).mean())
    if share > rho + 0.05:
      # Ties at the threshold (e.g. an oracle table of ±1 with ρ above its planted share, which
      # flags every pair) make the global rule flag far more than ρ.
      logging.getLogger("mmcl.demure").warning(
          "task.flag_scope=global: the threshold %.4g of task.item_scores flags %.3f of the "
          "training pairs, not task.noise_fraction = %.3f (ties at the threshold)",
          threshold, share, rho)
    return threshold

  def training_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """Every user's training row: (inputs, targets), each [U, L] int32 left-padded."""
    user_items = seqrec.load_interactions(self.config.data.dir)[0]
    return training_rows(user_items, self.config.data.max_len)

  # --- data / params -------------------------------------------------------------------------------
  def train_iterator(self, process_index: int, process_count: int):
    it = pipelines.build_train_iterator(data_view(self.config, sequence_mode="next_item"),
                                        process_index=process_index, process_count=process_count)
    return StepCountingIterator(it) if self.config.task.flag_after_steps else it

  def init_params(self, rng: jax.Array):
    return self.net.init(rng)

  # --- the method ----------------------------------------------------------------------------------
  def noise_flags(self, params, inputs, targets=None, negs=None, key=None):
    """`loss.noise_flags` with this run's table and threshold: (flags, valid) [B, L, M] bool."""
    return noise_flags(self.net, params, inputs, self.config.task,
                       item_score_table=self.item_score_table,
                       flag_threshold=self.flag_threshold, targets=targets, negs=negs, key=key)

  def loss(self, params, batch, rng, *, train: bool):
    return demure_loss(self.net, params, batch, rng, self.config.task, self.mesh, train=train,
                       item_score_table=self.item_score_table, flag_threshold=self.flag_threshold)

  def flops_per_example(self) -> float:
    m = self.config.model
    f = seq_transformer.seq_encoder_flops(self.config.data.max_len, m.hidden, m.num_blocks)
    if not self.config.task.denoise:
      return f
    # Two views (one when λ = 0), plus the contribution passes (forward + backward, K of them
    # along the integrated-gradients path) unless the flags come from a table.
    t = self.config.task
    views = 1 if t.cl_weight == 0 else 2
    return f * (views + (0 if t.item_scores else 2 * t.contribution_path_steps))

  # --- evaluation ----------------------------------------------------------------------------------
  def item_table(self, params) -> jax.Array:
    """[N + 1, d] item representations e_i = Σ_m W_m x_i^m (+ ID); row 0 = padding."""
    return self.net.item_table(params)

  def user_embeddings(self, params, history: np.ndarray, denoised: bool = False) -> np.ndarray:
    """history: [U, L] → [U, d] (`evaluate.user_embeddings`; denoised: with the modality tokens
    flagged by `task.item_scores` removed, as in training)."""
    flags_fn = (lambda x: self.noise_flags(params, x)[0]) if denoised else None
    return evaluate.user_embeddings(self.net, params, history, self.config.task, self.mesh,
                                    flags_fn)

  def item_scores(self, params, mode: str | None = None, path_steps: int | None = None):
    """[N + 1, M] table of `task.item_scores` from these parameters (`analysis.item_scores`)."""
    return analysis.item_scores(self.scorer, params, *self.training_rows(), mode, path_steps)

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    t, d = self.config.task, self.config.data
    user_items, num_items = seqrec.load_interactions(d.dir)
    table = self.item_score_table is not None
    out = {"num_items": float(num_items)}
    out.update(evaluate.next_item_metrics(
        self.net, params, user_items, t, self.mesh, d.max_len,
        (lambda x: self.noise_flags(params, x)[0]) if table else None))
    if t.plant_noise_modality:
      inputs, targets = training_rows(user_items, d.max_len)
      out.update(evaluate.noise_detection(
          self.scorer, params, inputs, targets, self.noisy_np,
          (self.item_score_table, np.asarray(self.noise_flags(None, jnp.asarray(inputs))[0]))
          if table else None))
    return out

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    return export.export_towers(self.net, params, self.config.task, self.config.data.dir,
                                self.config.data.max_len)

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    return export.export_corpus(self.net, params, self.config.task, self.mesh,
                                self.config.data.dir, self.config.data.max_len)
