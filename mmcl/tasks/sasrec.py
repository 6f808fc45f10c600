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
(2) full ranking over all N items, Recall@k / NDCG@k. The helpers at the bottom of this module
are shared by the Demure and MMSRec tasks.
"""

from __future__ import annotations

import math
import pathlib
import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines import schemas
from data_pipelines import sequences as seq_lib
from mmcl.config import Config
from mmcl.eval import finite as finite_lib
from mmcl.eval import metrics as metrics_lib
from mmcl.eval import topk as topk_lib
from mmcl.models import seq_transformer
from mmcl.parallel import mesh as mesh_lib
from mmcl.train.task import CorpusExport, Task, TowerExport


# --- data helpers (shared by the recommendation tasks) -------------------------------------------


def declare_sequence_data(c: Config, *, max_len: int = 50) -> None:
  """Declares the interaction-data keys on `c.data` (max_len, sequence_mode, mask_prob)."""
  pipelines.define_config(c.data, schemas.INTERACTIONS)
  c.data.max_len = max_len


def data_view(config: Config, **overrides: Any) -> dict[str, Any]:
  """The data section plus the global seed as the plain mapping `data_pipelines` reads."""
  view = {k.split(".", 1)[1]: v for k, v in config.data.items()}
  view["seed"] = config.seed
  view.update(overrides)
  return view


def load_interactions(data_dir: str) -> tuple[list[np.ndarray], int]:
  """(per-user chronological item arrays [n_u] int32 in 1..N, N) of an `interactions` dataset."""
  meta = records.load_metadata(data_dir, build_hint=pipelines.BUILD_HINT)
  if meta.get("kind") != schemas.INTERACTIONS:
    raise ValueError(f"config key data.dir = {data_dir}: expected an '{schemas.INTERACTIONS}' "
                     f"dataset, found kind {meta.get('kind')!r}")
  src = records.ArrayRecordSource(data_dir, "sequences", metadata=meta)
  recs = src.read_many(list(range(len(src))))
  src.close()
  return [np.asarray(r["items"], np.int32) for r in recs], int(meta["num_items"])


def eval_cases(user_items: Sequence[np.ndarray], split: str, max_len: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Leave-one-out cases of `split` ('valid' | 'test').

  Returns:
    users [U] int64 (indices into user_items, users with >= 3 items), history [U, L] int32
    (left-padded, most recent last), target [U] int32.
  """
  users, hist, tgt = [], [], []
  for u, items in enumerate(user_items):
    ex = seq_lib.eval_example(items, split)
    if ex is not None:
      users.append(u)
      hist.append(ex[0])
      tgt.append(ex[1])
  if not users:
    raise ValueError(f"no user has >= 3 interactions: no '{split}' cases")
  return np.asarray(users, np.int64), seq_lib.pad_left(hist, max_len), np.asarray(tgt, np.int32)


def sample_train_negatives(rng: jax.Array, seen: jax.Array, shape: tuple[int, ...],
                           num_items: int, tries: int = 4) -> jax.Array:
  """Uniform items in 1..N that are not in the row's `seen` items (SASRec's `random_neq`).

  Draws `tries` candidates per position and keeps the first unseen one (the chance that all are
  seen is (|seen|/N)^tries, negligible for sparse data; then the last candidate is kept).

  Args:
    rng: PRNG key.
    seen: [B, S] int32, the row's items (0 = padding, never drawn anyway).
    shape: (B, L) output shape.
    num_items: N.
  Returns:
    [B, L] int32 in 1..N.
  """
  b = seen.shape[0]
  if shape[0] != b:
    raise ValueError(f"sample_train_negatives: shape {shape} and seen {seen.shape} disagree on B")
  cand = jax.random.randint(rng, (*shape, tries), 1, num_items + 1, dtype=jnp.int32)
  hit = (cand[..., None] == seen.reshape(b, *([1] * (len(shape) - 1)), 1, -1)).any(-1)
  first_ok = jnp.argmax(~hit, axis=-1)
  first_ok = jnp.where((~hit).any(-1), first_ok, tries - 1)
  return jnp.take_along_axis(cand, first_ok[..., None], axis=-1)[..., 0]


