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
import numpy as np

from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines.featurize import load_modality_features
from data_pipelines import sources as sources_lib
from mmcl.config import Config, ConfigError
from mmcl.eval import seqrec
from mmcl.export import sequences
from mmcl.losses import sharded as sharded_losses
from mmcl.models import fusion
from mmcl.models.layers import l2_normalize
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks.mmsrec.data import cold_items
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
    self.features_np = load_modality_features(
        config.data.dir, self.num_items, t.modalities, text_features=config.data.text_features,
        lexical_dim=t.lexical_dim, seed=config.seed)
    self.cold_np = cold_items(self.num_items, t.cold_item_fraction, t.cold_item_seed)
    m = config.model
    self.encoder = fusion.FusionEncoder(len(t.modalities), m.width, m.depth, m.num_heads,
                                        m.mlp_dim, config.data.max_len, m.dropout)
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
    length = self.config.data.max_len
    feats = tuple(jnp.zeros((1, length, f.shape[1])) for f in self.features_np)
    avail = jnp.ones((1, length, len(feats)), bool)
    return self.encoder.init(rng, feats, avail, jnp.zeros((1, length), bool))["params"]

  # --- towers --------------------------------------------------------------------------------------
  def _feats(self, items: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.asarray(f)[items] for f in self.features_np)

  def _available(self, items: jax.Array, modality_on: tuple[bool, ...] | None = None) -> jax.Array:
    """[B, L] items → [B, L, M] bool (real position and modality switched on)."""
    on = jnp.asarray(modality_on if modality_on is not None else (True,) * len(self.features_np))
    return (items != 0)[..., None] & on

  def encode_sequences(self, params, items, masked=None, *, modality_on=None, train=False,
                       rng=None) -> jax.Array:
    """items: [B, L] int (0 = padding); masked: [B, L] bool or None → [B, L, d]."""
    return self.encoder.apply({"params": params}, self._feats(items),
                              self._available(items, modality_on), masked, train=train,
                              rngs={"dropout": rng} if train else None)

  def item_tower(self, params, items: jax.Array | None = None, *, train=False, rng=None
                 ) -> jax.Array:
    """[K] item indices (default all 0..N) → [K, d] unit-norm embeddings (row of item 0 unused)."""
    if items is None:
      items = jnp.arange(self.num_items + 1)
    h = self.encode_sequences(params, jnp.maximum(items, 1)[:, None], None, train=train, rng=rng)
    return l2_normalize(h[:, 0])

  # --- losses --------------------------------------------------------------------------------------
  def _original(self, batch) -> jax.Array:
    inputs, labels = batch["inputs"], batch["labels"]
    orig = jnp.where(labels > 0, labels, inputs)
    orig = jnp.where(orig > self.num_items, 0, orig)
    cold = jnp.asarray(self.cold_np)
    return jnp.where(cold[orig], 0, orig)  # held-out items never appear in training

  def loss(self, params, batch, rng, *, train: bool):
    if "history" in batch:  # validation rows: full-ranking Recall@10 of the next item
      return self._val_metrics(params, batch)
    items = self._original(batch)
    if self.config.task.stage == "pretrain":
      return self._pretrain_loss(params, items, rng, train=train)
    return self._cloze_loss(params, batch, items, rng, train=train)

  def _pretrain_loss(self, params, items, rng, *, train):
    t = self.config.task
    m = len(self.features_np)
    views = {"v": tuple(j == 0 for j in range(m)), "t": tuple(j == m - 1 for j in range(m)),
             "vt": (True,) * m}
    keys = jax.random.split(rng, 6)
    reps, k = {}, 0
    for name, on in views.items():
      for copy in (1, 2):
        h = self.encode_sequences(params, items, None, modality_on=on, train=train, rng=keys[k])
        reps[f"{name}{copy}"] = l2_normalize(h[:, -1])
        k += 1
    valid = items[:, -1] != 0
    pairs = (("v1", "v2"), ("v1", "t1"), ("t1", "t2"), ("vt1", "vt2"))
    terms = [sharded_losses.infonce_over_mesh(reps[a], reps[b], self.mesh,
                                              logit_scale=1.0 / t.temperature, a_valid=valid,
                                              b_valid=valid) for a, b in pairs]
    loss = sum(terms) / len(terms)
    return loss, {f"cl_{a}_{b}": v for (a, b), v in zip(pairs, terms)}

  def _cloze_loss(self, params, batch, items, rng, *, train):
    t = self.config.task
    k_seq, k_item = jax.random.split(rng)
    masked = (batch["labels"] > 0) & (items != 0)
    masked = masked.at[:, -1].set(items[:, -1] != 0)  # always the most recent position
    h = l2_normalize(self.encode_sequences(params, items, masked, train=train, rng=k_seq))  # [B, L, d]
    cand = self.item_tower(params, train=train, rng=k_item)  # [N + 1, d]
    allowed = ~jnp.asarray(self.cold_np).at[0].set(True)  # not padding, not held out
    # Full softmax over all items through the loss core: the item table is split over the mesh's
    # data axis, the masked positions' queries are replicated (see mmcl.losses.corpus).
    loss, rank = sharded_losses.corpus_softmax_over_mesh(
        h.reshape(-1, h.shape[-1]), cand, items.reshape(-1), self.mesh,
        logit_scale=1.0 / t.temperature, valid=masked.reshape(-1), corpus_valid=allowed,
        impl=t.loss_impl, block_size=t.loss_block_size, return_ranks=True)
    w = masked.astype(jnp.float32)
    hit = (rank.reshape(masked.shape) < 10) * w
    return loss, {"masked_per_row": w.sum(1).mean(),
                "train_recall@10": hit.sum() / jnp.maximum(w.sum(), 1.0)}

  def _query(self, params, history: jax.Array) -> jax.Array:
    """history: [B, L] left-padded → [B, d]: the output at an appended [MASK] slot."""
    seq = jnp.concatenate([history[:, 1:], jnp.ones_like(history[:, :1])], axis=1)
    masked = jnp.zeros(seq.shape, bool).at[:, -1].set(True)
    return l2_normalize(self.encode_sequences(params, seq, masked)[:, -1])

  def _val_metrics(self, params, batch):
    q = self._query(params, batch["history"])
    cand = self.item_tower(params)
    scores = q @ cand.T
    scores = scores.at[:, 0].set(-jnp.inf)
    target = batch["target"]
    tscore = jnp.take_along_axis(scores, target[:, None], 1)[:, 0]
    rank = (scores > tscore[:, None]).sum(1)
    w = batch["valid"].astype(jnp.float32)
    recall = ((rank < 10) * w).sum() / jnp.maximum(w.sum(), 1.0)
    return -recall, {"recall@10": recall}

  def flops_per_example(self) -> float:
    m, length = self.config.model, self.config.data.max_len
    dims = tuple(f.shape[1] for f in self.features_np)
    f = fusion.fusion_flops(length, len(dims), m.width, m.depth, m.mlp_dim, dims)
    return f * (6 if self.config.task.stage == "pretrain" else 1)

  # --- evaluation ----------------------------------------------------------------------------------
  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    t = self.config.task
    user_items, num_items = seqrec.load_interactions(self.config.data.dir)
    item_emb = np.asarray(jax.jit(self.item_tower)(params)).copy()
    item_emb[0] = 0.0
    q_fn = jax.jit(lambda x: self._query(params, x), out_shardings=mesh_lib.replicated(self.mesh))
    out: dict[str, float] = {"num_items": float(num_items),
                             "num_cold_items": float(self.cold_np.sum())}
    for split in t.eval_splits:
      users, history, target = seqrec.eval_cases(user_items, split, self.config.data.max_len)
      q = mesh_lib.embed_rows(q_fn, [history], self.mesh, t.eval_batch_size)
      seen = [user_items[u] for u in users]
      kw = dict(ks=t.eval_ks, num_negatives=t.eval_num_negatives, max_users=t.eval_max_users,
                seed=t.eval_seed, full_ranking=t.eval_full_ranking, mesh=self.mesh)
      out.update(seqrec.next_item_metrics(q, item_emb, target, seen, prefix=split, **kw))
      if self.cold_np.any():
        out.update(seqrec.next_item_metrics(q, item_emb, target, seen, prefix=f"{split}_cold",
                                            case_mask=self.cold_np[target], **kw))
    return out

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    """"item": an item's content features (the M modality vectors concatenated in
    `task.modalities` order, [b, Σ D_m]) → its unit-norm embedding, no item id involved, so items
    unseen in training are embedded from content; "user": a history of item ids → the unit-norm
    output at an appended [MASK] slot (`_query`, the feature table embedded in the artifact)."""
    t = self.config.task
    dims = [int(f.shape[1]) for f in self.features_np]
    splits = np.cumsum(dims)[:-1].tolist()

    def item(p, x):  # = item_tower on a length-1 sequence of these features, all modalities on
      feats = tuple(f[:, None] for f in jnp.split(x, splits, axis=1))
      avail = jnp.ones((x.shape[0], 1, len(dims)), bool)
      return l2_normalize(self.encoder.apply({"params": p}, feats, avail, None, train=False)[:, 0])

    sources = {"text": f"the text tower's sentence embedding of the item text "
                       f"({self.config.data.text_features or 'TF-IDF + SVD fallback'})",
               "lexical": f"TF-IDF + truncated SVD (width {t.lexical_dim}) of the item text, fitted "
                          "on the dataset's items"}
    example = np.concatenate([f[1:9] for f in self.features_np], axis=1)
    towers = sequences.sequence_export_towers(
        lambda p, x: self._query(p, x), None, max_len=self.config.data.max_len,
        vocabulary=sequences.item_vocabulary_file(self.config.data.dir, self.num_items),
        example=seqrec.histories_of_test_users(self.config.data.dir, self.config.data.max_len)[:8])
    item_tower = TowerExport(
        fn=item, input_spec=jax.ShapeDtypeStruct((1, sum(dims)), jnp.float32),
        preprocessing={"input": "item_features", "layout": "the modality vectors concatenated",
                       "modalities": [{"name": name, "dim": d, "source": sources.get(name, name)}
                                      for name, d in zip(t.modalities, dims)]},
        example=example)
    return {"user": towers["user"]._replace(l2_normalized=True), "item": item_tower}

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    """Every item's content embedding (the evaluator's item table), queried by the test users."""
    t = self.config.task
    item_emb = np.asarray(jax.jit(self.item_tower)(params))
    q_fn = jax.jit(lambda x: self._query(params, x), out_shardings=mesh_lib.replicated(self.mesh))
    history = seqrec.histories_of_test_users(self.config.data.dir, self.config.data.max_len)
    queries = mesh_lib.embed_rows(q_fn, [history], self.mesh, t.eval_batch_size)
    return sequences.sequence_export_corpus(
        item_emb, sequences.item_vocabulary_file(self.config.data.dir, self.num_items), queries)
