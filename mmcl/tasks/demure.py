"""Demure: denoising multi-modal sequential recommendation (Yao et al., arXiv:2305.01915).

No public code exists; this is our reading of the paper (METHODS.md §3), every piece a config key.
Items are represented by frozen modality features x^m (`task.modalities`):
  text     sentence embeddings of the item text by the pretrained text tower (all-MiniLM-L6-v2,
           precomputed with `mmcl features`, path in `data.text_features`); when that path is
           empty, the TF-IDF + SVD fallback below is used instead;
  lexical  TF-IDF + truncated SVD of the item text (`tfidf_svd`, computed at start-up, seeded),
           a second, lexical view of the same text (the datasets here have no images).
Backbone (1): token x̃_t^m = W_m x_t^m, token_t = Σ_m x̃_t^m (+ optional ID embedding), SASRec's
causal encoder (`mmcl.models.seq_transformer`); the item side scores with e_i = Σ_m W_m x_i^m (+ ID).
L_rec: SASRec's BCE with one sampled negative per position (so the denoising-off ablation is the
same backbone and loss).
Contribution (2): c_{t,m} = |⟨∂L_rec/∂x̃_t^m, x̃_t^m⟩| from a dropout-free pass with the current
parameters (no gradient flows through it), normalised per (user sequence, modality) by its mean over
the sequence's real positions (design choice: modalities of different scale become comparable); in
each sequence the lowest fraction ρ (`task.noise_fraction`) of its (t, m) pairs are flagged noise.
Views (3): denoised = flagged modality tokens removed; noisy = the original sequence.
Loss (4): L = L_rec(denoised) + λ·InfoNCE(h_denoised, h_noisy; τ) with in-batch negatives over the
whole global batch (`mmcl.losses.sharded`), h = L2-normalised output at the most recent position.
`task.denoise = False` gives the baseline: L = L_rec(original).
Planted noise (for evaluation of the contribution scores): `task.plant_noise_modality` replaces that
modality's features of a random fraction of items by Gaussian vectors with the original row norms;
the evaluator reports the AUC of −c (low contribution ⇒ noise) against the planted labels.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines import sequences as seq_lib
from mmcl.config import Config
from mmcl.losses import sharded as sharded_losses
from mmcl.models import seq_transformer
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks import sasrec
from mmcl.train.task import Task

MODALITIES = ("text", "lexical")


# --- modality features ---------------------------------------------------------------------------


def tfidf_svd(texts: list[str], dim: int, *, seed: int = 0, max_vocab: int = 5000) -> np.ndarray:
  """TF-IDF (lower-cased word tokens, smooth idf, L2 rows) → randomized truncated SVD.

  Args:
    texts: N strings.
    dim: output width k (<= min(N, vocabulary)).
  Returns:
    [N, k] float32 = U_k Σ_k (the LSA document vectors), rows L2-normalised.
  """
  docs = [re.findall(r"[a-z0-9]+", t.lower()) for t in texts]
  df: dict[str, int] = {}
  for d in docs:
    for w in set(d):
      df[w] = df.get(w, 0) + 1
  vocab = sorted(df, key=lambda w: (-df[w], w))[:max_vocab]
  index = {w: j for j, w in enumerate(vocab)}
  n = len(texts)
  x = np.zeros((n, len(vocab)), np.float32)
  for i, d in enumerate(docs):
    for w in d:
      j = index.get(w)
      if j is not None:
        x[i, j] += 1.0
  idf = np.log((1 + n) / (1 + np.asarray([df[w] for w in vocab], np.float32))) + 1.0
  x *= idf
  x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
  k = min(dim, *x.shape)
  rng = np.random.default_rng(seed)
  y = x @ rng.normal(size=(x.shape[1], k + 16)).astype(np.float32)
  for _ in range(2):  # power iterations sharpen the spectrum
    y = x @ (x.T @ y)
    y, _ = np.linalg.qr(y)
  q, _ = np.linalg.qr(y)
  u, s, _ = np.linalg.svd(q.T @ x, full_matrices=False)
  out = (q @ u[:, :k]) * s[:k]
  out = np.concatenate([out, np.zeros((n, dim - k), np.float32)], 1) if k < dim else out
  return (out / (np.linalg.norm(out, axis=1, keepdims=True) + 1e-12)).astype(np.float32)


def plant_noise(features: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Replaces the rows of a random `fraction` of items 1..N by Gaussian vectors of equal norm.

  features: [N + 1, D] (row 0 = padding). Returns (features', noisy [N + 1] bool).
  """
  rng = np.random.default_rng(seed)
  n = features.shape[0] - 1
  noisy = np.zeros(n + 1, bool)
  noisy[1 + rng.choice(n, size=int(round(fraction * n)), replace=False)] = True
  out = features.copy()
  g = rng.normal(size=(int(noisy.sum()), features.shape[1])).astype(np.float32)
  norms = np.linalg.norm(features[noisy], axis=1, keepdims=True)
  out[noisy] = g / np.linalg.norm(g, axis=1, keepdims=True) * norms
  return out, noisy


