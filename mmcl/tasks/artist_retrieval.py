"""Cross-modal artist retrieval with missing modalities (Ferraro et al. 2023, METHODS.md §1).

Data: an artist dataset from `data_pipelines.artists` (SAS ⋈ hetrec: `cf`, `tags`, `text` with
availability bits; splits train / validation / catalogue, ground truth in the metadata).
Batch: {m} [B, D_m] float32, has_{m} [B] bool, artist [B] int32 (rows sharing an artist number are
copies from oversampling and are kept out of each other's negatives).
Model: one projector per modality, g_m: d_m → 512 → D (ReLU, dropout 0.3, LayerNorm) then L2 norm;
the encoders are frozen (the inputs are precomputed embeddings), so only the projectors train.
Loss: for every modality pair (m, n), symmetric InfoNCE between g_m(e^m) and g_n(e^n) over the
rows with both modalities, negatives the whole global batch, τ = 0.1; a pair with < 2 valid rows
contributes nothing; the mean over contributing pairs (`mmcl.losses.multimodal_infonce`).
Artist embedding: mean of the available projected modalities, re-normalised; cross-modal retrieval
(query modality m, corpus modality n) uses g_m and g_n directly.
Evaluation (`evaluate`): the test (or validation) queries rank the whole catalogue; the trained
embedding, each modality's projection, and the raw baselines (each raw modality, concatenation with
zeros, PCA average) — see `mmcl.eval.artist_eval` for the metrics, buckets, matrix and bias.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import artists as data_lib
from data_pipelines import records
from mmcl.config import Config
from mmcl.eval import artist_eval
from mmcl.losses import sharded as sharded_losses
from mmcl.models.mlp import MLP
from mmcl.parallel import mesh as mesh_lib
from mmcl.train.task import Task


def _l2_normalize(x: jax.Array) -> jax.Array:
  """x: [B, D] → rows of unit norm (float32)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


