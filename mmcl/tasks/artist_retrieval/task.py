"""Cross-modal artist retrieval with missing modalities (Ferraro et al. 2023, arXiv:2308.06556).

Data: an artist dataset from `data_pipelines.recipes.artists` (SAS ⋈ hetrec: `cf`, `tags`, `text` with
availability bits; splits train / validation / catalogue, ground truth in the metadata).
Batch: {m} [B, D_m] float32, has_{m} [B] bool, artist [B] int32 (rows sharing an artist number are
copies from oversampling and are kept out of each other's negatives).
Model: one projector per modality, g_m: d_m → 512 → D (ReLU, dropout 0.3, LayerNorm) then L2 norm;
the encoders are frozen (the inputs are precomputed embeddings), so only the projectors train.
Loss: for every modality pair (m, n), symmetric InfoNCE between g_m(e^m) and g_n(e^n) over the
rows with both modalities, negatives the whole global batch, τ = 0.1; a pair with < 2 valid rows
contributes nothing; the mean over contributing pairs (`mmcl.losses.multimodal_infonce`).
Options (the paper's multi-positive option, remedies for a small modality; all off by default):
  * `task.positives="neighbours"`: the multi-positive loss (`multi_positive_infonce`). For each
    pair (m, n), anchor row i (has m) has as positives its own n vector (weight 1) and the n
    vectors of its ground-truth similar artists in the batch (weight `task.neighbour_weight`),
    over a softmax whose candidates are every row with n (copies of artist i left out):
      ℓ_i = −Σ_j w_ij log softmax_j(s·<g_m(e_i), g_n(e_j)>) / Σ_j w_ij
    in both directions; the pair's loss is the mean over anchors with at least one positive.
    Neighbours come only from artists with role `train` (both ends), symmetrised, so test and
    validation queries and their neighbours never shape training. `data.single_modality_rows`
    adds the training artists with one modality, whose only positives are their neighbours'.
  * `model.skip_modalities`: a fixed residual path g_m(x) = L2(MLP(x) + w·√D·L2((x − μ)U)),
    U the top-D principal directions of modality m on the training split (μ its mean; stored in
    params["skip"], frozen), so a pretrained embedding keeps its own geometry (w =
    `model.skip_weight`).
  * `model.modality_dropout` ("text=0.5"): per-modality dropout; `task.modality_l2`
    ("text=1e-4"): coefficient·Σ‖kernel‖² of that projector added to the loss.
  * earlier stopping: checkpoints every `train.checkpoint_every`, evaluated on the validation
    queries (`task.eval_queries=validation`), pick the step (see docs/results/artist_retrieval.md).
Artist embedding: mean of the available projected modalities, re-normalised; cross-modal retrieval
(query modality m, corpus modality n) uses g_m and g_n directly.
Evaluation (`evaluate`): the test (or validation) queries rank the whole catalogue; the trained
embedding, each modality's projection, and the raw baselines (each raw modality, concatenation with
zeros, PCA average) — see `evaluate.py` for the metrics, buckets, matrix and bias.

`data.source` is '' (data.dir) or arrayrecord:DIR: a webdataset / tfds / parquet stream is refused
in one line, since the task needs random access to the artist catalogue (every artist is ranked
against the whole catalogue) and the ground truth held in the dataset's metadata.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.recipes import artists as data_lib
from data_pipelines import records
from data_pipelines import sources as sources_lib
from mmcl.config import Config, ConfigError
from mmcl.eval import finite as finite_lib
from mmcl.losses import sharded as sharded_losses
from mmcl.models.layers import l2_normalize
from mmcl.models.mlp import MLP
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks.artist_retrieval import evaluate
from mmcl.tasks.artist_retrieval.loss import multi_positive_infonce, neighbour_matrix
from mmcl.tasks.artist_retrieval.model import pca_basis
from mmcl.train.task import CorpusExport, Task, TowerExport


def _parse_per_modality(items, key: str, modalities) -> dict[str, float]:
  """("text=0.5", ...) → {"text": 0.5}; errors name the config key."""
  out = {}
  for item in items:
    name, sep, value = str(item).partition("=")
    try:
      number = float(value)
    except ValueError:
      number = None
    if not sep or number is None or name.strip() not in modalities:
      raise ValueError(f"config key '{key}': entries must be 'modality=number' with a modality "
                       f"among {tuple(modalities)}, got {item!r}")
    out[name.strip()] = number
  return out


# Why `data.source` must be an ArrayRecord dataset (no stream) for this task.
SOURCE_NEEDS = ("random access to the artist catalogue (every artist is ranked against the whole "
                "catalogue) and the ground truth held in the dataset's metadata")


class ArtistRetrievalTask(Task):
  """Per-modality projectors into one space, trained by multimodal InfoNCE."""

  primary_metric = "contrastive/ndcg@200"

  @classmethod
  def declare_config(cls, c: Config) -> None:
    sources_lib.define_arrayrecord_only(c.data, SOURCE_NEEDS)
    t = c.task
    t.define("temperature", 0.1, "softmax temperature τ of every pair's InfoNCE")
    t.define("learn_temperature", False, "learn log(1/τ) (initialised at 1/temperature)")
    t.define("modalities", ("cf", "tags", "text"),
             "modalities to use (names in the dataset's metadata['modalities'])")
    t.define("eval_queries", "test", "catalogue role whose artists are the evaluation queries",
             choices=("test", "validation"))
    t.define("eval_ks", (10, 50, 200), "cutoffs of NDCG@k and Recall@k")
    t.define("coverage_ks", (10,), "cutoffs of catalogue coverage@k")
    t.define("bias_k", 10, "top-k lists over which modality bias is measured")
    t.define("baselines", True, "also evaluate the raw-embedding baselines")
    t.define("loss_impl", "auto", "loss implementation (see mmcl.losses): auto, dense, tiled, "
             "fused (Pallas kernels)", choices=("auto", "dense", "tiled", "fused"))
    t.define("positives", "self", "'self': each artist's own other modality is its positive "
             "(multimodal_infonce); 'neighbours': also its ground-truth similar artists among the "
             "training artists (multi-positive, dense loss)", choices=("self", "neighbours"))
    t.define("neighbour_weight", 1.0, "weight λ of a neighbour positive relative to the artist's "
             "own vector (task.positives=neighbours)")
    t.define("modality_l2", (), "'modality=coef' entries: coef·Σ‖kernel‖² of that modality's "
             "projector is added to the loss")

    m = c.model
    m.define("embed_dim", 128, "dimension D of the shared space (the paper: 128, option 256)")
    m.define("hidden_dim", 512, "hidden width of each projector")
    m.define("dropout", 0.3, "dropout after the projector's hidden ReLU")
    m.define("layer_norm", "output", "projector LayerNorm placement (see mmcl.models.mlp)",
             choices=("none", "hidden", "output", "both"))
    m.define("modality_dropout", (), "'modality=rate' entries overriding model.dropout for that "
             "modality's projector")
    m.define("skip_modalities", (), "modalities whose projector gets a fixed residual path: the "
             "input's top-D principal directions on the training split (keeps a pretrained "
             "embedding's geometry)")
    m.define("skip_weight", 1.0, "weight w of the residual path (model.skip_modalities)")

    d = c.data
    d.define("split", "train", "training split of the artist dataset")
    d.define("text_oversample", 1, "times each training row with a text embedding appears per "
             "epoch (text rows are a small minority of the joined data)")
    d.define("single_modality_rows", False, "also train on the role-train SAS artists with one "
             "modality (positives only through their neighbours: needs task.positives=neighbours)")

  def __init__(self, config: Config, mesh):
    super().__init__(config, mesh)
    try:
      config.data.dir = sources_lib.arrayrecord_dir(config.data.source, config.data.dir,
                                                    needs=SOURCE_NEEDS)
    except sources_lib.SourceConfigError as e:
      raise ConfigError(f"config key 'data.source' = {config.data.source!r}: {e}") from None
    self.data_dir = pathlib.Path(config.data.dir)
    self.metadata = records.load_metadata(self.data_dir)
    dims = self.metadata.get("modalities")
    if not isinstance(dims, dict):
      raise ValueError(f"{self.data_dir}: metadata has no 'modalities' (build the dataset with "
                       "`mmcl data build artists`)")
    self.modalities = tuple(config.task.modalities)
    unknown = [m for m in self.modalities if m not in dims]
    if len(self.modalities) < 2 or unknown:
      raise ValueError(f"config key 'task.modalities' = {self.modalities}: need ≥ 2 of the "
                       f"dataset's modalities {sorted(dims)}")
    self.dims = {m: int(dims[m]) for m in self.modalities}
    mc, t = config.model, config.task
    drop = _parse_per_modality(mc.modality_dropout, "model.modality_dropout", self.modalities)
    self.l2 = _parse_per_modality(t.modality_l2, "task.modality_l2", self.modalities)
    self.projectors = {m: MLP(hidden_dims=(mc.hidden_dim,), out_dim=mc.embed_dim,
                              activation="relu", dropout=drop.get(m, mc.dropout),
                              layer_norm=mc.layer_norm)
                       for m in self.modalities}
    self.skip = tuple(mc.skip_modalities)
    bad = [m for m in self.skip if m not in self.modalities]
    if bad:
      raise ValueError(f"config key 'model.skip_modalities': {bad} not among task.modalities "
                       f"{self.modalities}")
    if config.data.single_modality_rows and t.positives != "neighbours":
      raise ValueError("config key 'data.single_modality_rows' = True needs "
                       "task.positives='neighbours' (a single-modality row has no other positive)")
    self.neighbour_table = None
    if t.positives == "neighbours":
      self.neighbour_table = self.training_neighbours(self.metadata)

  @staticmethod
  def training_neighbours(metadata) -> np.ndarray:
    """[N, K] int32: catalogue artist i's ground-truth neighbours usable as positives (-1 = none).

    Only pairs of two role-`train` artists: a test or validation query, or a neighbour of one
    (role `blocked`), never appears, on either side.
    """
    info = metadata["catalogue"]
    gold = np.asarray(info["gold"], np.int64)
    is_train = np.asarray(info["role"]) == "train"
    ok = (gold >= 0) & is_train[:, None] & is_train[np.maximum(gold, 0)]
    return np.where(ok, gold, -1).astype(np.int32)

  # --- data ---------------------------------------------------------------------------------------
  def train_iterator(self, process_index: int, process_count: int):
    c = self.config
    return data_lib.train_iterator(
        self.data_dir, split=c.data.split, global_batch_size=c.data.global_batch_size,
        seed=c.seed, process_index=process_index, process_count=process_count,
        num_epochs=c.data.num_epochs, text_oversample=c.data.text_oversample,
        single_modality_rows=c.data.single_modality_rows)

  def val_iterator(self, process_index: int, process_count: int):
    n = self.metadata["splits"].get("validation", {}).get("num_examples", 0)
    devices = self.mesh.shape[mesh_lib.DATA_AXIS]
    batch = min(self.config.data.global_batch_size, n // devices * devices)
    if batch < max(2, devices):
      return None
    return data_lib.train_iterator(self.data_dir, split="validation", global_batch_size=batch,
                                   seed=self.config.seed, process_index=process_index,
                                   process_count=process_count, num_epochs=1)

  # --- model --------------------------------------------------------------------------------------
  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    keys = jax.random.split(rng, len(self.modalities))
    params = {m: self.projectors[m].init(k, jnp.zeros((1, self.dims[m]), jnp.float32))["params"]
              for m, k in zip(self.modalities, keys)}
    out = {"projectors": params}
    if self.skip:
      out["skip"] = {m: {k: jnp.asarray(v) for k, v in fit.items()}
                     for m, fit in self.skip_fits().items()}
    if self.config.task.learn_temperature:
      out["log_logit_scale"] = jnp.log(jnp.asarray(1.0 / self.config.task.temperature,
                                                   jnp.float32))
    return out

  def skip_fits(self) -> dict[str, dict[str, np.ndarray]]:
    """{m: {"mean": [d_m], "basis": [d_m, D]}} of the residual paths, fitted once on the training
    split's rows that have m (cached; the trained values live in params["skip"])."""
    if getattr(self, "_skip_fits", None) is None:
      train = data_lib.read_split(self.data_dir, self.config.data.split)
      fits = {}
      for m in self.skip:
        rows = train[m][train[f"has_{m}"]]
        if rows.shape[0] < 2:
          raise ValueError(f"{self.data_dir}: split {self.config.data.split!r} has "
                           f"{rows.shape[0]} rows with modality {m!r}; model.skip_modalities "
                           "needs at least 2 to fit its principal directions")
        mean, basis = pca_basis(rows, self.config.model.embed_dim)
        fits[m] = {"mean": mean, "basis": basis}
      self._skip_fits = fits
    return self._skip_fits

  def project(self, params, m: str, x: jax.Array, *, train: bool = False,
              rng: jax.Array | None = None) -> jax.Array:
    """x: [B, d_m] float32 → [B, D] unit-norm float32 in the shared space."""
    rngs = {"dropout": rng} if train else None
    out = self.projectors[m].apply({"params": params["projectors"][m]}, x, train=train, rngs=rngs)
    if m in self.skip:
      sk = jax.tree.map(jax.lax.stop_gradient, params["skip"][m])
      path = l2_normalize((x.astype(jnp.float32) - sk["mean"]) @ sk["basis"])
      out = out + self.config.model.skip_weight * np.sqrt(out.shape[-1]) * path
    return l2_normalize(out)

  def frozen_params_filter(self, path: str) -> bool:
    return path.startswith("skip/")

  def logit_scale(self, params) -> jax.Array:
    if "log_logit_scale" in params:
      return jnp.exp(params["log_logit_scale"])
    return jnp.asarray(1.0 / self.config.task.temperature, jnp.float32)

  def loss(self, params, batch, rng, *, train: bool):
    keys = jax.random.split(rng, len(self.modalities))
    emb = {m: self.project(params, m, batch[m], train=train, rng=k)
           for m, k in zip(self.modalities, keys)}
    valid = {m: batch[f"has_{m}"] for m in self.modalities}
    scale = self.logit_scale(params)
    t = self.config.task
    metrics = {"temperature": 1.0 / scale}
    if t.positives == "self":
      loss, per_pair = sharded_losses.multimodal_infonce_over_mesh(
          emb, valid, self.mesh, logit_scale=scale, group_ids=batch["artist"],
          impl=t.loss_impl, return_pair_losses=True)
    else:
      loss, per_pair = self.neighbour_loss(emb, valid, batch["artist"], scale)
    for name, (value, _) in per_pair.items():
      metrics[f"pair/{name.replace(':', '_')}"] = value  # 0: < 2 rows in the batch
    if self.l2:
      penalty = sum(c * sum(jnp.sum(jnp.square(w)) for w in
                            jax.tree.leaves(params["projectors"][m]) if w.ndim >= 2)
                    for m, c in self.l2.items())
      metrics["l2_penalty"] = penalty
      metrics["contrastive_loss"] = loss
      loss = loss + penalty
    return loss, metrics

  def neighbour_loss(self, emb, valid, artist, scale):
    """The multi-positive loss over every modality pair: (loss, {"m:n": (L_mn, contributes)}).

    A pair contributes when it has ≥ 2 anchors over both directions; the loss is the mean over
    contributing pairs (as `multimodal_infonce`).
    """
    nb = neighbour_matrix(artist, jnp.asarray(self.neighbour_table))
    names = sorted(self.modalities)
    total, count, per_pair = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), {}
    for i, m in enumerate(names):
      for n in names[i + 1:]:
        value, anchors = multi_positive_infonce(
            emb[m], emb[n], valid[m], valid[n], artist, nb, logit_scale=scale,
            neighbour_weight=self.config.task.neighbour_weight)
        contributes = anchors >= 2
        total = total + jnp.where(contributes, value, 0.0)
        count = count + contributes.astype(jnp.float32)
        per_pair[f"{m}:{n}"] = (value, contributes)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0), per_pair

  def flops_per_example(self) -> float | None:
    h, d = self.config.model.hidden_dim, self.config.model.embed_dim
    return float(sum(2 * (dm * h + h * d) for dm in self.dims.values()))

  # --- evaluation ---------------------------------------------------------------------------------
  def embed_catalogue(self, params, cat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Projected catalogue: modality → [N, D] float32 (rows without the modality are garbage and
    must be masked with has_{m})."""
    fns = {m: jax.jit(lambda p, x, m=m: self.project(p, m, x)) for m in self.modalities}
    return {m: np.asarray(fns[m](params, jnp.asarray(cat[m]))) for m in self.modalities}

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    t = self.config.task
    cat = data_lib.read_split(self.data_dir, "catalogue")
    info = self.metadata["catalogue"]
    gold = np.asarray(info["gold"], np.int64)
    roles = np.asarray(info["role"])
    listeners = np.asarray(info["listeners"], np.int64)
    queries = np.flatnonzero(roles == t.eval_queries)
    n = gold.shape[0]
    if cat["has_" + self.modalities[0]].shape[0] != n:
      raise ValueError(f"{self.data_dir}: catalogue split has "
                       f"{cat['has_' + self.modalities[0]].shape[0]} rows, metadata {n}")
    avail = {m: cat[f"has_{m}"] for m in self.modalities}
    proj = self.embed_catalogue(params, cat)
    finite_lib.require_scorable({f"{m} projector (catalogue rows with {m})": proj[m][avail[m]]
                                 for m in self.modalities})
    # Mean of the available projected modalities, re-normalised.
    total = sum(proj[m] * avail[m][:, None] for m in self.modalities)
    fused = evaluate.l2_normalize(total)
    any_avail = np.any([avail[m] for m in self.modalities], axis=0)
    kmax = max(max(t.eval_ks), max(t.coverage_ks), t.bias_k)
    groups = evaluate.query_groups(avail, listeners, queries)

    systems: dict[str, tuple[np.ndarray, np.ndarray]] = {"contrastive": (fused, any_avail)}
    for m in self.modalities:
      systems[f"contrastive_{m}_only"] = (proj[m], avail[m])
    if t.baselines:
      fit_rows = np.flatnonzero(roles == "train")
      systems.update(evaluate.baseline_embeddings({m: cat[m] for m in self.modalities}, avail,
                                                     fit_rows))
    results: dict[str, dict[str, float]] = {}
    flat: dict[str, float] = {}
    for name, (emb, ok) in systems.items():
      ranked = evaluate.rank_catalogue(emb[queries], ok[queries], queries, emb, ok, kmax)
      r = evaluate.retrieval_metrics(ranked, gold[queries], corpus_size=n, ks=t.eval_ks,
                                        coverage_ks=t.coverage_ks, groups=groups)
      if name == "contrastive":
        r.update(evaluate.modality_bias(ranked, avail, queries, t.bias_k))
      results[name] = r
      flat.update({f"{name}/{k}": v for k, v in r.items()})

    # Query-modality × corpus-modality matrix in the shared space (gold restricted to the corpus
    # artists that have the corpus modality; queries need the query modality).
    for qm in self.modalities:
      for cm in self.modalities:
        qsel = queries[avail[qm][queries]]
        g = np.where(avail[cm][np.maximum(gold[qsel], 0)] & (gold[qsel] >= 0), gold[qsel], -1)
        ranked = evaluate.rank_catalogue(proj[qm][qsel], np.ones(len(qsel), bool), qsel,
                                            proj[cm], avail[cm], kmax)
        r = evaluate.retrieval_metrics(ranked, g, corpus_size=n, ks=(10,), coverage_ks=(10,))
        for k in ("ndcg@10", "recall@10", "num_queries"):
          flat[f"matrix/{qm}->{cm}/{k}"] = r[k]
    flat["num_catalogue"] = float(n)
    flat["num_queries"] = float(len(queries))
    self._write_tables(out_dir, results, flat)
    return flat

  def _write_tables(self, out_dir: str, results, flat) -> None:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["ndcg@10", "recall@10", "coverage@10", "ndcg@200", "recall@50", "recall@200",
            "pop_q1/ndcg@10", "pop_q1/recall@10", "missing_any/ndcg@10", "missing_any/recall@10"]
    parts = ["## Systems\n", evaluate.markdown_table(results, cols), "\n\n## By popularity\n"]
    buckets = sorted({k.split("/")[0] for r in results.values() for k in r
                      if k.startswith("pop_")})
    pop_cols = [f"{b}/ndcg@10" for b in buckets] + [f"{b}/num_queries" for b in buckets]
    parts += [evaluate.markdown_table(results, pop_cols), "\n\n## Modality matrix (ndcg@10)\n"]
    ms = self.modalities
    parts.append("| query \\ corpus | " + " | ".join(ms) + " |\n|---|" + "---:|" * len(ms))
    for qm in ms:
      parts.append(f"\n| {qm} | " + " | ".join(f"{flat[f'matrix/{qm}->{cm}/ndcg@10']:.4f}"
                                               for cm in ms) + " |")
    parts.append("\n\n## Modality bias (contrastive, top-%d)\n" % self.config.task.bias_k)
    for m in ms:
      r = results["contrastive"]
      parts.append(f"- {m}: share with {m} = {r[f'bias/{m}/share_if_query_has']:.3f} (query has "
                   f"{m}), {r[f'bias/{m}/share_if_query_lacks']:.3f} (query lacks it); base rate "
                   f"{r[f'bias/{m}/base_rate']:.3f}\n")
    (out / "artist_retrieval.md").write_text("".join(parts) + "\n")
    (out / "artist_retrieval.json").write_text(json.dumps(results, indent=1, sort_keys=True))

  # --- export to serving --------------------------------------------------------------------------
  def _fuse(self, params, x: jax.Array) -> jax.Array:
    """x: [B, Σ d_m + M] (the modality vectors in `task.modalities` order, then M availability
    flags 0 / 1) → [B, D] the artist embedding: the mean of the available projections,
    re-normalised (the evaluator's); zero rows when nothing is available."""
    dims = [self.dims[m] for m in self.modalities]
    parts = jnp.split(x, np.cumsum(dims).tolist(), axis=1)
    avail = parts[-1]
    total = sum(self.project(params, m, parts[i]) * avail[:, i:i + 1]
                for i, m in enumerate(self.modalities))
    return total * jax.lax.rsqrt(jnp.maximum(jnp.sum(total * total, -1, keepdims=True), 1e-24))

  def export_towers(self, params) -> dict[str, TowerExport]:
    """One projector tower per modality (its precomputed embedding [b, d_m] → g_m, unit norm),
    for cross-modal retrieval, and "artist": all modalities with availability flags → the fused
    artist embedding (missing modalities left out of the mean)."""
    cat = data_lib.read_split(self.data_dir, "catalogue")
    towers = {}
    for m in self.modalities:
      towers[m] = TowerExport(
          fn=lambda p, x, m=m: self.project(p, m, x),
          input_spec=jax.ShapeDtypeStruct((1, self.dims[m]), jnp.float32),
          preprocessing={"input": "modality_embedding", "modality": m, "dim": self.dims[m],
                         "source": self.metadata.get("modality_sources", {}).get(
                             m, f"the dataset's precomputed {m!r} vector of the artist")},
          example=cat[m][cat[f"has_{m}"]][:8])
    dims = [self.dims[m] for m in self.modalities]
    towers["artist"] = TowerExport(
        fn=self._fuse, input_spec=jax.ShapeDtypeStruct((1, sum(dims) + len(dims)), jnp.float32),
        preprocessing={"input": "artist_modalities",
                       "layout": [{"modality": m, "dim": d} for m, d in zip(self.modalities, dims)]
                       + [{"availability": list(self.modalities)}],
                       "availability": "the last M columns: 1.0 if the modality is present, 0.0 "
                                       "if missing (its vector is then ignored, e.g. zeros)",
                       "fusion": "normalise(sum of the available modality projections)"},
        example=self._artist_rows(cat)[:8])
    return towers

  def _artist_rows(self, cat: dict[str, np.ndarray]) -> np.ndarray:
    """The "artist" tower's input rows [N, Σ d_m + M] of a split read by `read_split`."""
    return np.concatenate([np.where(cat[f"has_{m}"][:, None], cat[m], 0.0)
                           for m in self.modalities]
                          + [np.stack([cat[f"has_{m}"] for m in self.modalities], 1)],
                          axis=1).astype(np.float32)

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    """The catalogue's fused artist embeddings (artists with at least one modality), queried by
    the evaluator's test artists."""
    cat = data_lib.read_split(self.data_dir, "catalogue")
    rows = self._artist_rows(cat)
    emb = np.asarray(jax.jit(self._fuse)(params, rows))
    keep = rows[:, -len(self.modalities):].any(axis=1)
    roles = np.asarray(self.metadata["catalogue"]["role"])
    queries = emb[(roles == self.config.task.eval_queries) & keep]
    return {"artists": CorpusExport(
        "artist", emb[keep], [str(i) for i, k in zip(cat["ids"], keep) if k],
        "catalogue artists with at least one modality; id = the dataset's artist id",
        query_tower="artist", queries=queries)}
