"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018), the shared baseline.

Batch (data.sequence_mode = next_item): `inputs` [B, L] int32 and `targets` [B, L] int32 (items
1..N, 0 = padding / no target), rows of the leave-one-out training part (`data_pipelines.sequences`).
Model: item table E [N, d] (row 0 = padding is a constant zero vector), h = SequenceEncoder(E[x]·√d)
(`mmcl.models.seq_transformer`), score(t, i) = ⟨h_t, E_i⟩.
Loss (the paper's Eq. for BCE with one sampled negative per position):
  L = −Σ_{t: y_t ≠ 0} [log σ(⟨h_t, E_{y_t}⟩) + log(1 − σ(⟨h_t, E_{n_t}⟩))] / #{t: y_t ≠ 0}
with n_t drawn uniformly from the items the user does not have in its training part.
Evaluation (`evaluate`): leave-one-out valid/test, (1) the paper's protocol: the target ranked
against 100 sampled items the user never interacted with, at most 10,000 users, HR@k / NDCG@k;
(2) full ranking over all N items, Recall@k / NDCG@k. The protocol (leave-one-out cases, sampled
and full ranking) is `mmcl.eval.seqrec`, shared with Demure and MMSRec.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipelines
from data_pipelines import records
from mmcl.config import Config
from mmcl.eval import seqrec
from mmcl.export import sequences
from mmcl.losses.negatives import sample_train_negatives
from mmcl.models import seq_transformer
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks.sasrec.loss import bce_sampled_loss
from mmcl.train.config import data_view
from mmcl.train.task import CorpusExport, Task, TowerExport


class SASRecTask(Task):
  """ID-based SASRec trained with BCE and one sampled negative per position."""

  primary_metric = "valid/ndcg@10"

  @classmethod
  def declare_config(cls, c: Config) -> None:
    t = c.task
    t.define("num_candidate_draws", 4, "candidates drawn per position to find an unseen negative")
    t.define("l2_emb", 0.0, "L2 penalty on the item embeddings (SASRec's l2_emb)")
    seqrec.declare_eval_config(t)
    m = c.model
    m.define("hidden", 50, "embedding / hidden width d")
    m.define("num_blocks", 2, "self-attention blocks")
    m.define("num_heads", 1, "attention heads")
    m.define("dropout", 0.5, "dropout rate (SASRec: 0.2 for ML-1M, 0.5 for sparse data)")
    seqrec.declare_sequence_data(c)

  def __init__(self, config: Config, mesh):
    super().__init__(config, mesh)
    if config.data.sequence_mode != "next_item":
      raise ValueError(f"config key data.sequence_mode = {config.data.sequence_mode!r}: SASRec "
                       f"trains on 'next_item' rows")
    meta = records.load_metadata(config.data.dir, build_hint=pipelines.BUILD_HINT)
    self.num_items = int(meta["num_items"])
    m = config.model
    self.encoder = seq_transformer.SequenceEncoder(
        max_len=config.data.max_len, num_blocks=m.num_blocks, num_heads=m.num_heads,
        dropout=m.dropout, causal=True)

  def train_iterator(self, process_index: int, process_count: int):
    return pipelines.build_train_iterator(data_view(self.config, sequence_mode="next_item"),
                                          process_index=process_index, process_count=process_count)

  def init_params(self, rng: jax.Array) -> dict[str, Any]:
    k_emb, k_enc = jax.random.split(rng)
    d, length = self.config.model.hidden, self.config.data.max_len
    return {"item_embedding": seq_transformer.XAVIER(k_emb, (self.num_items, d), jnp.float32),
            "encoder": self.encoder.init(k_enc, jnp.zeros((1, length, d)),
                                         jnp.ones((1, length), bool))["params"]}

  def item_table(self, params) -> jax.Array:
    """[N + 1, d]: row 0 (padding) is a constant zero vector, rows 1..N the learned items."""
    e = params["item_embedding"]
    return jnp.concatenate([jnp.zeros((1, e.shape[1]), e.dtype), e])

  def encode(self, params, items: jax.Array, *, train: bool = False,
             rng: jax.Array | None = None) -> jax.Array:
    """items: [B, L] int32 (0 = padding) → [B, L, d] float32 sequence outputs."""
    table = self.item_table(params)
    tokens = table[items] * math.sqrt(table.shape[1])
    return self.encoder.apply({"params": params["encoder"]}, tokens, items != 0, train=train,
                              rngs={"dropout": rng} if train else None)

  def loss(self, params, batch, rng, *, train: bool):
    inputs, targets = batch["inputs"], batch["targets"]
    k_drop, k_neg = jax.random.split(rng)
    h = self.encode(params, inputs, train=train, rng=k_drop)
    seen = jnp.concatenate([inputs, targets], axis=1)
    negs = sample_train_negatives(k_neg, seen, targets.shape, self.num_items,
                                  self.config.task.num_candidate_draws)
    table = self.item_table(params)
    weight = (targets != 0).astype(jnp.float32)
    loss, acc = bce_sampled_loss(h, table[targets], table[negs], weight)
    if self.config.task.l2_emb:
      loss = loss + self.config.task.l2_emb * jnp.sum(params["item_embedding"] ** 2)
    return loss, {"pairwise_accuracy": acc, "targets_per_row": weight.sum(1).mean()}

  def flops_per_example(self) -> float:
    m = self.config.model
    length = self.config.data.max_len
    return seq_transformer.seq_encoder_flops(length, m.hidden, m.num_blocks) \
        + 2 * 2 * length * m.hidden  # positive and negative logits

  # --- evaluation ---------------------------------------------------------------------------------
  def user_embeddings(self, params, history: np.ndarray) -> np.ndarray:
    """history: [U, L] int32 → [U, d]: the sequence output at the last (most recent) position."""
    fn = jax.jit(lambda x: self.encode(params, x)[:, -1],
                 out_shardings=mesh_lib.replicated(self.mesh))
    return mesh_lib.embed_rows(fn, [history], self.mesh, self.config.task.eval_batch_size)

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    t = self.config.task
    user_items, num_items = seqrec.load_interactions(self.config.data.dir)
    item_emb = np.asarray(self.item_table(params))
    out: dict[str, float] = {"num_items": float(num_items)}
    for split in t.eval_splits:
      users, history, target = seqrec.eval_cases(user_items, split, self.config.data.max_len)
      q = self.user_embeddings(params, history)
      out.update(seqrec.next_item_metrics(
          q, item_emb, target, [user_items[u] for u in users], ks=t.eval_ks,
          num_negatives=t.eval_num_negatives, max_users=t.eval_max_users, seed=t.eval_seed,
          full_ranking=t.eval_full_ranking, mesh=self.mesh, prefix=split))
    return out

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    """"user": history of item ids [b, L] (left-padded) → the sequence output at the most recent
    position [b, d]; "item": item id [b, 1] → its table row [b, d]. Score = inner product."""
    vocabulary = sequences.item_vocabulary_file(self.config.data.dir, self.num_items)
    return sequences.sequence_export_towers(
        lambda p, x: self.encode(p, x)[:, -1], np.asarray(self.item_table(params)),
        max_len=self.config.data.max_len, vocabulary=vocabulary,
        example=seqrec.histories_of_test_users(self.config.data.dir, self.config.data.max_len)[:8])

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    """Every item, queried by the users of the test split (their histories before the target)."""
    vocabulary = sequences.item_vocabulary_file(self.config.data.dir, self.num_items)
    history = seqrec.histories_of_test_users(self.config.data.dir, self.config.data.max_len)
    return sequences.sequence_export_corpus(np.asarray(self.item_table(params)), vocabulary,
                                            self.user_embeddings(params, history))
