"""MMSRec's serving towers: "item", an item's content features → its embedding (no item id, so
items unseen in training are embedded from content), and "user", a history of item ids → the
query; and the item corpus."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.eval import seqrec
from mmcl.export import sequences
from mmcl.tasks.mmsrec.evaluate import user_embeddings
from mmcl.train.task import CorpusExport, TowerExport


def export_towers(net, t, data_dir: str, max_len: int, text_features: str
                  ) -> dict[str, TowerExport]:
  """"item": the M modality vectors concatenated in `task.modalities` order, [b, Σ D_m] → [b, d]
  unit-norm (`MMSRecNet.item_from_features`); "user": a history of item ids [b, L] → [b, d]
  unit-norm output at an appended [MASK] slot (`MMSRecNet.query`, the feature table embedded in
  the artifact). t: the `task` config."""
  dims = [int(f.shape[1]) for f in net.features]
  sources = {"text": f"the text tower's sentence embedding of the item text "
                     f"({text_features or 'TF-IDF + SVD fallback'})",
             "lexical": f"TF-IDF + truncated SVD (width {t.lexical_dim}) of the item text, fitted "
                        "on the dataset's items"}
  towers = sequences.sequence_export_towers(
      net.query, None, max_len=max_len,
      vocabulary=sequences.item_vocabulary_file(data_dir, net.num_items),
      example=seqrec.histories_of_test_users(data_dir, max_len)[:8])
  item_tower = TowerExport(
      fn=net.item_from_features, input_spec=jax.ShapeDtypeStruct((1, sum(dims)), jnp.float32),
      preprocessing={"input": "item_features", "layout": "the modality vectors concatenated",
                     "modalities": [{"name": name, "dim": d, "source": sources.get(name, name)}
                                    for name, d in zip(t.modalities, dims)]},
      example=np.concatenate([f[1:9] for f in net.features], axis=1))
  return {"user": towers["user"]._replace(l2_normalized=True), "item": item_tower}


def export_corpus(net, params, t, mesh, data_dir: str, max_len: int) -> dict[str, CorpusExport]:
  """Every item's content embedding [N, d] (the evaluator's item table), queried by the test
  users."""
  item_emb = np.asarray(jax.jit(net.item_tower)(params))
  history = seqrec.histories_of_test_users(data_dir, max_len)
  queries = user_embeddings(net, params, history, mesh, t.eval_batch_size)
  return sequences.sequence_export_corpus(
      item_emb, sequences.item_vocabulary_file(data_dir, net.num_items), queries)
