"""Serving artifacts of sequential recommenders: a user tower over item-id histories, an item
tower over item ids, the item corpus, and the item_ids.txt that maps the dataset's ids to indices.

Shared by the recipes whose users are item-id histories (SASRec, Demure, MMSRec's user tower).
"""
from __future__ import annotations

import pathlib
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import records
from mmcl.train.task import CorpusExport, TowerExport


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
