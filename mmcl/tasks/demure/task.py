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
from data_pipelines import sequences as seq_lib
from data_pipelines.featurize import MODALITIES, load_modality_features
from data_pipelines import sources as sources_lib
from mmcl.config import Config, ConfigError
from mmcl.eval import seqrec
from mmcl.export import sequences
from mmcl.losses import sharded as sharded_losses
from mmcl.losses.negatives import sample_train_negatives
from mmcl.models import seq_transformer
from mmcl.models.layers import l2_normalize
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks.demure.data import (PLANT_NOISE_MODES, StepCountingIterator, per_occurrence_noise,
                                    plant_noise, planted_item_side)
from mmcl.tasks.demure.evaluate import pool_by_item, roc_auc
from mmcl.tasks.demure.loss import flag_lowest, lowest_fraction_threshold
from mmcl.tasks.demure.model import DemureModel
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
    t = config.task
    bad = [m for m in t.modalities if m not in MODALITIES]
    if bad or not t.modalities:
      raise ValueError(f"config key task.modalities = {t.modalities!r}: expected a non-empty "
                       f"subset of {MODALITIES}")
    if t.plant_noise_modality and t.plant_noise_modality not in t.modalities:
      raise ValueError(f"config key task.plant_noise_modality = {t.plant_noise_modality!r} is "
                       f"not one of task.modalities {t.modalities!r}")
    meta = records.load_metadata(config.data.dir, build_hint=pipelines.BUILD_HINT)
    self.num_items = int(meta["num_items"])
    feats, noisy = self._load_features()
    self._score_fns = {}  # (mode, normalisation, pooling) -> jitted scoring (evaluation)
    self.item_score_table = None  # [N + 1, M] (task.item_scores) or None
    if t.item_scores:
      table = np.load(t.item_scores)
      if table.shape != (self.num_items + 1, len(t.modalities)):
        raise ValueError(f"config key task.item_scores = {t.item_scores}: shape {table.shape}, "
                         f"expected [N + 1, M] = {(self.num_items + 1, len(t.modalities))}")
      self.item_score_table = table.astype(np.float32)
    if t.cl_window and (t.cl_positions != "all" or not 0 < t.cl_window <= config.data.max_len):
      raise ValueError(f"config key task.cl_window = {t.cl_window}: expected 0, or 1..data.max_len "
                       f"({config.data.max_len}) with task.cl_positions = 'all' (is "
                       f"{t.cl_positions!r})")
    self.flag_threshold = None  # task.flag_scope = global: flag table scores at or below it
    if t.flag_scope == "global":
      if self.item_score_table is None:
        raise ValueError("config key task.flag_scope = 'global' needs task.item_scores (the "
                         "threshold is a quantile of that table over the training rows)")
      self.flag_threshold = self._global_threshold()
    self.features_np = feats
    self.noisy_np = noisy  # name -> [N + 1] bool (planted), for the evaluator's AUC
    m = config.model
    self.model = DemureModel(num_modalities=len(feats), num_items=self.num_items, hidden=m.hidden,
                             max_len=config.data.max_len, num_blocks=m.num_blocks,
                             num_heads=m.num_heads, dropout=m.dropout,
                             use_id_embedding=m.use_id_embedding)

  def _load_features(self) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    c = self.config
    feats = load_modality_features(c.data.dir, self.num_items, c.task.modalities,
                                   text_features=c.data.text_features,
                                   lexical_dim=c.task.lexical_dim, seed=c.seed)
    noisy = {}
    # Per-occurrence planting (task.plant_noise_mode resample / swap): modality index → (clean
    # table, planted-item mask, clean norms) that the input side draws from at every occurrence.
    self.occurrence_noise: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if c.task.plant_noise_modality:
      j = list(c.task.modalities).index(c.task.plant_noise_modality)
      planted, mask = plant_noise(feats[j], c.task.plant_noise_item_fraction,
                                  c.task.plant_noise_seed)
      noisy[c.task.plant_noise_modality] = mask
      if c.task.plant_noise_mode == "fixed":
        if c.task.plant_noise_side != "both":
          raise ValueError("config key task.plant_noise_side = 'input' needs noise drawn at every "
                           "occurrence (task.plant_noise_mode resample or swap), not 'fixed'")
        feats[j] = planted
      else:
        self.occurrence_noise[j] = (feats[j], mask, np.linalg.norm(feats[j], axis=1))
        if c.task.plant_noise_side == "both":
          feats[j] = planted_item_side(feats[j], mask, c.task.plant_noise_mode)
    return feats, noisy

  def _global_threshold(self) -> float:
    """The `task.noise_fraction` quantile of the item-score table over every real (t, m) pair of
    the training rows (task.flag_scope = global)."""
    inputs, _ = self.training_rows(seqrec.load_interactions(self.config.data.dir)[0])
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

  # --- data / params -------------------------------------------------------------------------------
  def train_iterator(self, process_index: int, process_count: int):
    it = pipelines.build_train_iterator(data_view(self.config, sequence_mode="next_item"),
                                        process_index=process_index, process_count=process_count)
    return StepCountingIterator(it) if self.config.task.flag_after_steps else it

  def init_params(self, rng: jax.Array):
    length = self.config.data.max_len
    feats = tuple(jnp.zeros((1, length, f.shape[1])) for f in self.features_np)
    return self.model.init(rng, feats, jnp.zeros((1, length), jnp.int32),
                           jnp.ones((1, length), bool))["params"]

  def _feats(self, items: jax.Array) -> tuple[jax.Array, ...]:
    """Candidate-side features: M arrays [..., D_m] (the item table's rows)."""
    return tuple(jnp.asarray(f)[items] for f in self.features_np)

  def _input_feats(self, items: jax.Array, key: jax.Array | None) -> tuple[jax.Array, ...]:
    """Input-sequence features: as `_feats`, except that a per-occurrence planted modality
    (task.plant_noise_mode resample / swap) gets a fresh draw for every (row, position) from `key`.
    items: [B, L] int32 → M arrays [B, L, D_m]."""
    feats = list(self._feats(items))
    for j, (clean, mask, norms) in self.occurrence_noise.items():
      k = jax.random.fold_in(jax.random.PRNGKey(0) if key is None else key, j)
      feats[j] = per_occurrence_noise(k, items, jnp.asarray(clean), jnp.asarray(mask),
                                      jnp.asarray(norms, jnp.float32),
                                      self.config.task.plant_noise_mode)
    return tuple(feats)

  def _apply(self, params, method, *args, train=False, rng=None):
    return self.model.apply({"params": params}, *args, method=method,
                            rngs={"dropout": rng} if train else None)

  def item_table(self, params) -> jax.Array:
    """[N + 1, d] item representations e_i = Σ_m W_m x_i^m (+ ID); row 0 = padding."""
    items = jnp.arange(self.num_items + 1)
    tok = self._apply(params, DemureModel.modality_tokens, self._feats(items)).sum(-2)
    return (tok + self._apply(params, DemureModel.id_tokens, items)).at[0].set(0.0)

  # --- the method ----------------------------------------------------------------------------------
  def _rec_loss(self, params, tokens, inputs, targets, negs, table, *, train, rng):
    """L_rec of a token sequence [B, L, d] → (mean loss, sum loss, h [B, L, d]).

    task.rec_loss "bce": −log σ(h·e_target) − log(1 − σ(h·e_neg)) per position (SASRec);
    "softmax": −log softmax_i(h·e_i)[target] over the N real items (negs unused).
    """
    h = self._apply(params, DemureModel.encode, tokens, inputs != 0, train, train=train, rng=rng)
    weight = (targets != 0).astype(jnp.float32)
    if self.config.task.rec_loss == "softmax":
      logits = jnp.einsum("bld,nd->bln", h, table[1:])
      pos = jnp.take_along_axis(logits, jnp.maximum(targets - 1, 0)[..., None], -1)[..., 0]
      per = (jax.nn.logsumexp(logits, -1) - pos) * weight
    else:
      pos, neg = jnp.sum(h * table[targets], -1), jnp.sum(h * table[negs], -1)
      per = (jax.nn.softplus(-pos) + jax.nn.softplus(neg)) * weight
    return per.sum() / jnp.maximum(weight.sum(), 1.0), per.sum(), h

  def contributions(self, params, inputs, targets, negs, mode: str | None = None,
                    key: jax.Array | None = None, normalisation: str | None = None,
                    pooling: str | None = None, path_steps: int | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """Normalised gradient×input scores of the original sequence.

    mode (default `task.contribution`): "abs" c = |⟨g, x̃⟩| (the paper's magnitude); "signed"
    c = −⟨g, x̃⟩, the first-order increase of L_rec when the token is removed (x̃ → 0), so a token
    that hurts the prediction scores below one that is merely unused.
    path_steps (default `task.contribution_path_steps`) K: g = ∂L/∂x̃ at the input when K = 1;
    else the mean of ∂L/∂x̃ at α·x̃ (all modality tokens of the row scaled together) over the
    midpoints α = (k − ½)/K, k = 1..K (integrated gradients from the empty sequence).
    normalisation (default `task.score_normalisation`): "sequence" divides c per (sequence,
    modality) by the mean |c| over its real positions; "position" divides c_{t,m} by
    Σ_m' |c_{t,m'}| (the modality's share of its token, which removes the position's overall
    weight); "none" keeps c.
    pooling (default `task.score_pooling`): "none" keeps per-position scores (the paper);
    "batch_item" replaces each score by the mean over the batch's occurrences of the same item
    in the same modality (a stateless smoothing over occurrences).
    inputs, targets, negs: [B, L] int32; key: the draw of per-occurrence planted noise (the same
    key as the views', so the scores are those of the tokens the model sees).
    Returns (c [B, L, M] float32, valid [B, L, M] bool = real positions).
    """
    mode = mode or self.config.task.contribution
    normalisation = normalisation or self.config.task.score_normalisation
    pooling = pooling or self.config.task.score_pooling
    steps = path_steps or self.config.task.contribution_path_steps
    if steps < 1:
      raise ValueError(f"config key task.contribution_path_steps = {steps}: expected ≥ 1")
    params = jax.lax.stop_gradient(params)
    table = self.item_table(params)
    xt = self._apply(params, DemureModel.modality_tokens,
                     self._input_feats(inputs, key))  # [B, L, M, d]
    ids = self._apply(params, DemureModel.id_tokens, inputs)

    def total(xt):
      return self._rec_loss(params, xt.sum(-2) + ids, inputs, targets, negs, table, train=False,
                            rng=None)[1]
    if steps == 1:
      g = jax.grad(total)(xt)
    else:
      g = jax.lax.fori_loop(
          0, steps, lambda k, acc: acc + jax.grad(total)((k + 0.5) / steps * xt),
          jnp.zeros_like(xt)) / steps
    c = -jnp.sum(g * xt, -1)
    if mode == "abs":
      c = jnp.abs(c)
    valid = jnp.broadcast_to((inputs != 0)[..., None], c.shape)
    if normalisation == "sequence":
      c = c / (jnp.sum(jnp.abs(c) * valid, 1, keepdims=True)
               / jnp.maximum(valid.sum(1, keepdims=True), 1) + 1e-12)
    elif normalisation == "position":
      c = c / (jnp.sum(jnp.abs(c), -1, keepdims=True) + 1e-12)
    elif normalisation != "none":
      raise ValueError(f"config key task.score_normalisation = {normalisation!r}: expected "
                       "sequence, position or none")
    if pooling == "batch_item":
      m = c.shape[-1]
      flat_items = inputs.reshape(-1)
      w = valid.reshape(-1, m).astype(c.dtype)
      sums = jnp.zeros((self.num_items + 1, m), c.dtype).at[flat_items].add(c.reshape(-1, m) * w)
      counts = jnp.zeros((self.num_items + 1, m), c.dtype).at[flat_items].add(w)
      c = (sums / jnp.maximum(counts, 1.0))[inputs]
    elif pooling != "none":
      raise ValueError(f"config key task.score_pooling = {pooling!r}: expected none or batch_item")
    return jax.lax.stop_gradient(c), valid

  def noise_flags(self, params, inputs, targets=None, negs=None, key=None
                  ) -> tuple[jax.Array, jax.Array]:
    """The weak noise labels (2): per row, the lowest `task.noise_fraction` of its real (t, m)
    pairs by score — the `task.item_scores` table when set (then targets / negs are not needed),
    else the per-position contributions of this batch; with task.flag_scope = global, the pairs
    whose table score is at or below the global threshold instead.

    inputs, targets, negs: [B, L] int32; key: the planted-noise draw of the batch.
    Returns (flags [B, L, M] bool, valid [B, L, M] bool).
    """
    if self.item_score_table is not None:
      c = jnp.asarray(self.item_score_table)[inputs]
      valid = jnp.broadcast_to((inputs != 0)[..., None], c.shape)
    else:
      c, valid = self.contributions(params, inputs, targets, negs, key=key)
    if self.flag_threshold is not None:
      return (c <= self.flag_threshold) & valid, valid
    b, length, m = c.shape
    flags = flag_lowest(c.reshape(b, length * m), valid.reshape(b, length * m),
                        self.config.task.noise_fraction).reshape(b, length, m)
    return flags, valid

  def loss(self, params, batch, rng, *, train: bool):
    t = self.config.task
    inputs, targets = batch["inputs"], batch["targets"]
    k_neg, k_d, k_n, k_noise = jax.random.split(rng, 4)
    seen = jnp.concatenate([inputs, targets], axis=1)
    negs = sample_train_negatives(k_neg, seen, targets.shape, self.num_items,
                                         t.num_candidate_draws)
    table = self.item_table(params)
    xt = self._apply(params, DemureModel.modality_tokens,
                     self._input_feats(inputs, k_noise))  # [B, L, M, d]
    ids = self._apply(params, DemureModel.id_tokens, inputs)
    noisy_tokens = xt.sum(-2) + ids
    if not t.denoise:
      loss, _, _ = self._rec_loss(params, noisy_tokens, inputs, targets, negs, table, train=train,
                                  rng=k_d)
      return loss, {"rec_loss": loss}
    flags, valid = self.noise_flags(params, inputs, targets, negs, k_noise)
    cl_weight = jnp.asarray(t.cl_weight, jnp.float32)
    if t.flag_after_steps:
      if "step" not in batch:
        raise ValueError("config key task.flag_after_steps > 0 needs the batch's 'step' (added by "
                         "DemureTask.train_iterator); this batch has none")
      on = batch["step"][0] >= t.flag_after_steps
      flags = flags & on
      cl_weight = cl_weight * on
    denoised_tokens = (xt * (~flags)[..., None]).sum(-2) + ids
    rec, _, h_d = self._rec_loss(params, denoised_tokens, inputs, targets, negs, table,
                                 train=train, rng=k_d)
    metrics = {"rec_loss": rec, "flagged_fraction": flags.sum() / jnp.maximum(valid.sum(), 1)}
    if t.cl_weight == 0:
      # λ = 0 (the denoised-input ablation): the noisy view would only feed a term of weight 0,
      # so it is not encoded (a third of the step's cost).
      return rec, metrics
    h_n = self._apply(params, DemureModel.encode, noisy_tokens, inputs != 0, train, train=train,
                      rng=k_n)
    if t.cl_stop_gradient:
      h_d = jax.lax.stop_gradient(h_d)
    if t.cl_positions == "all":
      window = t.cl_window or inputs.shape[1]
      h_d, h_n = h_d[:, -window:], h_n[:, -window:]  # rows are left-padded: the newest last
      b, length, d = h_d.shape
      real = (inputs[:, -window:] != 0).reshape(b * length)
      cl = sharded_losses.infonce_over_mesh(
          l2_normalize(h_d.reshape(b * length, d)), l2_normalize(h_n.reshape(b * length, d)), self.mesh,
          logit_scale=1.0 / t.cl_temperature, a_valid=real, b_valid=real,
          group_ids=jnp.repeat(jnp.arange(b, dtype=jnp.int32), length), impl=t.loss_impl)
    else:
      row_ok = inputs[:, -1] != 0
      cl = sharded_losses.infonce_over_mesh(
          l2_normalize(h_d[:, -1]), l2_normalize(h_n[:, -1]), self.mesh, logit_scale=1.0 / t.cl_temperature,
          a_valid=row_ok, b_valid=row_ok, impl=t.loss_impl)
    metrics["cl_loss"] = cl
    return rec + cl_weight * cl, metrics

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
  def user_embeddings(self, params, history: np.ndarray, denoised: bool = False) -> np.ndarray:
    """history: [U, L] → [U, d] outputs at the most recent position of the original sequence
    (denoised: with the modality tokens flagged by `task.item_scores` removed, as in training)."""
    t = self.config.task
    key = jax.random.PRNGKey(t.eval_seed)

    def fn(x):
      xt = self._apply(params, DemureModel.modality_tokens, self._input_feats(x, key))
      if denoised:
        xt = xt * (~self.noise_flags(params, x)[0])[..., None]
      tok = xt.sum(-2) + self._apply(params, DemureModel.id_tokens, x)
      return self._apply(params, DemureModel.encode, tok, x != 0, False)[:, -1]
    return mesh_lib.embed_rows(jax.jit(fn, out_shardings=mesh_lib.replicated(self.mesh)),
                             [history], self.mesh, self.config.task.eval_batch_size)

  def training_rows(self, user_items: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every user's training row (the history without its valid/test items): (inputs, targets),
    each [U, L] int32 left-padded."""
    pairs = [seq_lib.next_item_example(s, self.config.data.max_len) for s in user_items]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

  def position_scores(self, params, inputs: np.ndarray, targets: np.ndarray,
                      mode: str | None = None, normalisation: str | None = None,
                      pooling: str = "none", path_steps: int | None = None) -> np.ndarray:
    """Contributions (see `contributions`; pooling over chunks of 256 rows) of the given rows,
    with fixed evaluation draws (negatives, planted noise). inputs, targets: [R, L] →
    [R, L, M] float32."""
    t = self.config.task
    mode = mode or t.contribution
    normalisation = normalisation or t.score_normalisation
    path_steps = path_steps or t.contribution_path_steps
    variant = (mode, normalisation, pooling, path_steps)
    if variant not in self._score_fns:  # params are an argument: one compilation per variant

      def fn(p, x, y):
        seen = jnp.concatenate([x, y], axis=1)
        negs = sample_train_negatives(jax.random.PRNGKey(t.eval_seed), seen, y.shape,
                                             self.num_items, t.num_candidate_draws)
        c, _ = self.contributions(p, x, y, negs, mode, key=jax.random.PRNGKey(t.eval_seed + 1),
                                  normalisation=normalisation, pooling=pooling,
                                  path_steps=path_steps)
        return c.reshape(c.shape[0], -1)
      self._score_fns[variant] = jax.jit(fn, out_shardings=mesh_lib.replicated(self.mesh))
    score = self._score_fns[variant]
    c = mesh_lib.embed_rows(lambda x, y: score(params, x, y), [inputs, targets], self.mesh, 256)
    return c.reshape(*inputs.shape, len(t.modalities))

  def item_scores(self, params, user_items: list[np.ndarray], mode: str | None = None,
                  path_steps: int | None = None) -> np.ndarray:
    """[N + 1, M] mean contribution of every (item, modality) over the training rows (the table
    that `task.item_scores` reads)."""
    inputs, targets = self.training_rows(user_items)
    return pool_by_item(self.position_scores(params, inputs, targets, mode,
                                             path_steps=path_steps), inputs, self.num_items)

  def planted_labels(self, inputs: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """inputs: [R, T] item ids (0 = padding) → (j, valid, labels): j the planted modality's index;
    valid [R, T, M] bool the real (position, modality) pairs; labels [R, T, M] bool the planted ones."""
    t = self.config.task
    j = list(t.modalities).index(t.plant_noise_modality)
    valid = np.broadcast_to((inputs != 0)[..., None], (*inputs.shape, len(t.modalities)))
    labels = np.zeros(valid.shape, bool)
    labels[..., j] = self.noisy_np[t.plant_noise_modality][inputs]
    return j, valid, labels

  def oracle_scores(self) -> np.ndarray:
    """[N + 1, M] float32 table (the `task.item_scores` format): −1 for every planted (item,
    modality), +1 elsewhere, so that flags from it take the planted pairs first (oracle flags:
    the ceiling of what the denoised view can gain)."""
    t = self.config.task
    if not t.plant_noise_modality:
      raise ValueError("oracle scores need planted noise: config key task.plant_noise_modality "
                       "is empty")
    table = np.ones((self.num_items + 1, len(t.modalities)), np.float32)
    table[self.noisy_np[t.plant_noise_modality], list(t.modalities).index(
        t.plant_noise_modality)] = -1.0
    return table

  def score_variant_detection(self, params, user_items: list[np.ndarray]) -> dict[str, float]:
    """Noise AUC (over all real (t, m) pairs, and within the planted modality) of every score
    variant: mode × normalisation with per-position scores, plus batch pooling and the average
    over all occurrences of the sequence-normalised scores. A diagnostic (`score-auc` command)."""
    inputs, targets = self.training_rows(user_items)
    j, valid, labels = self.planted_labels(inputs)
    out = {}
    for mode in ("abs", "signed"):
      for norm, pool in (("none", "none"), ("sequence", "none"), ("position", "none"),
                         ("sequence", "batch_item"), ("sequence", "all_items")):
        c = self.position_scores(params, inputs, targets, mode, norm,
                                 "none" if pool == "all_items" else pool)
        if pool == "all_items":
          c = pool_by_item(c, inputs, self.num_items)[inputs]
        name = f"{mode}/{norm}/{pool}"
        out[f"{name}/auc"] = roc_auc(-c[valid], labels[valid])
        within = valid[..., j]
        out[f"{name}/auc_within"] = roc_auc(-c[..., j][within], labels[..., j][within])
    return out

  def noise_detection(self, params, user_items: list[np.ndarray]) -> dict[str, float]:
    """Detection of the planted noise over the training rows' real (t, m) pairs: AUC of −c
    against the planted labels and flag precision (share of flagged pairs that are planted),
    for per-position scores ("abs" and "signed"), for those scores averaged per (item, modality)
    over all occurrences ("_item"), and for the `task.item_scores` table when one is set
    ("_table")."""
    t = self.config.task
    if not t.plant_noise_modality:
      return {}
    inputs, targets = self.training_rows(user_items)
    j, valid, labels = self.planted_labels(inputs)
    out = {"noise/planted_share": float(labels[valid].mean())}

    def detection(c, tag, flags=None):
      if flags is None:
        flags = np.asarray(flag_lowest(jnp.asarray(c.reshape(len(c), -1)),
                                       jnp.asarray(valid.reshape(len(c), -1)),
                                       t.noise_fraction)).reshape(c.shape)
      out[f"noise/auc{tag}"] = roc_auc(-c[valid], labels[valid])
      out[f"noise/auc_within_{t.plant_noise_modality}{tag}"] = roc_auc(
          -c[..., j][valid[..., j]], labels[..., j][valid[..., j]])
      out[f"noise/flag_precision{tag}"] = (float(labels[flags].mean()) if flags.any()
                                           else float("nan"))
    for mode in ("abs", "signed"):
      c = self.position_scores(params, inputs, targets, mode)
      tag = "" if mode == t.contribution else f"_{mode}"
      detection(c, tag)
      detection(pool_by_item(c, inputs, self.num_items)[inputs], f"{tag}_item")
    if self.item_score_table is not None:
      # The flags training uses (noise_flags: per row, or task.flag_scope = global).
      detection(self.item_score_table[inputs], "_table",
                np.asarray(self.noise_flags(None, jnp.asarray(inputs))[0]))
    return out

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    t = self.config.task
    user_items, num_items = seqrec.load_interactions(self.config.data.dir)
    item_emb = np.asarray(self.item_table(params))
    out: dict[str, float] = {"num_items": float(num_items)}
    for split in t.eval_splits:
      users, history, target = seqrec.eval_cases(user_items, split, self.config.data.max_len)
      # With an item-score table the denoised history is scored too ("<split>_denoised/..."):
      # which of the two is used is chosen on the validation split.
      for denoised in (False, True) if self.item_score_table is not None else (False,):
        q = self.user_embeddings(params, history, denoised=denoised)
        out.update(seqrec.next_item_metrics(
            q, item_emb, target, [user_items[u] for u in users], ks=t.eval_ks,
            num_negatives=t.eval_num_negatives, max_users=t.eval_max_users, seed=t.eval_seed,
            full_ranking=t.eval_full_ranking, mesh=self.mesh,
            prefix=f"{split}_denoised" if denoised else split))
    out.update(self.noise_detection(params, user_items))
    return out

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    """As SASRec's (`mmcl.export.sequences`): "user", a history of item ids → the output at
    the most recent position of the original sequence (`user_embeddings`, the frozen modality
    features embedded in the artifact), and "item", an item id → e_i = Σ_m W_m x_i^m (+ ID)."""
    key = jax.random.PRNGKey(self.config.task.eval_seed)

    def user(p, x):  # = user_embeddings(..., denoised=False)
      xt = self._apply(p, DemureModel.modality_tokens, self._input_feats(x, key))
      tok = xt.sum(-2) + self._apply(p, DemureModel.id_tokens, x)
      return self._apply(p, DemureModel.encode, tok, x != 0, False)[:, -1]

    return sequences.sequence_export_towers(
        user, np.asarray(self.item_table(params)), max_len=self.config.data.max_len,
        vocabulary=sequences.item_vocabulary_file(self.config.data.dir, self.num_items),
        example=seqrec.histories_of_test_users(self.config.data.dir, self.config.data.max_len)[:8])

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    """Every item (e_i), queried by the users of the test split."""
    history = seqrec.histories_of_test_users(self.config.data.dir, self.config.data.max_len)
    return sequences.sequence_export_corpus(
        np.asarray(self.item_table(params)),
        sequences.item_vocabulary_file(self.config.data.dir, self.num_items),
        self.user_embeddings(params, history))
