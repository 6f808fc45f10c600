"""MMSRec's evaluation: leave-one-out next-item metrics over all items, and separately for the
items held out of training (cold start)."""

from __future__ import annotations

import jax
import numpy as np

from mmcl.eval import seqrec
from mmcl.parallel import mesh as mesh_lib


def item_table(net, params) -> np.ndarray:
  """[N + 1, d] every item's unit-norm content embedding, row 0 (padding) zero."""
  item_emb = np.asarray(jax.jit(net.item_tower)(params)).copy()
  item_emb[0] = 0.0
  return item_emb


def user_embeddings(net, params, history: np.ndarray, mesh, batch_size: int) -> np.ndarray:
  """history: [U, L] → [U, d] the queries (`MMSRecNet.query`)."""
  q_fn = jax.jit(lambda x: net.query(params, x), out_shardings=mesh_lib.replicated(mesh))
  return mesh_lib.embed_rows(q_fn, [history], mesh, batch_size)


def next_item_metrics(net, params, user_items: list[np.ndarray], cold: np.ndarray, t, mesh,
                      max_len: int) -> dict[str, float]:
  """"<split>/..." for every split in `task.eval_splits`, and "<split>_cold/..." over the cases
  whose target is a held-out item (cold [N + 1] bool) when there are any."""
  item_emb = item_table(net, params)
  out = {}
  for split in t.eval_splits:
    users, history, target = seqrec.eval_cases(user_items, split, max_len)
    q = user_embeddings(net, params, history, mesh, t.eval_batch_size)
    seen = [user_items[u] for u in users]
    kw = dict(ks=t.eval_ks, num_negatives=t.eval_num_negatives, max_users=t.eval_max_users,
              seed=t.eval_seed, full_ranking=t.eval_full_ranking, mesh=mesh)
    out.update(seqrec.next_item_metrics(q, item_emb, target, seen, prefix=split, **kw))
    if cold.any():
      out.update(seqrec.next_item_metrics(q, item_emb, target, seen, prefix=f"{split}_cold",
                                          case_mask=cold[target], **kw))
  return out
