"""Interaction-sequence datasets: the in-memory form every recommendation reader returns, and the
writer of the `interactions` kind (see `data_pipelines.schemas`).

Readers (one module per source format: `sasrec`, `s3rec`, `recbole`, `movielens`, `amazon`) map the
source's item ids to indices 1..num_items (0 is padding). Where the source already numbers items
1..N (SASRec, S3-Rec) the indices are those numbers, so results stay comparable with the papers.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipelines import schemas
from data_pipelines.converters import common


@dataclasses.dataclass
class InteractionData:
  """Users' chronological item sequences plus item content.

  user_ids: U user ids; sequences: U int32 arrays [n_u] of item indices in 1..num_items;
  item_ids: num_items ids (item index j ↔ item_ids[j - 1]); item_text: num_items strings or
  None; item_attributes: num_items lists of attribute ids or None.
  """
  user_ids: list[str]
  sequences: list[np.ndarray]
  item_ids: list[str]
  item_text: list[str] | None = None
  item_attributes: list[list[int]] | None = None

  @property
  def num_items(self) -> int:
    return len(self.item_ids)

  def check(self, where: str) -> None:
    """Raises ValueError naming `where` when indices or lengths are inconsistent."""
    n = self.num_items
    if len(self.user_ids) != len(self.sequences):
      raise ValueError(f"{where}: {len(self.user_ids)} user ids but {len(self.sequences)} "
                       f"sequences")
    if len(set(self.user_ids)) != len(self.user_ids):
      raise ValueError(f"{where}: duplicate user ids")
    for u, seq in zip(self.user_ids, self.sequences):
      if seq.ndim != 1 or not len(seq):
        raise ValueError(f"{where}: user {u!r} has an empty or malformed sequence")
      if seq.min() < 1 or seq.max() > n:
        raise ValueError(f"{where}: user {u!r} has item index outside [1, {n}]")
    for name in ("item_text", "item_attributes"):
      value = getattr(self, name)
      if value is not None and len(value) != n:
        raise ValueError(f"{where}: {name} has {len(value)} entries for {n} items")


class ItemVocabulary:
  """Source item id → index 1..N, in order of first registration."""

  def __init__(self, ids: Sequence[str] = ()):
    self._index: dict[str, int] = {}
    self.ids: list[str] = []
    for i in ids:
      self.add(i)

  def add(self, item_id: str) -> int:
    idx = self._index.get(item_id)
    if idx is None:
      self.ids.append(item_id)
      idx = self._index[item_id] = len(self.ids)
    return idx

  def get(self, item_id: str) -> int | None:
    return self._index.get(item_id)

  def __len__(self) -> int:
    return len(self.ids)


def sequence_stats(data: InteractionData) -> dict[str, Any]:
  lengths = np.asarray([len(s) for s in data.sequences], np.int64)
  return {"num_users": len(data.user_ids), "num_items": data.num_items,
          "num_interactions": int(lengths.sum()), "min_length": int(lengths.min()),
          "max_length": int(lengths.max()), "mean_length": float(lengths.mean()),
          # Leave-one-out needs >= 3 items for a training prefix; shorter users are kept (their
          # items still serve as history) but yield no train target (see sequences.py).
          "users_shorter_than_3": int((lengths < 3).sum()),
          "items_without_interactions": int(data.num_items - len(np.unique(
              np.concatenate(data.sequences))))}


def write_interactions(output: str | os.PathLike, data: InteractionData, *,
                       source: Mapping[str, Any], num_shards: int = 4, vocab_size: int = 8192,
                       extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Writes an `interactions` dataset (splits `sequences` and `items`, see `schemas`).

  Item texts (when any is non-empty) train the dataset's BPE tokenizer and are stored tokenized.
  """
  data.check(str(source.get("input", output)))
  texts = data.item_text or [""] * data.num_items
  attrs = data.item_attributes or [[] for _ in range(data.num_items)]
  tok = None
  if any(texts):
    tok = common.train_tokenizer([t for t in texts if t], vocab_size)
    text_ids = tok.encode_unpadded(texts)
  else:
    text_ids = [[] for _ in texts]
  seq_examples = ({"user_id": u, "items": s.astype(np.int32)}
                  for u, s in zip(data.user_ids, data.sequences))
  item_examples = ({"item_index": j + 1, "item_id": data.item_ids[j], "text": texts[j],
                    "text_ids": np.asarray(text_ids[j], np.int32),
                    "attributes": np.asarray(attrs[j], np.int32)}
                   for j in range(data.num_items))
  num_attributes = max((max(a) for a in attrs if a), default=-1) + 1
  meta_extra = {"stats": sequence_stats(data), "num_items": data.num_items,
                "num_attributes": int(num_attributes), "has_item_text": tok is not None,
                "split_protocol": "leave_one_out", "padding_item": 0}
  meta_extra.update(extra or {})
  return common.write_dataset(
      output, kind=schemas.INTERACTIONS, schema=schemas.sequence_schema(),
      splits={"sequences": common.SplitSpec(schemas.sequence_schema(), seq_examples,
                                            len(data.user_ids), own_schema=True),
              "items": common.SplitSpec(schemas.item_schema(), item_examples, data.num_items,
                                        own_schema=True)},
      source=source, num_shards=num_shards, tokenizer=tok, extra=meta_extra)


def group_by_user(rows: Sequence[tuple[str, int, float, int]]) -> tuple[list[str], list[np.ndarray]]:
  """rows: (user, item index, time, file order) → users in first-appearance order, each with its
  items sorted by (time, file order) — a stable chronological sort."""
  by_user: dict[str, list[tuple[float, int, int]]] = {}
  for user, item, t, order in rows:
    by_user.setdefault(user, []).append((t, order, item))
  users = list(by_user)
  seqs = [np.asarray([it for _, _, it in sorted(by_user[u])], np.int32) for u in users]
  return users, seqs


def k_core(users: list[str], seqs: list[np.ndarray], k: int
           ) -> tuple[list[str], list[np.ndarray]]:
  """Iteratively drops users and items with fewer than k interactions (k <= 1: no-op)."""
  if k <= 1:
    return users, seqs
  while True:
    counts = np.bincount(np.concatenate(seqs)) if seqs else np.zeros(1, np.int64)
    keep_item = counts >= k
    new = [(u, s[keep_item[s]]) for u, s in zip(users, seqs)]
    new = [(u, s) for u, s in new if len(s) >= k]
    changed = len(new) != len(users) or any(len(a) != len(b[1]) for a, b in zip(seqs, new))
    users, seqs = [u for u, _ in new], [s for _, s in new]
    if not changed:
      return users, seqs


def reindex(users: list[str], seqs: list[np.ndarray], item_ids: list[str],
            item_text: list[str] | None, item_attributes: list[list[int]] | None
            ) -> InteractionData:
  """Drops items no sequence uses and renumbers the rest 1..N in their original order."""
  used = np.zeros(len(item_ids) + 1, bool)
  for s in seqs:
    used[s] = True
  used[0] = False
  new_index = np.cumsum(used).astype(np.int32)  # old index → new index (valid where used)
  keep = np.flatnonzero(used[1:])
  return InteractionData(
      user_ids=users, sequences=[new_index[s] for s in seqs],
      item_ids=[item_ids[j] for j in keep],
      item_text=None if item_text is None else [item_text[j] for j in keep],
      item_attributes=None if item_attributes is None else [item_attributes[j] for j in keep])