def bce_sampled_loss(h: jax.Array, pos_emb: jax.Array, neg_emb: jax.Array,
                     weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  """SASRec's BCE with one negative per position.

  Args:
    h: [B, L, D] sequence outputs; pos_emb, neg_emb: [B, L, D]; weight: [B, L] float (1 = target).
  Returns:
    (loss [], accuracy [] = share of positions scoring the positive above the negative).
  """
  pos = jnp.sum(h * pos_emb, -1)
  neg = jnp.sum(h * neg_emb, -1)
  per = jax.nn.softplus(-pos) + jax.nn.softplus(neg)  # −log σ(pos) − log(1 − σ(neg))
  denom = jnp.maximum(weight.sum(), 1.0)
  return (per * weight).sum() / denom, ((pos > neg) * weight).sum() / denom


def embed_rows(fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray], mesh,
               batch_size: int = 1024) -> np.ndarray:
  """Applies a jitted row-wise `fn(*batch_arrays) -> [b, D]` to all rows, batch-sharded on the mesh.

  arrays: each [R, ...]; the last batch is padded with row 0 and the padding dropped.
  Returns [R, D] float32 numpy.
  """
  n_dev = mesh.shape[mesh_lib.DATA_AXIS]
  bs = max(n_dev, batch_size // n_dev * n_dev)
  sharding = mesh_lib.batch_sharding(mesh)
  rows = arrays[0].shape[0]
  out = []
  for start in range(0, rows, bs):
    chunk = [a[start:start + bs] for a in arrays]
    real = chunk[0].shape[0]
    if real < bs:
      chunk = [np.concatenate([c, np.repeat(c[:1], bs - real, 0)]) for c in chunk]
    out.append(np.asarray(fn(*[jax.device_put(c, sharding) for c in chunk]))[:real])
  return np.concatenate(out).astype(np.float32)


def full_ranking_ranks(query_emb: np.ndarray, item_emb: np.ndarray, targets: np.ndarray,
                       mesh) -> np.ndarray:
  """0-based rank of each target among all N items by ⟨query, item⟩ (nothing excluded but the
  padding row; ties to the lower item index, as `topk.exact_topk`).

  query_emb: [U, D]; item_emb: [N + 1, D] (row 0 = padding); targets: [U] int in 1..N.
  Returns [U] int.
  """
  num_items = item_emb.shape[0] - 1
  return np.asarray(topk_lib.positive_ranks(
      query_emb, item_emb[1:], np.asarray(targets).astype(np.int64) - 1, np.arange(num_items),
      mesh=mesh))


def next_item_metrics(query_emb: np.ndarray, item_emb: np.ndarray, targets: np.ndarray,
                      seen: Sequence[np.ndarray], *, ks: Sequence[int], num_negatives: int,
                      max_users: int | None, seed: int, full_ranking: bool, mesh,
                      prefix: str, case_mask: np.ndarray | None = None) -> dict[str, float]:
  """Leave-one-out metrics of next-item scores ⟨query, item⟩.

  Args:
    query_emb: [U, D] user (sequence) representations.
    item_emb: [N + 1, D] item representations, row 0 = padding (never ranked).
    targets: [U] int in 1..N.
    seen: U arrays, every item each user interacted with (history, valid and test items).
    ks: cutoffs.
    num_negatives: sampled protocol's negatives per user (0 = skip the sampled protocol).
    max_users: sampled protocol's user cap (SASRec: 10,000), chosen with `seed`.
    full_ranking: also rank all N items (Recall@k / NDCG@k; no item excluded but padding).
    prefix: metric name prefix, e.g. "test".
    case_mask: optional [U] bool restricting both protocols to a subset (e.g. cold items).

  Returns:
    {prefix/hr@k, prefix/ndcg@k, prefix/mrr (sampled), prefix/full/recall@k, .../ndcg@k, .../mrr,
     prefix/num_users}.
  """
  query_emb, item_emb = np.asarray(query_emb, np.float32), np.asarray(item_emb, np.float32)
  targets = np.asarray(targets)
  if query_emb.ndim != 2 or item_emb.ndim != 2 or targets.shape != query_emb.shape[:1]:
    raise ValueError(f"next_item_metrics: expected query_emb [U, D], item_emb [N+1, D], targets "
                     f"[U]; got {query_emb.shape}, {item_emb.shape}, {targets.shape}")
  finite_lib.require_scorable({f"user embeddings ({prefix})": query_emb,
                               "item embeddings": item_emb[1:]})
  if case_mask is not None:
    idx = np.nonzero(case_mask)[0]
    query_emb, targets, seen = query_emb[idx], targets[idx], [seen[i] for i in idx]
  out: dict[str, float] = {f"{prefix}/num_users": float(len(targets))}
  if len(targets) == 0:
    return out
  num_items = item_emb.shape[0] - 1
  if num_negatives:
    rng = np.random.default_rng(seed)
    seen0 = [np.concatenate([[0], s]) for s in seen]  # never sample the padding row
    users, negs = metrics_lib.sample_negatives(rng, num_items + 1, seen0, num_negatives,
                                               max_users=max_users)
    m = metrics_lib.sampled_negative_metrics(query_emb[users], item_emb, targets[users], negs, ks)
    for k in ks:
      out[f"{prefix}/hr@{k}"] = m[f"hit_rate@{k}"]
      out[f"{prefix}/ndcg@{k}"] = m[f"ndcg@{k}"]
    out[f"{prefix}/mrr"] = m["mrr"]
    out[f"{prefix}/num_sampled_users"] = float(len(users))
  if full_ranking:
    m = metrics_lib.rank_metrics(full_ranking_ranks(query_emb, item_emb, targets, mesh), ks)
    for k in ks:
      out[f"{prefix}/full/recall@{k}"] = m[f"recall@{k}"]
      out[f"{prefix}/full/ndcg@{k}"] = m[f"ndcg@{k}"]
    out[f"{prefix}/full/mrr"] = m["mrr"]
  return out


def declare_eval_config(t: Config, *, ks: tuple[int, ...] = (1, 5, 10, 20),
                        num_negatives: int = 100) -> None:
  """Declares the leave-one-out evaluation keys on `c.task`."""
  t.define("eval_splits", ("valid", "test"), "leave-one-out splits the evaluator reports")
  t.define("eval_ks", ks, "cutoffs k of HR@k / Recall@k / NDCG@k")
  t.define("eval_num_negatives", num_negatives,
           "sampled protocol: negatives per user, never-interacted items (0 = off)")
  t.define("eval_max_users", 10000, "sampled protocol: evaluate at most this many random users "
           "(SASRec's cap)", type=(int, type(None)))
  t.define("eval_seed", 0, "seed of the sampled protocol's users and negatives")
  t.define("eval_full_ranking", True, "also rank all items (full-ranking Recall@k / NDCG@k)")
  t.define("eval_batch_size", 1024, "users per batch of the evaluator's forward passes")


# --- the task ------------------------------------------------------------------------------------


class SASRecTask(Task):
  """ID-based SASRec trained with BCE and one sampled negative per position."""

  primary_metric = "valid/ndcg@10"

  @classmethod
  def declare_config(cls, c: Config) -> None:
    t = c.task
    t.define("num_candidate_draws", 4, "candidates drawn per position to find an unseen negative")
    t.define("l2_emb", 0.0, "L2 penalty on the item embeddings (SASRec's l2_emb)")
    declare_eval_config(t)
    m = c.model
    m.define("hidden", 50, "embedding / hidden width d")
    m.define("num_blocks", 2, "self-attention blocks")
    m.define("num_heads", 1, "attention heads")
    m.define("dropout", 0.5, "dropout rate (SASRec: 0.2 for ML-1M, 0.5 for sparse data)")
    declare_sequence_data(c)

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
    return embed_rows(fn, [history], self.mesh, self.config.task.eval_batch_size)

  def evaluate(self, params, out_dir: str) -> dict[str, float]:
    t = self.config.task
    user_items, num_items = load_interactions(self.config.data.dir)
    item_emb = np.asarray(self.item_table(params))
    out: dict[str, float] = {"num_items": float(num_items)}
    for split in t.eval_splits:
      users, history, target = eval_cases(user_items, split, self.config.data.max_len)
      q = self.user_embeddings(params, history)
      out.update(next_item_metrics(
          q, item_emb, target, [user_items[u] for u in users], ks=t.eval_ks,
          num_negatives=t.eval_num_negatives, max_users=t.eval_max_users, seed=t.eval_seed,
          full_ranking=t.eval_full_ranking, mesh=self.mesh, prefix=split))
    return out

  # --- export to serving --------------------------------------------------------------------------
  def export_towers(self, params) -> dict[str, TowerExport]:
    """"user": history of item ids [b, L] (left-padded) → the sequence output at the most recent
    position [b, d]; "item": item id [b, 1] → its table row [b, d]. Score = inner product."""
    length = self.config.data.max_len
    _, history, _ = eval_cases(load_interactions(self.config.data.dir)[0], "test", length)
    return sequence_export_towers(
        lambda p, x: self.encode(p, x)[:, -1], np.asarray(self.item_table(params)),
        max_len=length, vocabulary=item_vocabulary_file(self.config.data.dir, self.num_items),
        example=history[:8])

  def export_corpus(self, params) -> dict[str, CorpusExport]:
    """Every item, queried by the users of the test split (their histories before the target)."""
    _, history, _ = eval_cases(load_interactions(self.config.data.dir)[0], "test",
                                self.config.data.max_len)
    return sequence_export_corpus(np.asarray(self.item_table(params)),
                                  item_vocabulary_file(self.config.data.dir, self.num_items),
                                  self.user_embeddings(params, history))


# --- export to serving: helpers shared by SASRec and Demure ---------------------------------------
def item_vocabulary_file(data_dir: str, num_items: int) -> str:
  """Writes the dataset's item ids in index order (line j = the id of item index j + 1) to a fresh
  temporary item_ids.txt, the file the exported towers map ids with; returns its path."""
  src = records.ArrayRecordSource(data_dir, "items", fields=["item_index", "item_id"])
  rows = src.read_many(list(range(len(src))))
  src.close()
  ids = [""] * num_items
  for r in rows:
    ids[int(r["item_index"]) - 1] = str(r["item_id"])
  if any(not i or "\n" in i for i in ids) or len(set(ids)) != num_items:
    raise ValueError(f"{data_dir}: the items split must give each of the {num_items} item indices "
                     "one unique id without newline")
  path = pathlib.Path(tempfile.mkdtemp(prefix="mmcl-export-")) / "item_ids.txt"
  path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
  return str(path)


def sequence_export_towers(user_fn: Callable[[Any, jax.Array], jax.Array],
                           item_table: np.ndarray | None, *, max_len: int, vocabulary: str,
                           example: np.ndarray) -> dict[str, TowerExport]:
  """"user" (a history of item ids → [b, d]) and, unless `item_table` is None, "item" (one item id
  → its row of `item_table` [N + 1, d], embedded as a constant), scored by inner product as in
  training and evaluation."""
  ids = {"item_ids": pathlib.Path(vocabulary).name, "padding_index": 0,
         "id_map": "item index j (1..N) is line j of item_ids; index 0 is padding"}
  user = TowerExport(
      fn=user_fn, input_spec=jax.ShapeDtypeStruct((1, max_len), jnp.int32),
      preprocessing={"input": "item_history", **ids, "max_len": max_len,
                     "order": "chronological, most recent last",
                     "truncation": "keep the most recent max_len items",
                     "padding": "left-pad with index 0 to max_len"},
      files=(vocabulary,), l2_normalized=False, example=example)
  if item_table is None:
    return {"user": user}
  table = np.asarray(item_table, np.float32)
  item = TowerExport(
      fn=lambda p, x: jnp.asarray(table)[x[:, 0]],
      input_spec=jax.ShapeDtypeStruct((1, 1), jnp.int32),
      preprocessing={"input": "item_id", **ids}, files=(vocabulary,), l2_normalized=False,
      example=np.arange(1, min(8, table.shape[0] - 1) + 1, dtype=np.int32)[:, None])
  return {"user": user, "item": item}


def sequence_export_corpus(item_table: np.ndarray, vocabulary: str, test_users: np.ndarray
                           ) -> dict[str, CorpusExport]:
  """The N items (rows 1..N of the table, ids from the vocabulary), queried by user embeddings."""
  ids = pathlib.Path(vocabulary).read_text(encoding="utf-8").splitlines()
  return {"items": CorpusExport("item", np.asarray(item_table, np.float32)[1:], ids,
                                "items; id = the dataset's item id", query_tower="user",
                                queries=np.asarray(test_users, np.float32))}