class ArtistRetrievalTask(Task):
  """Per-modality projectors into one space, trained by multimodal InfoNCE."""

  primary_metric = "contrastive/ndcg@200"

  @classmethod
  def declare_config(cls, c: Config) -> None:
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
    t.define("loss_impl", "auto", "loss implementation (see mmcl.losses)",
             choices=("auto", "dense", "tiled"))

    m = c.model
    m.define("embed_dim", 128, "dimension D of the shared space (METHODS.md: 128, option 256)")
    m.define("hidden_dim", 512, "hidden width of each projector")
    m.define("dropout", 0.3, "dropout after the projector's hidden ReLU")
    m.define("layer_norm", "output", "projector LayerNorm placement (see mmcl.models.mlp)",
             choices=("none", "hidden", "output", "both"))

    d = c.data
    d.define("split", "train", "training split of the artist dataset")
    d.define("text_oversample", 1, "times each training row with a text embedding appears per "
             "epoch (text rows are a small minority of the joined data)")

  def __init__(self, config: Config, mesh):
    super().__init__(config, mesh)
    self.data_dir = pathlib.Path(config.data.dir)
    self.metadata = records.load_metadata(self.data_dir)
    dims = self.metadata.get("modalities")
    if not isinstance(dims, dict):
      raise ValueError(f"{self.data_dir}: metadata has no 'modalities' (build the dataset with "
                       "`python -m data_pipelines.artists`)")
    self.modalities = tuple(config.task.modalities)
    unknown = [m for m in self.modalities if m not in dims]
    if len(self.modalities) < 2 or unknown:
      raise ValueError(f"config key 'task.modalities' = {self.modalities}: need ≥ 2 of the "
                       f"dataset's modalities {sorted(dims)}")
    self.dims = {m: int(dims[m]) for m in self.modalities}
    mc = config.model
    self.projectors = {m: MLP(hidden_dims=(mc.hidden_dim,), out_dim=mc.embed_dim,
                              activation="relu", dropout=mc.dropout, layer_norm=mc.layer_norm)
                       for m in self.modalities}

  # --- data ---------------------------------------------------------------------------------------
  def train_iterator(self, process_index: int, process_count: int):
    c = self.config
    return data_lib.train_iterator(
        self.data_dir, split=c.data.split, global_batch_size=c.data.global_batch_size,
        seed=c.seed, process_index=process_index, process_count=process_count,
        num_epochs=c.data.num_epochs, text_oversample=c.data.text_oversample)

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
    if self.config.task.learn_temperature:
      out["log_logit_scale"] = jnp.log(jnp.asarray(1.0 / self.config.task.temperature,
                                                   jnp.float32))
    return out

  def project(self, params, m: str, x: jax.Array, *, train: bool = False,
              rng: jax.Array | None = None) -> jax.Array:
    """x: [B, d_m] float32 → [B, D] unit-norm float32 in the shared space."""
    rngs = {"dropout": rng} if train else None
    return _l2_normalize(self.projectors[m].apply({"params": params["projectors"][m]}, x,
                                                  train=train, rngs=rngs))

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
    loss, per_pair = sharded_losses.multimodal_infonce_over_mesh(
        emb, valid, self.mesh, logit_scale=scale, group_ids=batch["artist"],
        impl=self.config.task.loss_impl, return_pair_losses=True)
    metrics = {"temperature": 1.0 / scale}
    for name, (value, _) in per_pair.items():
      metrics[f"pair/{name.replace(':', '_')}"] = value  # 0: < 2 rows in the batch
    return loss, metrics

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
    # Mean of the available projected modalities, re-normalised.
    total = sum(proj[m] * avail[m][:, None] for m in self.modalities)
    fused = artist_eval.l2_normalize(total)
    any_avail = np.any([avail[m] for m in self.modalities], axis=0)
    kmax = max(max(t.eval_ks), max(t.coverage_ks), t.bias_k)
    groups = artist_eval.query_groups(avail, listeners, queries)

    systems: dict[str, tuple[np.ndarray, np.ndarray]] = {"contrastive": (fused, any_avail)}
    for m in self.modalities:
      systems[f"contrastive_{m}_only"] = (proj[m], avail[m])
    if t.baselines:
      fit_rows = np.flatnonzero(roles == "train")
      systems.update(artist_eval.baseline_embeddings({m: cat[m] for m in self.modalities}, avail,
                                                     fit_rows))
    results: dict[str, dict[str, float]] = {}
    flat: dict[str, float] = {}
    for name, (emb, ok) in systems.items():
      ranked = artist_eval.rank_catalogue(emb[queries], ok[queries], queries, emb, ok, kmax)
      r = artist_eval.retrieval_metrics(ranked, gold[queries], corpus_size=n, ks=t.eval_ks,
                                        coverage_ks=t.coverage_ks, groups=groups)
      if name == "contrastive":
        r.update(artist_eval.modality_bias(ranked, avail, queries, t.bias_k))
      results[name] = r
      flat.update({f"{name}/{k}": v for k, v in r.items()})

    # Query-modality × corpus-modality matrix in the shared space (gold restricted to the corpus
    # artists that have the corpus modality; queries need the query modality).
    for qm in self.modalities:
      for cm in self.modalities:
        qsel = queries[avail[qm][queries]]
        g = np.where(avail[cm][np.maximum(gold[qsel], 0)] & (gold[qsel] >= 0), gold[qsel], -1)
        ranked = artist_eval.rank_catalogue(proj[qm][qsel], np.ones(len(qsel), bool), qsel,
                                            proj[cm], avail[cm], kmax)
        r = artist_eval.retrieval_metrics(ranked, g, corpus_size=n, ks=(10,), coverage_ks=(10,))
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
    parts = ["## Systems\n", artist_eval.markdown_table(results, cols), "\n\n## By popularity\n"]
    buckets = sorted({k.split("/")[0] for r in results.values() for k in r
                      if k.startswith("pop_")})
    pop_cols = [f"{b}/ndcg@10" for b in buckets] + [f"{b}/num_queries" for b in buckets]
    parts += [artist_eval.markdown_table(results, pop_cols), "\n\n## Modality matrix (ndcg@10)\n"]
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