def load_modality_features(data_dir: str, num_items: int, modalities: tuple[str, ...], *,
                           text_features: str, lexical_dim: int, seed: int) -> list[np.ndarray]:
  """Frozen item features per modality: M arrays [N + 1, D_m] float32 (row 0 = padding = 0).

  "text": the precomputed sentence embeddings at `text_features` (config key data.text_features),
  or TF-IDF + SVD when that is ''; "lexical": TF-IDF + SVD of the item text (width lexical_dim).
  """
  texts = None
  feats = []
  for name in modalities:
    if name not in MODALITIES:
      raise ValueError(f"unknown modality {name!r} (config key task.modalities); known: "
                       f"{MODALITIES}")
    if name == "text" and text_features:
      f, avail = pipelines.item_feature_table(data_dir, text_features)
      if not avail[1:].all():
        raise ValueError(f"config key data.text_features = {text_features}: "
                         f"{int((~avail[1:]).sum())} items of {data_dir} have no vector")
    else:
      if texts is None:
        src = records.ArrayRecordSource(data_dir, "items")
        recs = src.read_many(list(range(len(src))))
        src.close()
        texts = [""] * (num_items + 1)
        for r in recs:
          texts[int(r["item_index"])] = r["text"]
      f = np.concatenate([np.zeros((1, lexical_dim), np.float32),
                          tfidf_svd(texts[1:], lexical_dim, seed=seed + (name == "text"))])
    feats.append(np.asarray(f, np.float32))
  return feats


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve of `scores` for binary `labels` (ties get average ranks)."""
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
  n_pos, n_neg = int(labels.sum()), int((~labels).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores))
  sorted_scores = scores[order]
  # Average ranks over ties.
  _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
  avg = first + (counts - 1) / 2.0 + 1.0
  ranks[order] = np.repeat(avg, counts)
  return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def flag_lowest(scores: jax.Array, valid: jax.Array, fraction: float) -> jax.Array:
  """Per row, flags the lowest `fraction` of its valid entries.

  scores: [B, K] float; valid: [B, K] bool. Returns [B, K] bool (floor(fraction · n_valid) per row).
  """
  s = jnp.where(valid, scores, jnp.inf)
  rank = jnp.argsort(jnp.argsort(s, axis=1), axis=1)
  k = jnp.floor(fraction * valid.sum(1, keepdims=True)).astype(rank.dtype)
  return (rank < k) & valid


# --- model ---------------------------------------------------------------------------------------


class DemureModel(nn.Module):
  """Modality projections W_m, optional ID table and the SASRec encoder."""
  num_modalities: int
  num_items: int
  hidden: int
  max_len: int
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2
  use_id_embedding: bool = False

  def setup(self):
    self.proj = [nn.Dense(self.hidden, use_bias=False, kernel_init=seq_transformer.XAVIER,
                          name=f"proj_{m}") for m in range(self.num_modalities)]
    if self.use_id_embedding:
      self.id_embedding = self.param("id_embedding", seq_transformer.XAVIER,
                                     (self.num_items + 1, self.hidden))
    self.encoder = seq_transformer.SequenceEncoder(
        max_len=self.max_len, num_blocks=self.num_blocks, num_heads=self.num_heads,
        dropout=self.dropout, causal=True)

  def modality_tokens(self, feats: tuple[jax.Array, ...]) -> jax.Array:
    """feats: M arrays [..., D_m] → [..., M, d] projected modality tokens x̃^m."""
    return jnp.stack([p(f) for p, f in zip(self.proj, feats)], axis=-2)

  def id_tokens(self, items: jax.Array) -> jax.Array:
    """items: [...] int → [..., d] (zeros without the ID table; row 0 is always zero)."""
    if not self.use_id_embedding:
      return jnp.zeros((*items.shape, self.hidden), jnp.float32)
    return self.id_embedding[items] * (items != 0)[..., None]

  def encode(self, tokens: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
    """tokens: [B, L, d], mask: [B, L] bool → [B, L, d]."""
    return self.encoder(tokens, mask, train=train)

  def __call__(self, feats, items, mask):
    tok = self.modality_tokens(feats).sum(-2) + self.id_tokens(items)
    return self.encode(tok, mask, False)


class DemureTask(Task):
  """Multi-modal SASRec with gradient×input denoising and a denoised/noisy contrastive term."""

  primary_metric = "valid/full/ndcg@10"

  @classmethod
  def declare_config(cls, c: Config) -> None:
    t = c.task
    t.define("modalities", MODALITIES, f"item modalities, a subset of {MODALITIES}")
    t.define("denoise", True, "Demure's denoising (False = the same backbone without it)")
    t.define("contribution", "abs", "contribution score: abs = |⟨∂L/∂x̃, x̃⟩| (the paper), signed "
             "= −⟨∂L/∂x̃, x̃⟩ (first-order loss increase when the token is removed)",
             choices=("abs", "signed"))
    t.define("noise_fraction", 0.2, "ρ: lowest-contribution fraction of (t, m) pairs flagged noise")
    t.define("cl_weight", 0.1, "λ: weight of InfoNCE(h_denoised, h_noisy)")
    t.define("cl_temperature", 0.1, "τ of that InfoNCE")
    t.define("lexical_dim", 64, "width of the TF-IDF + SVD features")
    t.define("plant_noise_modality", "", "modality whose features are replaced by random vectors "
             "for a fraction of items ('' = none)")
    t.define("plant_noise_item_fraction", 0.2, "fraction of items given planted noise")
    t.define("plant_noise_seed", 0, "seed of the planted items and vectors")
    t.define("num_candidate_draws", 4, "candidates drawn per position to find an unseen negative")
    sasrec.declare_eval_config(t, ks=(5, 10, 20), num_negatives=0)
    m = c.model
    m.define("hidden", 64, "token / hidden width d")
    m.define("num_blocks", 2, "self-attention blocks")
    m.define("num_heads", 1, "attention heads")
    m.define("dropout", 0.2, "dropout rate")
    m.define("use_id_embedding", False, "add a learned item-ID embedding to the modality tokens")
    sasrec.declare_sequence_data(c)
    c.data.define("text_features", "", "precomputed item text embeddings (X.npy + X.ids.txt keyed "
                  "by item_id, from `mmcl features`); '' = TF-IDF + SVD fallback")

  def __init__(self, config: Config, mesh):
    super().__init__(config, mesh)
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
    if c.task.plant_noise_modality:
      j = list(c.task.modalities).index(c.task.plant_noise_modality)
      feats[j], noisy[c.task.plant_noise_modality] = plant_noise(
          feats[j], c.task.plant_noise_item_fraction, c.task.plant_noise_seed)
    return feats, noisy

  # --- data / params -------------------------------------------------------------------------------
  def train_iterator(self, process_index: int, process_count: int):
    return pipelines.build_train_iterator(sasrec.data_view(self.config, sequence_mode="next_item"),
                                          process_index=process_index, process_count=process_count)

  def init_params(self, rng: jax.Array):
    length = self.config.data.max_len
    feats = tuple(jnp.zeros((1, length, f.shape[1])) for f in self.features_np)
    return self.model.init(rng, feats, jnp.zeros((1, length), jnp.int32),
                           jnp.ones((1, length), bool))["params"]

  def _feats(self, items: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(f)[items] for f in self.features_np)

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
    """BCE L_rec of a token sequence [B, L, d] → (mean loss, sum loss, h [B, L, d])."""
    h = self._apply(params, DemureModel.encode, tokens, inputs != 0, train, train=train, rng=rng)
    weight = (targets != 0).astype(jnp.float32)
    pos, neg = jnp.sum(h * table[targets], -1), jnp.sum(h * table[negs], -1)
    per = (jax.nn.softplus(-pos) + jax.nn.softplus(neg)) * weight
    return per.sum() / jnp.maximum(weight.sum(), 1.0), per.sum(), h

  def contributions(self, params, inputs, targets, negs, mode: str | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """Normalised gradient×input scores of the original sequence.

    mode (default `task.contribution`): "abs" c = |⟨g, x̃⟩| (the paper's magnitude); "signed"
    c = −⟨g, x̃⟩, the first-order increase of L_rec when the token is removed (x̃ → 0), so a token
    that hurts the prediction scores below one that is merely unused.
    inputs, targets, negs: [B, L] int32. Returns (c [B, L, M] float32 divided per (sequence,
    modality) by the mean |c| over its real positions, valid [B, L, M] bool = real positions).
    """
    mode = mode or self.config.task.contribution
    params = jax.lax.stop_gradient(params)
    table = self.item_table(params)
    xt = self._apply(params, DemureModel.modality_tokens, self._feats(inputs))  # [B, L, M, d]
    ids = self._apply(params, DemureModel.id_tokens, inputs)

    def total(xt):
      return self._rec_loss(params, xt.sum(-2) + ids, inputs, targets, negs, table, train=False,
                            rng=None)[1]
    g = jax.grad(total)(xt)
    c = -jnp.sum(g * xt, -1)
    if mode == "abs":
      c = jnp.abs(c)
    valid = jnp.broadcast_to((inputs != 0)[..., None], c.shape)
    mean = jnp.sum(jnp.abs(c) * valid, 1, keepdims=True) / jnp.maximum(valid.sum(1, keepdims=True),
                                                                       1)
    return jax.lax.stop_gradient(c / (mean + 1e-12)), valid

  def loss(self, params, batch, rng, *, train: bool):
    t = self.config.task
    inputs, targets = batch["inputs"], batch["targets"]
    k_neg, k_d, k_n = jax.random.split(rng, 3)
    seen = jnp.concatenate([inputs, targets], axis=1)
    negs = sasrec.sample_train_negatives(k_neg, seen, targets.shape, self.num_items,
                                         t.num_candidate_draws)
    table = self.item_table(params)
    xt = self._apply(params, DemureModel.modality_tokens, self._feats(inputs))  # [B, L, M, d]
    ids = self._apply(params, DemureModel.id_tokens, inputs)
    noisy_tokens = xt.sum(-2) + ids
    if not t.denoise:
      loss, _, _ = self._rec_loss(params, noisy_tokens, inputs, targets, negs, table, train=train,
                                  rng=k_d)
      return loss, {"rec_loss": loss}
    c, valid = self.contributions(params, inputs, targets, negs)
    b, length, m = c.shape
    flags = flag_lowest(c.reshape(b, length * m), valid.reshape(b, length * m),
                        t.noise_fraction).reshape(b, length, m)
    denoised_tokens = (xt * (~flags)[..., None]).sum(-2) + ids
    rec, _, h_d = self._rec_loss(params, denoised_tokens, inputs, targets, negs, table,
                                 train=train, rng=k_d)
    h_n = self._apply(params, DemureModel.encode, noisy_tokens, inputs != 0, train, train=train,
                      rng=k_n)
    row_ok = inputs[:, -1] != 0
    cl = sharded_losses.infonce_over_mesh(
        _unit(h_d[:, -1]), _unit(h_n[:, -1]), self.mesh, logit_scale=1.0 / t.cl_temperature,
        a_valid=row_ok, b_valid=row_ok)
    metrics = {"rec_loss": rec, "cl_loss": cl,
               "flagged_fraction": flags.sum() / jnp.maximum(valid.sum(), 1)}
    return rec + t.cl_weight * cl, metrics

  def flops_per_example(self) -> float:
    m = self.config.model
    f = seq_transformer.seq_encoder_flops(self.config.data.max_len, m.hidden, m.num_blocks)
    return f * (4 if self.config.task.denoise else 1)

  # --- evaluation ----------------------------------------------------------------------------------
  def user_embeddings(self, params, history: np.ndarray) -> np.ndarray:
    """history: [U, L] → [U, d] outputs at the most recent position of the original sequence."""
    def fn(x):
      tok = self._apply(params, DemureModel.modality_tokens, self._feats(x)).sum(-2)
      tok = tok + self._apply(params, DemureModel.id_tokens, x)
      return self._apply(params, DemureModel.encode, tok, x != 0, False)[:, -1]
    return sasrec.embed_rows(jax.jit(fn, out_shardings=mesh_lib.replicated(self.mesh)),
                             [history], self.mesh, self.config.task.eval_batch_size)

  def noise_detection(self, params, user_items: list[np.ndarray]) -> dict[str, float]:
    """AUC of −c against the planted noise labels over the training rows' real (t, m) pairs,
    and the precision of the flags (share of flagged pairs that are planted noise)."""
    t = self.config.task
    if not t.plant_noise_modality:
      return {}
    pairs = [seq_lib.next_item_example(s, self.config.data.max_len) for s in user_items]
    inputs = np.stack([p[0] for p in pairs])
    targets = np.stack([p[1] for p in pairs])

    m = len(t.modalities)
    j = list(t.modalities).index(t.plant_noise_modality)
    valid = np.broadcast_to((inputs != 0)[..., None], (*inputs.shape, m))
    labels = np.zeros(valid.shape, bool)
    labels[..., j] = self.noisy_np[t.plant_noise_modality][inputs]
    out = {"noise/planted_share": float(labels[valid].mean())}
    for mode in ("abs", "signed"):
      def fn(x, y, mode=mode):
        seen = jnp.concatenate([x, y], axis=1)
        negs = sasrec.sample_train_negatives(jax.random.PRNGKey(t.eval_seed), seen, y.shape,
                                             self.num_items, t.num_candidate_draws)
        c, _ = self.contributions(params, x, y, negs, mode)
        return c.reshape(c.shape[0], -1)
      c = sasrec.embed_rows(jax.jit(fn, out_shardings=mesh_lib.replicated(self.mesh)),
                            [inputs, targets], self.mesh, 256).reshape(valid.shape)
      flags = np.asarray(flag_lowest(jnp.asarray(c.reshape(len(c), -1)),
                                     jnp.asarray(valid.reshape(len(c), -1)),
                                     t.noise_fraction)).reshape(c.shape)
      tag = "" if mode == t.contribution else f"_{mode}"
      out[f"noise/auc{tag}"] = roc_auc(-c[valid], labels[valid])
      out[f"noise/auc_within_{t.plant_noise_modality}{tag}"] = roc_auc(
          -c[..., j][valid[..., j]], labels[..., j][valid[..., j]])
      out[f"noise/flag_precision{tag}"] = (float(labels[flags].mean()) if flags.any()
                                           else float("nan"))
    return out

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    t = self.config.task
    user_items, num_items = sasrec.load_interactions(self.config.data.dir)
    item_emb = np.asarray(self.item_table(params))
    out: dict[str, float] = {"num_items": float(num_items)}
    for split in t.eval_splits:
      users, history, target = sasrec.eval_cases(user_items, split, self.config.data.max_len)
      q = self.user_embeddings(params, history)
      out.update(sasrec.next_item_metrics(
          q, item_emb, target, [user_items[u] for u in users], ks=t.eval_ks,
          num_negatives=t.eval_num_negatives, max_users=t.eval_max_users, seed=t.eval_seed,
          full_ranking=t.eval_full_ranking, mesh=self.mesh, prefix=split))
    out.update(self.noise_detection(params, user_items))
    return out


def _unit(x: jax.Array) -> jax.Array:
  """[B, D] → rows of unit norm."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-12)
