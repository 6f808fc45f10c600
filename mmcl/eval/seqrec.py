"""The sequential-recommendation protocol shared by SASRec, Demure and MMSRec.

Data: an `interactions` dataset (`data_pipelines.converters.interactions`), one chronological item
sequence per user, items 1..N (0 = padding). Leave-one-out: each user's last item is the test
target, the one before the validation target, the rest trains (`data_pipelines.sequences`).
Evaluation of next-item scores ⟨query, item⟩: (1) the sampled protocol of SASRec (Kang & McAuley
2018): the target ranked against `num_negatives` items the user never interacted with, HR@k /
NDCG@k; (2) full ranking over all N items, Recall@k / NDCG@k / MRR.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines import schemas
from data_pipelines import sequences as seq_lib
from mmcl.config import Config
from mmcl.eval import finite as finite_lib
from mmcl.eval import metrics as metrics_lib
from mmcl.eval import topk as topk_lib


def declare_sequence_data(c: Config, *, max_len: int = 50) -> None:
  """Declares the interaction-data keys on `c.data` (max_len, sequence_mode, mask_prob)."""
  pipelines.define_config(c.data, schemas.INTERACTIONS)
  c.data.max_len = max_len


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


def histories_of_test_users(data_dir: str, max_len: int) -> np.ndarray:
  """[U, L] int32 the test users' histories before their targets (`eval_cases` of 'test'): what
  the exported user towers of the sequential recommenders are checked and queried with."""
  user_items, _ = load_interactions(data_dir)
  return eval_cases(user_items, "test", max_len)[1]


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
