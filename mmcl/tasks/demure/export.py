"""Demure's serving towers and corpus: as SASRec's (`mmcl.export.sequences`), with the frozen
modality features embedded in the artifact."""

from __future__ import annotations

import jax
import numpy as np

from mmcl.eval import seqrec
from mmcl.export import sequences
from mmcl.tasks.demure.evaluate import user_embeddings
from mmcl.train.task import CorpusExport, TowerExport


def export_towers(net, params, t, data_dir: str, max_len: int) -> dict[str, TowerExport]:
  """"user", a history of item ids [B, L] → [B, d] the output at the most recent position of the
  original sequence (as `evaluate.user_embeddings`), and "item", an item id → e_i = Σ_m W_m x_i^m
  (+ ID) (net: `DemureNet`; t: the `task` config)."""
  key = jax.random.PRNGKey(t.eval_seed)
  return sequences.sequence_export_towers(
      lambda p, x: net.last_output(p, x, key), np.asarray(net.item_table(params)),
      max_len=max_len,
      vocabulary=sequences.item_vocabulary_file(data_dir, net.model.num_items),
      example=seqrec.histories_of_test_users(data_dir, max_len)[:8])


def export_corpus(net, params, t, mesh, data_dir: str, max_len: int) -> dict[str, CorpusExport]:
  """Every item (e_i [N, d]), queried by the users of the test split."""
  history = seqrec.histories_of_test_users(data_dir, max_len)
  return sequences.sequence_export_corpus(
      np.asarray(net.item_table(params)),
      sequences.item_vocabulary_file(data_dir, net.model.num_items),
      user_embeddings(net, params, history, t, mesh))
