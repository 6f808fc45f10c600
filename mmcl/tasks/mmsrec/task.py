"""MMSRec: ID-free multi-modal sequential recommendation (Song et al., arXiv:2304.13277).

Items are only their frozen content features (`task.modalities`, see `data_pipelines.featurize.
load_modality_features`: "text" = all-MiniLM-L6-v2 sentence embeddings of the item text, "lexical" =
TF-IDF + SVD of it; the datasets here have no images, so "lexical" stands in for the vision slot
and the combinatorial loss's "v" view). One `mmcl.models.fusion.FusionEncoder` encodes sequences
and, as length-1 sequences, items.

Batches: the pipeline's `masked` rows (`inputs` with mask id N + 1 where masked, `labels` = the
original item there), from which the original sequence is rebuilt.
Stages (`task.stage`):
  pretrain  combinatorial contrastive loss: each sequence encoded as lexical-only ("v"), text-only
            ("t") and both ("vt"), twice each (different dropout); the mean of symmetric InfoNCE
            over (v1, v2), (v1, t1), (t1, t2), (vt1, vt2) on the L2-normalised output at the most
            recent position, τ = `task.temperature` (0.05), negatives = the global batch
            (`mmcl.losses.sharded.infonce_over_mesh`).
  finetune  cloze: positions masked with prob `data.mask_prob` (0.2) plus always the most recent
            one; logits cos(h_t, item_tower(i)) / τ over ALL items i (full softmax), cross-entropy
            at masked positions, computed by `mmcl.losses.sharded.corpus_softmax_over_mesh`: every
            item's item-tower embedding is computed in the step and the item table is split over
            the data axis (`task.loss_impl` "tiled" visits it in chunks, memory O(B·L·chunk)).
            `task.init_from` loads a pretraining workdir's newest parameters (transfer: pretrain on
            one dataset, fine-tune on another; the fusion weights do not depend on the item set).
Validation (`val_iterator`, for `train.best_metric = val/recall@10`): full-ranking Recall@10 of the
valid split's next item, i.e. early stopping keeps the best checkpoint by validation Recall@10.
Evaluation: leave-one-out, full ranking over all items, Recall@k / NDCG@k (k = 10, 50); items in
`task.cold_item_fraction` never appear in training (removed from sequences, never a candidate) and
are reported separately (`test_cold/*`).

`data.source` is '' (data.dir) or arrayrecord:DIR: a webdataset / tfds / parquet stream is refused
in one line, since the task needs random access to the item catalogue (every item's text features,
computed over all items at start-up) and each user's whole interaction history.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines.featurize import load_modality_features
from data_pipelines import sources as sources_lib
from mmcl.config import Config, ConfigError
from mmcl.eval import seqrec
from mmcl.models import fusion
from mmcl.tasks.mmsrec import evaluate, export
from mmcl.tasks.mmsrec.data import cold_items, original_items
from mmcl.tasks.mmsrec.loss import cloze_loss, pretrain_loss, validation_recall
from mmcl.tasks.mmsrec.model import MMSRecNet
from mmcl.train.config import data_view, task_config
from mmcl.train.task import CorpusExport, Task, TowerExport


# Why `data.source` must be an ArrayRecord dataset (no stream) for this task.
SOURCE_NEEDS = ("random access to the item catalogue (every item's text features, computed over all "
                "items at start-up) and each user's whole interaction history")


class MMSRecTask(Task):
  """ID-free fusion-encoder recommender: combinatorial pretraining and cloze fine-tuning."""

  primary_metric = "valid/full/recall@10"

  @classmethod
  def declare_config(cls, c: Config) -> None:
    sources_lib.define_arrayrecord_only(c.data, SOURCE_NEEDS)
    t = c.task
    t.define("stage", "finetune", "pretrain (combinatorial contrastive) or finetune (cloze)",
             choices=("pretrain", "finetune"))
    t.define("modalities", ("lexical", "text"), "item modalities in fusion order (see data_pipelines.featurize)")
    t.define("lexical_dim", 128, "width of the TF-IDF + SVD features")
    t.define("temperature", 0.05, "τ of the pretraining InfoNCE and of the cloze logits")
    t.define("init_from", "", "workdir whose newest checkpoint's parameters initialise this run "
             "(transfer / fine-tuning after pretraining); '' = random init")
    t.define("cold_item_fraction", 0.0, "fraction of items held out of training entirely")
    t.define("cold_item_seed", 0, "seed of the held-out items")
    t.define("loss_impl", "auto", "kernel of the cloze full softmax (mmcl.losses.corpus_softmax)",
             choices=("auto", "dense", "tiled"))
    t.define("loss_block_size", None, "item chunk of the tiled kernel (None = the default)",
             type=(int, type(None)))
    seqrec.declare_eval_config(t, ks=(10, 50), num_negatives=0)
    m = c.model
    m.define("width", 512, "fusion width d")
    m.define("depth", 2, "fusion Transformer layers")
    m.define("num_heads", 8, "attention heads")
    m.define("mlp_dim", 1024, "feed-forward width")
    m.define("dropout", 0.1, "dropout rate")
    seqrec.declare_sequence_data(c, max_len=20)
    c.data.sequence_mode = "masked"
    c.data.define("text_features", "", "precomputed item text embeddings (see data_pipelines.featurize)")

  def __init__(self, config: Config, mesh):
    super().__init__(config, mesh)
    try:
      config.data.dir = sources_lib.arrayrecord_dir(config.data.source, config.data.dir,
                                                    needs=SOURCE_NEEDS)
    except sources_lib.SourceConfigError as e:
      raise ConfigError(f"config key 'data.source' = {config.data.source!r}: {e}") from None
    if config.data.sequence_mode != "masked":
      raise ValueError(f"config key data.sequence_mode = {config.data.sequence_mode!r}: MMSRec "
                       f"reads 'masked' rows")
    t = config.task
    meta = records.load_metadata(config.data.dir, build_hint=pipelines.BUILD_HINT)
    self.num_items = int(meta["num_items"])
    features = load_modality_features(
        config.data.dir, self.num_items, t.modalities, text_features=config.data.text_features,
        lexical_dim=t.lexical_dim, seed=config.seed)
    self.cold_np = cold_items(self.num_items, t.cold_item_fraction, t.cold_item_seed)
    m = config.model
    self.net = MMSRecNet(fusion.FusionEncoder(len(t.modalities), m.width, m.depth, m.num_heads,
                                              m.mlp_dim, config.data.max_len, m.dropout),
                         tuple(features))
    # Read eagerly: `init_params` is traced (under jit), where a checkpoint cannot be restored.
    self.initial_params = self._init_from_workdir(t.init_from) if t.init_from else None

  # --- data / params -------------------------------------------------------------------------------
  def train_iterator(self, process_index: int, process_count: int):
    return pipelines.build_train_iterator(data_view(self.config),
                                          process_index=process_index, process_count=process_count)

  def val_iterator(self, process_index: int, process_count: int):
    if self.config.task.stage != "finetune":
      return None
    return pipelines.build_eval_iterator(data_view(self.config), mode="valid",
                                         process_index=process_index, process_count=process_count)

  def _init_from_workdir(self, workdir: str) -> Any:
    """The newest checkpoint's params of another run (its own config rebuilds the abstract state)."""
    from mmcl.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    from mmcl.train import loop as loop_lib  # pylint: disable=g-import-not-at-top
    other = task_config(MMSRecTask, json.loads((pathlib.Path(workdir) / "config.json").read_text()))
    task = MMSRecTask(other, self.mesh)
    _, abstract, shardings, _, _ = loop_lib.build_state(other, task, self.mesh)
    ck = ckpt_lib.Checkpointer(workdir, read_only=True)
    step = ck.latest_step()
    if step is None:
      raise FileNotFoundError(f"config key task.init_from = {workdir}: no finished checkpoint")
    return jax.device_get(ck.restore(step, ckpt_lib.abstract_with_shardings(abstract,
                                                                           shardings)).params)

  def init_params(self, rng: jax.Array):
    if self.initial_params is not None:
      return jax.tree.map(jnp.asarray, self.initial_params)
    return self.net.init(rng, self.config.data.max_len)

  # --- losses --------------------------------------------------------------------------------------
  def loss(self, params, batch, rng, *, train: bool):
    if "history" in batch:  # validation rows: full-ranking Recall@10 of the next item
      return validation_recall(self.net, params, batch)
    items = original_items(batch, self.cold_np)
    t = self.config.task
    if t.stage == "pretrain":
      return pretrain_loss(self.net, params, items, rng, self.mesh, temperature=t.temperature,
                           train=train)
    return cloze_loss(self.net, params, batch["labels"], items, rng, self.mesh, self.cold_np, t,
                      train=train)

  def flops_per_example(self) -> float:
    m, length = self.config.model, self.config.data.max_len
    dims = tuple(f.shape[1] for f in self.net.features)
    f = fusion.fusion_flops(length, len(dims), m.width, m.depth, m.mlp_dim, dims)
    return f * (6 if self.config.task.stage == "pretrain" else 1)

  # --- evaluation ----------------------------------------------------------------------------------
  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    user_items, num_items = seqrec.load_interactions(self.config.data.dir)
    out = {"num_items": float(num_items), "num_cold_items": float(self.cold_np.sum())}
    out.update(evaluate.next_item_metrics(self.net, params, user_items, self.cold_np,
                                          self.config.task, self.mesh, self.config.data.max_len))
    return out

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    d = self.config.data
    return export.export_towers(self.net, self.config.task, d.dir, d.max_len, d.text_features)

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    return export.export_corpus(self.net, params, self.config.task, self.mesh,
                                self.config.data.dir, self.config.data.max_len)
