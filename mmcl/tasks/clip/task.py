"""CLIP / SigLIP image–text dual encoder.

Batch: `image` [B, H, W, 3] uint8 pixels (the ViT normalises them on the device with the dataset's
`image_normalization`), `text` [B, L] int32 (0 = padding).
Towers: a ViT (`mmcl.models.vit`) and a Transformer text encoder (`mmcl.models.text_transformer`), each
followed by L2 normalisation. Loss (config `task.loss`):
  infonce: L = ½[CE(s·A·Bᵀ, I) + CE(s·B·Aᵀ, I)], s = exp(t) with learnable t (Radford et al. 2021);
  sigmoid: L = −(1/B) Σ_ij log σ(z_ij (s·a_i·b_j + β)), z_ij = ±1 (Zhai et al. 2023);
computed with the negatives of the whole global batch by the sharded loss core (`mmcl.losses`).
Evaluation: image→text and text→image Recall@{1,5,10} over the held-out split (pair i is the positive).

Data (config `data.source`): an ArrayRecord dataset directory (`arrayrecord:DIR`, the default
`data.dir`; images at the size its metadata gives, its own tokenizer and splits), or pairs streamed
from webdataset shards, a tfds build or parquet files (`data_pipelines.sources.pairs`: images at
`data.image_size`, a tokenizer trained from the source unless `data.tokenizer` names one, a hashed
hold-out of `data.holdout_fraction` for validation and evaluation unless `data.eval_source` is set).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import image_text as data_lib
from data_pipelines import sources as sources_lib
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.sources import pairs as pairs_lib
from mmcl.config import Config, ConfigError
from mmcl.models import flops as flops_lib
from mmcl.models import tower_config
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks.clip import evaluate, export
from mmcl.tasks.clip.loss import clip_loss
from mmcl.tasks.clip.model import ClipTowers
from mmcl.train.task import CorpusExport, Task, TowerExport


class ClipTask(Task):
  """Image–text contrastive pretraining."""

  primary_metric = "t2i/recall@1"

  @classmethod
  def declare_config(cls, c: Config) -> None:
    t = c.task
    t.define("loss", "infonce", "contrastive loss", choices=("infonce", "sigmoid"))
    t.define("loss_impl", "auto", "loss implementation (see mmcl.losses): auto, dense, tiled, "
             "fused (Pallas kernels)", choices=("auto", "dense", "tiled", "fused"))
    t.define("init_temperature", 0.07, "initial softmax temperature τ (logit scale s = 1/τ)")
    t.define("max_logit_scale", 100.0, "upper clip of the learnable logit scale s")
    t.define("init_logit_bias", -10.0, "initial bias β of the sigmoid loss")
    t.define("eval_ks", (1, 5, 10), "k of the Recall@k the evaluator reports")
    t.define("eval_batch_size", 256, "batch size of the evaluator's embedding passes")

    m = c.model
    m.define("embed_dim", 128, "dimension of the shared embedding space")
    tower_config.declare_vit(m.section("image", "ViT image tower"))
    tower_config.declare_text_transformer(m.section("text", "Transformer text tower"))

    d = c.data
    d.define("max_text_len", 24, "text tokens per caption (BOS + tokens + EOS, padded with 0)")
    d.define("augment", True, "light image augmentation (seeded per record and epoch)")
    d.define("eval_split", "test", "held-out split used by validation and the evaluator "
             "(arrayrecord sources)")
    sources_lib.define_config(d)

  def __init__(self, config: Config, mesh):
    super().__init__(config, mesh)
    try:
      spec = sources_lib.parse(config.data.source or f"arrayrecord:{config.data.dir}")
      self.pairs = None if spec.scheme == "arrayrecord" else pairs_lib.ImageTextData.from_config(
          config.data, seed=config.seed)
    except sources_lib.SourceConfigError as e:
      raise ConfigError(f"config key 'data.source' = {config.data.source!r}: {e}") from None
    if self.pairs is None:
      self.data_dir = pathlib.Path(spec.location)
      self.metadata = data_lib.load_metadata(self.data_dir)
      image_shape = next(tuple(f["shape"]) for f in self.metadata["schema"]
                         if f["name"] == "image")
      self.image_size, self.channels = image_shape[0], image_shape[2]
      self.vocab_size = int(self.metadata["vocab_size"])
      self.tokenizer_path = self.data_dir / self.metadata.get("tokenizer", data_lib.TOKENIZER_FILE)
      self.data_name = str(self.data_dir)
    else:
      self.data_dir = None
      self.metadata = {
          "image_normalization": {"mean": list(pairs_lib.IMAGE_MEAN),
                                  "std": list(pairs_lib.IMAGE_STD)},
          "special_token_ids": {"pad": tokenizer_lib.PAD_ID, "unk": tokenizer_lib.UNK_ID,
                                "bos": tokenizer_lib.BOS_ID, "eos": tokenizer_lib.EOS_ID}}
      self.image_size, self.channels = self.pairs.image_size, 3
      self.vocab_size = self.pairs.vocab_size
      self.tokenizer_path = self.pairs.tokenizer_path
      self.data_name = str(self.pairs.eval.spec)
    dtype = tower_config.compute_dtype(config)
    m = config.model
    self.image_normalization = self.metadata.get(
        "image_normalization", {"mean": list(data_lib.IMAGE_MEAN), "std": list(data_lib.IMAGE_STD)})
    self.towers = ClipTowers(
        tower_config.vit_from_config(m.image, embed_dim=m.embed_dim, dtype=dtype,
                                     pixel_mean=self.image_normalization["mean"],
                                     pixel_std=self.image_normalization["std"]),
        tower_config.text_transformer_from_config(m.text, vocab_size=self.vocab_size,
                                                  max_len=config.data.max_text_len,
                                                  embed_dim=m.embed_dim, dtype=dtype))
    self.image_shape = (self.image_size, self.image_size, self.channels)

  # --- data ---------------------------------------------------------------------------------------
  def train_iterator(self, process_index: int, process_count: int):
    c = self.config
    if self.pairs is not None:
      return self.pairs.train_iterator(global_batch_size=c.data.global_batch_size,
                                       process_index=process_index, process_count=process_count,
                                       num_epochs=c.data.num_epochs,
                                       worker_count=c.data.worker_count)
    return data_lib.train_iterator(
        self.data_dir, split="train", global_batch_size=c.data.global_batch_size,
        process_index=process_index, process_count=process_count, seed=c.seed,
        num_epochs=c.data.num_epochs, max_text_len=c.data.max_text_len, augment=c.data.augment,
        worker_count=c.data.worker_count, skip_bad_records=c.data.skip_bad_records)

  def val_iterator(self, process_index: int, process_count: int):
    c = self.config
    if self.pairs is not None:
      return self.pairs.val_iterator(global_batch_size=c.data.global_batch_size,
                                     process_index=process_index, process_count=process_count)
    return data_lib.train_iterator(
        self.data_dir, split=c.data.eval_split, global_batch_size=c.data.global_batch_size,
        process_index=process_index, process_count=process_count, seed=c.seed, num_epochs=1,
        max_text_len=c.data.max_text_len, augment=False, worker_count=0,
        skip_bad_records=c.data.skip_bad_records)

  # --- model --------------------------------------------------------------------------------------
  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    t = self.config.task
    params = self.towers.init(rng, self.image_shape, self.config.data.max_text_len,
                              t.init_temperature)
    if t.loss == "sigmoid":
      params["logit_bias"] = jnp.asarray(t.init_logit_bias, jnp.float32)
    return params

  def logit_scale(self, params) -> jax.Array:
    return jnp.minimum(jnp.exp(params["log_logit_scale"]), self.config.task.max_logit_scale)

  def embed(self, params, batch, rng, *, train: bool) -> dict[str, jax.Array]:
    return self.towers.embed(params, batch, rng, train=train)

  def loss_from_embeddings(self, params, embeddings, batch):
    t = self.config.task
    return clip_loss(embeddings, self.logit_scale(params), self.mesh, kind=t.loss,
                     impl=t.loss_impl, logit_bias=params.get("logit_bias"))

  def loss(self, params, batch, rng, *, train: bool):
    return self.loss_from_embeddings(params, self.embed(params, batch, rng, train=train), batch)

  def flops_per_example(self) -> float | None:
    return float(flops_lib.vit_flops(self.towers.image_tower, self.image_shape)
                 + flops_lib.text_transformer_flops(self.towers.text_tower,
                                                    self.config.data.max_text_len))

  # --- evaluation ---------------------------------------------------------------------------------
  def eval_batches(self, batch_size: int):
    """The held-out pairs (the `data.eval_split` split, or the streamed source's hold-out) in
    batches of `batch_size` with a valid mask."""
    c = self.config
    if self.pairs is not None:
      return self.pairs.eval_batches(batch_size=batch_size)
    return data_lib.eval_batches(self.data_dir, split=c.data.eval_split, batch_size=batch_size,
                                 max_text_len=c.data.max_text_len,
                                 skip_bad_records=c.data.skip_bad_records)

  def embed_split_indexed(self, params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image_emb [N, D], text_emb [N, D], record index [N]) of the held-out pairs."""
    n_dev = self.mesh.shape[mesh_lib.DATA_AXIS]
    bs = max(n_dev, self.config.task.eval_batch_size // n_dev * n_dev)
    return evaluate.embed_pairs(self.towers, params, self.eval_batches(bs), self.mesh)

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    img, txt, _ = self.embed_split_indexed(params)
    return evaluate.retrieval_metrics(img, txt, self.config.data.eval_split,
                                      self.config.task.eval_ks, self.mesh, out_dir)

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    """The image tower (uint8 pixels, normalised inside) and the text tower (token ids +
    tokenizer.json)."""
    if not self.tokenizer_path.is_file():
      raise FileNotFoundError(f"{self.tokenizer_path} (the tokenizer of {self.data_name}) not "
                              "found: the text tower cannot be exported without its tokenizer")
    c = self.config
    if self.pairs is not None:
      example = next(iter(self.pairs.eval_batches(batch_size=8)))
    else:
      example = next(iter(data_lib.eval_batches(self.data_dir, split=c.data.eval_split,
                                                batch_size=8, max_text_len=c.data.max_text_len)))
    return export.export_towers(
        self.towers, image_shape=self.image_shape, max_text_len=c.data.max_text_len,
        normalization=self.image_normalization,
        special=self.metadata.get("special_token_ids", {}), tokenizer=self.tokenizer_path,
        example=example)

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    """Image and caption embeddings of the evaluation split, ids = record index in the split;
    captions query the images and images the captions (the evaluator's t2i and i2t)."""
    split = self.config.data.eval_split
    img, txt, index = self.embed_split_indexed(params)
    what = (f"record index in split {split!r} of {self.data_dir}" if self.pairs is None else
            f"index (key hash, or tfds record index) of a held-out sample of {self.data_name}")
    return export.export_corpus(img, txt, index, what)
