"""MMSRec task: cloze fine-tuning learns planted data, pretraining loss, cold items, transfer init."""
import pathlib

import jax
import numpy as np
import pytest

from mmcl.config import load_config_file
from mmcl.models.layers import l2_normalize
from mmcl.tasks import get_task_class
from mmcl.tasks.mmsrec.data import cold_items, original_items
from mmcl.train import loop as loop_lib
from mmcl.train.metric_log import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def text_seq_dir(group_seq_dir):
  return group_seq_dir  # users stay in one item group named in the item text (see conftest)


def _config(data_dir, **overrides):
  c = load_config_file(str(REPO / "experiments/mmsrec.py") + ":tiny")
  c.data.dir = str(data_dir)
  for k, v in overrides.items():
    c.set(k, v)
  return c


def test_cold_items_fraction_and_padding():
  cold = cold_items(100, 0.1, seed=0)
  assert cold.shape == (101,) and cold.sum() == 10 and not cold[0]


def test_cloze_finetuning_learns_and_ranks_items_it_never_trained_on(text_seq_dir, tmp_path):
  c = _config(text_seq_dir, **{"train.total_steps": 30, "train.log_every": 1,
                               "train.checkpoint_every": 15, "task.cold_item_fraction": 0.1,
                               "task.lexical_dim": 16})
  loop_lib.train(c, tmp_path, get_task_class("mmsrec"))
  # The training loss of the last 5 steps (26..30; one batch each, so averaged), against ln 40:
  # uniform over the catalogue.
  losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path) if "loss" in r}
  assert sorted(losses)[-5:] == [26, 27, 28, 29, 30]
  assert np.mean([losses[s] for s in range(26, 31)]) < 0.75 * np.log(40)
  val = [r for r in read_metrics(tmp_path) if "val/recall@10" in r]
  assert len(val) == 2 and val[-1]["val/recall@10"] > 0.6  # chance 10/40 = 0.25
  mesh, task = loop_lib.setup(c, get_task_class("mmsrec"))
  from mmcl.train import checkpoint as ckpt_lib
  _, abstract, shardings, _, _ = loop_lib.build_state(c, task, mesh)
  ck = ckpt_lib.Checkpointer(tmp_path, read_only=True)
  params = ck.restore(ck.latest_step(), ckpt_lib.abstract_with_shardings(abstract, shardings)).params
  m = task.evaluate(params, str(tmp_path))
  assert m["num_cold_items"] == 4 and m["test_cold/num_users"] > 0
  assert m["test/full/recall@10"] > 0.5, m
  # Cold items were never a training target, yet content alone ranks some of them (chance 0.25).
  assert m["test_cold/full/recall@10"] > 0.5, m


def test_pretraining_loss_goes_down_and_transfers(text_seq_dir, tmp_path):
  pre = tmp_path / "pre"
  c = _config(text_seq_dir, **{"task.stage": "pretrain", "train.total_steps": 12,
                               "train.log_every": 4, "train.checkpoint_every": 12,
                               "train.val_batches": 0, "train.keep_best": 0})
  loop_lib.train(c, pre, get_task_class("mmsrec"))
  rows = [r for r in read_metrics(pre) if "loss" in r]
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert {"cl_v1_v2", "cl_v1_t1", "cl_t1_t2", "cl_vt1_vt2"} <= set(rows[0])
  ft = _config(text_seq_dir, **{"task.init_from": str(pre)})
  mesh, task = loop_lib.setup(ft, get_task_class("mmsrec"))
  init = jax.device_get(jax.jit(task.init_params)(jax.random.PRNGKey(5)))
  _, pre_task = loop_lib.setup(c, get_task_class("mmsrec"))
  from mmcl.train import checkpoint as ckpt_lib
  _, abstract, shardings, _, _ = loop_lib.build_state(c, pre_task, mesh)
  ck = ckpt_lib.Checkpointer(pre, read_only=True)
  saved = jax.device_get(ck.restore(12, ckpt_lib.abstract_with_shardings(abstract,
                                                                        shardings)).params)
  jax.tree.map(np.testing.assert_array_equal, init, saved)


def _plain_cloze_loss(task, params, batch, rng):
  """The cloze loss as first written, in plain jnp over the [B, L, N + 1] logits (the reference)."""
  import jax.numpy as jnp
  items = original_items(batch, task.cold_np)
  k_seq, k_item = jax.random.split(rng)
  masked = (batch["labels"] > 0) & (items != 0)
  masked = masked.at[:, -1].set(items[:, -1] != 0)
  h = l2_normalize(task.net.encode_sequences(params, items, masked, train=True, rng=k_seq))
  cand = task.net.item_tower(params, train=True, rng=k_item)
  logits = jnp.einsum("bld,nd->bln", h, cand) / task.config.task.temperature
  blocked = jnp.asarray(task.cold_np).at[0].set(True)
  logits = jnp.where(blocked[None, None], -1e9, logits)
  target_logit = jnp.take_along_axis(logits, items[..., None], -1)[..., 0]
  ce = jax.nn.logsumexp(logits, -1) - target_logit
  w = masked.astype(jnp.float32)
  rank = (logits > target_logit[..., None]).sum(-1)
  return ((ce * w).sum() / jnp.maximum(w.sum(), 1.0),
          ((rank < 10) * w).sum() / jnp.maximum(w.sum(), 1.0))


def test_cloze_loss_through_the_loss_core_equals_the_plain_full_softmax(text_seq_dir):
  """The sharded corpus softmax (dense and tiled, items split over 8 devices) changes nothing:
  loss and train Recall@10 equal the plain-jnp full softmax the task used before."""
  from mmcl.parallel import mesh as mesh_lib
  c = _config(text_seq_dir, **{"task.cold_item_fraction": 0.1, "task.lexical_dim": 16})
  mesh, task = loop_lib.setup(c, get_task_class("mmsrec"))
  params = jax.jit(task.init_params)(jax.random.PRNGKey(1))
  batch = mesh_lib.host_batch_to_global(mesh, next(iter(task.train_iterator(0, 1))))
  rng = jax.random.PRNGKey(2)

  def all_three(params):
    want = _plain_cloze_loss(task, params, batch, rng)
    got = {}
    for impl, block in (("dense", None), ("tiled", 7)):
      task.config.task.loss_impl, task.config.task.loss_block_size = impl, block
      got[impl] = task.loss(params, batch, rng, train=True)
    return want, got

  # One compilation for the three; the gradients of corpus_softmax (queries, items, scale) are
  # checked against a reference in tests/losses/test_corpus.py.
  (want_loss, want_recall), got = jax.jit(all_three)(params)
  assert 0.0 < float(want_recall) < 1.0  # some targets in the top 10, some not: ranks are checked
  for impl, (loss, aux) in got.items():
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=impl)
    np.testing.assert_allclose(aux["train_recall@10"], want_recall, rtol=1e-6, err_msg=impl)
