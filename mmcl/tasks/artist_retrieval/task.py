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

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.recipes import artists as data_lib
from data_pipelines import records
from data_pipelines import sources as sources_lib
from mmcl.config import Config, ConfigError
from mmcl.models.mlp import MLP
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks.artist_retrieval import evaluate, export
from mmcl.tasks.artist_retrieval.data import training_neighbours
from mmcl.tasks.artist_retrieval.loss import artist_loss
from mmcl.tasks.artist_retrieval.model import ArtistProjectors, fit_skip_paths
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
    self.skip = tuple(mc.skip_modalities)
    bad = [m for m in self.skip if m not in self.modalities]
    if bad:
      raise ValueError(f"config key 'model.skip_modalities': {bad} not among task.modalities "
                       f"{self.modalities}")
    self.net = ArtistProjectors(
        {m: MLP(hidden_dims=(mc.hidden_dim,), out_dim=mc.embed_dim, activation="relu",
                dropout=drop.get(m, mc.dropout), layer_norm=mc.layer_norm)
         for m in self.modalities}, self.modalities, self.dims, self.skip, mc.skip_weight)
    if config.data.single_modality_rows and t.positives != "neighbours":
      raise ValueError("config key 'data.single_modality_rows' = True needs "
                       "task.positives='neighbours' (a single-modality row has no other positive)")
    self.neighbour_table = None
    if t.positives == "neighbours":
      self.neighbour_table = training_neighbours(self.metadata)
    self._skip_fits = None

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
    out = {"projectors": self.net.init(rng)}
    if self.skip:
      out["skip"] = {m: {k: jnp.asarray(v) for k, v in fit.items()}
                     for m, fit in self.skip_fits().items()}
    if self.config.task.learn_temperature:
      out["log_logit_scale"] = jnp.log(jnp.asarray(1.0 / self.config.task.temperature,
                                                   jnp.float32))
    return out

  def skip_fits(self) -> dict[str, dict[str, np.ndarray]]:
    """The residual paths' fits (`model.fit_skip_paths`) on the training split, computed once
    (the trained values live in params["skip"])."""
    if self._skip_fits is None:
      split = self.config.data.split
      self._skip_fits = fit_skip_paths(data_lib.read_split(self.data_dir, split), self.skip,
                                       self.config.model.embed_dim,
                                       f"{self.data_dir}: split {split!r}")
    return self._skip_fits

  def frozen_params_filter(self, path: str) -> bool:
    return path.startswith("skip/")

  def logit_scale(self, params) -> jax.Array:
    if "log_logit_scale" in params:
      return jnp.exp(params["log_logit_scale"])
    return jnp.asarray(1.0 / self.config.task.temperature, jnp.float32)

  def loss(self, params, batch, rng, *, train: bool):
    return artist_loss(self.net, params, batch, rng, self.config.task, self.mesh,
                       self.logit_scale(params), train=train, l2=self.l2,
                       neighbour_table=self.neighbour_table)

  def flops_per_example(self) -> float | None:
    h, d = self.config.model.hidden_dim, self.config.model.embed_dim
    return float(sum(2 * (dm * h + h * d) for dm in self.dims.values()))

  # --- evaluation ---------------------------------------------------------------------------------
  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    cat = data_lib.read_split(self.data_dir, "catalogue")
    results, flat = evaluate.evaluate_catalogue(self.net, params, cat, self.metadata["catalogue"],
                                                self.config.task, str(self.data_dir))
    evaluate.write_tables(out_dir, results, flat, self.modalities, self.config.task.bias_k)
    return flat

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    return export.export_towers(self.net, data_lib.read_split(self.data_dir, "catalogue"),
                                self.metadata)

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    return export.export_corpus(self.net, params, data_lib.read_split(self.data_dir, "catalogue"),
                                np.asarray(self.metadata["catalogue"]["role"]),
                                self.config.task.eval_queries)
