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

import math
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
from mmcl.eval import finite as finite_lib
from mmcl.eval import image_text as eval_lib
from mmcl.eval import trec as trec_lib
from mmcl.losses import sharded as sharded_losses
from mmcl.models import flops as flops_lib
from mmcl.models import tower_config
from mmcl.models.layers import l2_normalize
from mmcl.parallel import mesh as mesh_lib
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
    self.image_tower = tower_config.vit_from_config(
        m.image, embed_dim=m.embed_dim, dtype=dtype, pixel_mean=self.image_normalization["mean"],
        pixel_std=self.image_normalization["std"])
    self.text_tower = tower_config.text_transformer_from_config(
        m.text, vocab_size=self.vocab_size, max_len=config.data.max_text_len,
        embed_dim=m.embed_dim, dtype=dtype)

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
    k_img, k_txt = jax.random.split(rng)
    images = jnp.zeros((1, self.image_size, self.image_size, self.channels), jnp.float32)
    texts = jnp.ones((1, self.config.data.max_text_len), jnp.int32)
    t = self.config.task
    params = {
        "image": self.image_tower.init(k_img, images, train=False)["params"],
        "text": self.text_tower.init(k_txt, texts, train=False)["params"],
        "log_logit_scale": jnp.asarray(math.log(1.0 / t.init_temperature), jnp.float32),
    }
    if t.loss == "sigmoid":
      params["logit_bias"] = jnp.asarray(t.init_logit_bias, jnp.float32)
    return params

  def embed_images(self, params, images: jax.Array, *, train: bool = False,
                   rng: jax.Array | None = None) -> jax.Array:
    """images: [B, H, W, C] uint8 pixels (or float32, already normalised) → [B, D] unit-norm
    float32."""
    rngs = {"dropout": rng} if train else None
    return l2_normalize(self.image_tower.apply({"params": params["image"]}, images, train=train,
                                                rngs=rngs))

  def embed_texts(self, params, texts: jax.Array, *, train: bool = False,
                  rng: jax.Array | None = None) -> jax.Array:
    """texts: [B, L] int32 → [B, D] unit-norm float32."""
    rngs = {"dropout": rng} if train else None
    return l2_normalize(self.text_tower.apply({"params": params["text"]}, texts, train=train,
                                               rngs=rngs))

  def logit_scale(self, params) -> jax.Array:
    return jnp.minimum(jnp.exp(params["log_logit_scale"]), self.config.task.max_logit_scale)

  def embed(self, params, batch, rng, *, train: bool) -> dict[str, jax.Array]:
    """{"image": [B, D], "text": [B, D]} unit-norm embeddings of the batch."""
    k_img, k_txt = jax.random.split(rng)
    return {"image": self.embed_images(params, batch["image"], train=train, rng=k_img),
            "text": self.embed_texts(params, batch["text"], train=train, rng=k_txt)}

  def loss_from_embeddings(self, params, embeddings, batch):
    img, txt = embeddings["image"], embeddings["text"]
    scale = self.logit_scale(params)
    t = self.config.task
    if t.loss == "infonce":
      loss = sharded_losses.infonce_over_mesh(img, txt, self.mesh, logit_scale=scale,
                                              impl=t.loss_impl)
    else:
      loss = sharded_losses.sigmoid_loss_over_mesh(img, txt, self.mesh, logit_scale=scale,
                                                   logit_bias=params["logit_bias"], impl=t.loss_impl)
    return loss, {"temperature": 1.0 / scale, "logit_scale": scale}

  def loss(self, params, batch, rng, *, train: bool):
    return self.loss_from_embeddings(params, self.embed(params, batch, rng, train=train), batch)

  def flops_per_example(self) -> float | None:
    image_shape = (self.image_size, self.image_size, self.channels)
    return float(flops_lib.vit_flops(self.image_tower, image_shape)
                 + flops_lib.text_transformer_flops(self.text_tower, self.config.data.max_text_len))

  # --- evaluation ---------------------------------------------------------------------------------
  def embed_split(self, params, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeds every pair of `split` with the mesh → (image_emb [N, D], text_emb [N, D]) numpy.

    With a webdataset/tfds/parquet source, `split` is ignored: the held-out samples are embedded.
    """
    img, txt, _ = self.embed_split_indexed(params, split)
    return img, txt

  def embed_split_indexed(self, params, split: str
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`embed_split` plus each row's record index in the split: index [N] int64."""
    c = self.config
    sharding = mesh_lib.batch_sharding(self.mesh)
    embed_img = jax.jit(lambda p, x: self.embed_images(p, x), out_shardings=mesh_lib.replicated(
        self.mesh))
    embed_txt = jax.jit(lambda p, x: self.embed_texts(p, x), out_shardings=mesh_lib.replicated(
        self.mesh))
    n_dev = self.mesh.shape[mesh_lib.DATA_AXIS]
    bs = max(n_dev, c.task.eval_batch_size // n_dev * n_dev)
    imgs, txts, indices = [], [], []
    if self.pairs is not None:
      batches = self.pairs.eval_batches(batch_size=bs)
    else:
      batches = data_lib.eval_batches(self.data_dir, split=split, batch_size=bs,
                                      max_text_len=c.data.max_text_len,
                                      skip_bad_records=c.data.skip_bad_records)
    for batch in batches:
      valid = np.asarray(batch["valid"])
      x = jax.device_put(np.asarray(batch["image"]), sharding)
      y = jax.device_put(np.asarray(batch["text"]), sharding)
      imgs.append(np.asarray(embed_img(params, x))[valid])
      txts.append(np.asarray(embed_txt(params, y))[valid])
      indices.append(np.asarray(batch["index"])[valid])
    return np.concatenate(imgs), np.concatenate(txts), np.concatenate(indices)

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    split = self.config.data.eval_split
    img, txt = self.embed_split(params, split)
    finite_lib.require_scorable({f"image tower ({split} split)": img,
                                 f"text tower ({split} split)": txt})
    metrics = eval_lib.image_text_retrieval_metrics(img, txt, ks=tuple(self.config.task.eval_ks),
                                                    mesh=self.mesh)
    metrics["num_pairs"] = float(img.shape[0])
    metrics["chance_recall@1"] = 1.0 / img.shape[0]
    # TREC run + qrels files (top-100 per query) beside metrics.json, for external tools.
    rankings = eval_lib.image_text_rankings(img, txt, 100, mesh=self.mesh)
    for direction, r in rankings.items():
      trec_lib.write_run_and_qrels(out_dir, direction, r.indices, r.scores, r.qrels)
    return metrics

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    """The image tower (uint8 pixels, normalised inside) and the text tower (token ids +
    tokenizer.json)."""
    c = self.config
    norm = self.image_normalization
    special = self.metadata.get("special_token_ids", {})
    tokenizer = self.tokenizer_path
    if not tokenizer.is_file():
      raise FileNotFoundError(f"{tokenizer} (the tokenizer of {self.data_name}) not found:"
                              " the text tower cannot be exported without its tokenizer")
    length = c.data.max_text_len
    if self.pairs is not None:
      example = next(iter(self.pairs.eval_batches(batch_size=8)))
    else:
      example = next(iter(data_lib.eval_batches(self.data_dir, split=c.data.eval_split,
                                                batch_size=8, max_text_len=length)))
    image = TowerExport(
        fn=lambda p, x: self.embed_images(p, x),
        input_spec=jax.ShapeDtypeStruct((1, self.image_size, self.image_size, self.channels),
                                        jnp.uint8),
        preprocessing={
            "input": "image", "layout": "NHWC", "height": self.image_size,
            "width": self.image_size, "channels": self.channels, "channel_order": "RGB",
            "dtype": "uint8",
            "source": "uint8 pixels in [0, 255], already at height x width (no resize or crop)",
            "normalized_in_model": True,
            # Applied inside the exported tower (the ViT's input path), as in training.
            "formula": "x = (pixel / 255 - mean[c]) / std[c]",
            "mean": list(norm["mean"]), "std": list(norm["std"]),
            "as_computed": "x = float32(pixel) * scale[c] - shift[c] in float32",
            "scale": [float(np.float32(1.0 / (255.0 * s))) for s in norm["std"]],
            "shift": [float(np.float32(m / s)) for m, s in zip(norm["mean"], norm["std"])]},
        files=(), example=np.asarray(example["image"]))
    text = TowerExport(
        fn=lambda p, x: self.embed_texts(p, x),
        input_spec=jax.ShapeDtypeStruct((1, length), jnp.int32),
        preprocessing={
            "input": "token_ids", "tokenizer": tokenizer.name, "library": "huggingface tokenizers",
            "encode": "Tokenizer.from_file(tokenizer).encode(text).ids (the post-processor adds "
                      "[BOS] ... [EOS]; the normaliser lowercases)",
            "max_len": length, "pad_id": int(special.get("pad", 0)),
            "bos_id": int(special.get("bos", 2)), "eos_id": int(special.get("eos", 3)),
            "truncation": "ids longer than max_len keep their first max_len - 1 ids followed by "
                          "eos_id, so the last non-pad id of every row is eos_id",
            "padding": "right-pad with pad_id to max_len"},
        files=(str(tokenizer),), example=np.asarray(example["text"]))
    return {"image": image, "text": text}

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    """Image and caption embeddings of the evaluation split, ids = record index in the split;
    captions query the images and images the captions (the evaluator's t2i and i2t)."""
    split = self.config.data.eval_split
    img, txt, index = self.embed_split_indexed(params, split)
    ids = [str(int(i)) for i in index]
    what = (f"record index in split {split!r} of {self.data_dir}" if self.pairs is None else
            f"index (key hash, or tfds record index) of a held-out sample of {self.data_name}")
    return {"images": CorpusExport("image", img, ids, f"images; id = {what}",
                                   query_tower="text", queries=txt),
            "captions": CorpusExport("text", txt, ids, f"captions; id = {what}",
                                     query_tower="image", queries=img)}
