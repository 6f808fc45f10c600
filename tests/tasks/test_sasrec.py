"""SASRec task: negatives, loss parity, protocol helpers, and learning a planted next-item rule."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.config import load_config_file
from mmcl.eval import seqrec
from mmcl.losses.negatives import sample_train_negatives
from mmcl.tasks import get_task_class
from mmcl.tasks.sasrec.loss import bce_sampled_loss
from mmcl.train import loop as loop_lib
from mmcl.train.metric_log import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_train_negatives_avoid_seen_items():
  seen = jnp.asarray([[1, 2, 3, 4, 5, 6, 0, 0], [7, 8, 9, 10, 0, 0, 0, 0]], jnp.int32)
  neg = np.asarray(sample_train_negatives(jax.random.PRNGKey(0), seen, (2, 50), 12,
                                                 tries=16))
  assert neg.min() >= 1 and neg.max() <= 12
  for row, s in zip(neg, np.asarray(seen)):
    assert not np.isin(row, s[s > 0]).any()
  # Unseen items are drawn uniformly: every one of them shows up.
  assert set(neg[0]) == set(range(7, 13))


def test_bce_matches_reference():
  rng = np.random.default_rng(0)
  h, p, n = (rng.normal(size=(2, 3, 4)).astype(np.float32) for _ in range(3))
  w = np.asarray([[1, 1, 0], [0, 1, 1]], np.float32)
  loss, acc = bce_sampled_loss(h, p, n, w)
  sig = lambda z: 1 / (1 + np.exp(-z))
  pos, neg = (h * p).sum(-1), (h * n).sum(-1)
  ref = -(np.log(sig(pos)) + np.log(1 - sig(neg)))
  np.testing.assert_allclose(loss, (ref * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(acc, ((pos > neg) * w).sum() / w.sum(), rtol=1e-6)


def test_next_item_metrics_on_known_scores():
  # 4 items, D = 4: item j's embedding is e_j, so a query equal to e_t ranks its target first.
  item_emb = np.eye(5, 4, k=-1).astype(np.float32)  # row 0 = padding (zeros)
  targets = np.asarray([1, 2, 3])
  q = item_emb[[1, 2, 4]]  # user 2's query points at item 4, its target 3 ties with 1, 2 at 0
  out = seqrec.next_item_metrics(q, item_emb, targets, [np.asarray([t]) for t in targets],
                                 ks=(1,), num_negatives=2, max_users=None, seed=0,
                                 full_ranking=True, mesh=None, prefix="t")
  assert out["t/full/recall@1"] == 2 / 3
  assert out["t/hr@1"] == 2 / 3  # pessimistic ties: user 2's target is not first
  assert out["t/num_users"] == 3


def _tiny_config(data_dir, **overrides):
  c = load_config_file(str(REPO / "experiments/sasrec.py") + ":tiny")
  c.data.dir = str(data_dir)
  for k, v in overrides.items():
    c.set(k, v)
  return c


def test_sasrec_learns_planted_sequences(planted_seq_dir, tmp_path):
  c = _tiny_config(planted_seq_dir, **{"train.total_steps": 60, "train.log_every": 10,
                                       "train.checkpoint_every": 60, "optim.lr": 1e-2,
                                       "task.eval_num_negatives": 20, "task.eval_ks": (1, 10)})
  loop_lib.train(c, tmp_path, get_task_class("sasrec"))
  rows = [r for r in read_metrics(tmp_path) if "loss" in r]
  assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
  mesh, task = loop_lib.setup(c, get_task_class("sasrec"))
  from mmcl.train import checkpoint as ckpt_lib
  _, abstract, shardings, _, _ = loop_lib.build_state(c, task, mesh)
  ck = ckpt_lib.Checkpointer(tmp_path, read_only=True)
  state = ck.restore(ck.latest_step(), ckpt_lib.abstract_with_shardings(abstract, shardings))
  m = task.evaluate(state.params, str(tmp_path))
  # The next item is a deterministic function of the last one: chance is 1/21 (sampled) and
  # 1/40 (full ranking) for rank 1.
  assert m["test/hr@1"] > 0.5, m
  assert m["test/full/recall@1"] > 0.2, m
  assert m["valid/full/recall@10"] > 0.8, m
