"""Demure task: AUC, flagging, TF-IDF+SVD, planted noise, contribution scores and training."""
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.featurize import tfidf_svd
from mmcl.config import load_config_file
from mmcl.tasks import get_task_class
from mmcl.tasks.demure.data import (StepCountingIterator, per_occurrence_noise, plant_noise,
                                    planted_item_side)
from mmcl.tasks.demure.analysis import oracle_scores
from mmcl.tasks.demure.evaluate import noise_detection, planted_labels, pool_by_item, roc_auc
from mmcl.tasks.demure.loss import contributions, flag_lowest, rec_loss
from mmcl.tasks.demure.model import DemureModel
from mmcl.train import loop as loop_lib
from mmcl.train.metric_log import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_roc_auc_matches_pair_counting():
  rng = np.random.default_rng(0)
  s = rng.integers(0, 5, size=60).astype(float)  # many ties
  y = rng.random(60) < 0.3
  pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
  assert roc_auc(s, y) == pytest.approx(np.mean(pairs))
  assert roc_auc(np.arange(4.0), np.asarray([0, 0, 1, 1], bool)) == 1.0


def test_flag_lowest_per_row():
  s = jnp.asarray([[5., 1., 3., 2., 9.], [1., 2., 3., 4., 5.]])
  valid = jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool)
  f = np.asarray(flag_lowest(s, valid, 0.4))
  np.testing.assert_array_equal(f, [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]])


def test_tfidf_svd_groups_similar_texts():
  texts = ["red apple fruit", "green apple fruit", "steel drill tool", "power drill tool"]
  x = tfidf_svd(texts, 3, seed=0)
  assert x.shape == (4, 3)
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
  sim = x @ x.T
  assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[1, 3]
  np.testing.assert_array_equal(x, tfidf_svd(texts, 3, seed=0))


def test_plant_noise_keeps_norms_and_fraction():
  f = np.random.default_rng(1).normal(size=(101, 6)).astype(np.float32)
  f[0] = 0
  g, noisy = plant_noise(f, 0.2, seed=3)
  assert noisy.sum() == 20 and not noisy[0]
  np.testing.assert_allclose(np.linalg.norm(g, axis=1), np.linalg.norm(f, axis=1), rtol=1e-5)
  np.testing.assert_array_equal(g[~noisy], f[~noisy])
  assert np.abs(g[noisy] - f[noisy]).max() > 0.1


def test_per_occurrence_noise_resample_and_swap():
  rng = np.random.default_rng(2)
  clean = rng.normal(size=(11, 5)).astype(np.float32)
  clean[0] = 0
  noisy = np.zeros(11, bool)
  noisy[[2, 5, 7]] = True
  norms = np.linalg.norm(clean, axis=1)
  items = jnp.asarray([[0, 2, 3, 2], [5, 7, 1, 2]], jnp.int32)
  args = (jnp.asarray(clean), jnp.asarray(noisy), jnp.asarray(norms))
  a = np.asarray(per_occurrence_noise(jax.random.PRNGKey(0), items, *args, "resample"))
  b = np.asarray(per_occurrence_noise(jax.random.PRNGKey(1), items, *args, "resample"))
  it = np.asarray(items)
  is_noisy = noisy[it]
  np.testing.assert_array_equal(a[~is_noisy], clean[it][~is_noisy])  # clean items untouched
  np.testing.assert_allclose(np.linalg.norm(a[is_noisy], axis=-1), norms[it][is_noisy], rtol=1e-5)
  assert not np.allclose(a[0, 1], a[0, 3])  # item 2 twice in a row: two different draws
  assert not np.allclose(a[is_noisy], b[is_noisy])  # and a new draw for a new key
  s = np.asarray(per_occurrence_noise(jax.random.PRNGKey(0), items, *args, "swap"))
  np.testing.assert_array_equal(s[~is_noisy], clean[it][~is_noisy])
  for row in s[is_noisy]:  # a clean row of some real item
    assert np.any(np.all(clean[1:] == row, axis=1))
  # The candidate side holds the expectation of the draw: 0 (resample), the mean row (swap).
  np.testing.assert_array_equal(planted_item_side(clean, noisy, "resample")[noisy], 0.0)
  np.testing.assert_allclose(planted_item_side(clean, noisy, "swap")[5], clean[1:].mean(0),
                             rtol=1e-6)
  np.testing.assert_array_equal(planted_item_side(clean, noisy, "fixed"), clean)


def test_pool_by_item_averages_occurrences():
  items = np.asarray([[0, 1, 2], [2, 2, 3]])
  scores = np.arange(18, dtype=np.float32).reshape(2, 3, 3)
  t = pool_by_item(scores, items, num_items=4)
  assert t.shape == (5, 3)
  np.testing.assert_allclose(t[2], (scores[0, 2] + scores[1, 0] + scores[1, 1]) / 3)
  np.testing.assert_allclose(t[1], scores[0, 1])
  np.testing.assert_array_equal(t[[0, 4]], 0.0)


def test_step_counting_iterator_resumes():
  class Inner:
    def __init__(self):
      self.i = 0
    def __next__(self):
      self.i += 1
      return {"inputs": np.full((2, 3), self.i)}
    def get_state(self):
      return {"i": self.i}
    def set_state(self, st):
      self.i = st["i"]
  it = StepCountingIterator(Inner())
  assert [next(it)["step"].tolist() for _ in range(2)] == [[0, 0], [1, 1]]
  state = it.get_state()
  assert isinstance(state, bytes)
  again = StepCountingIterator(Inner())
  again.set_state(state)
  b = next(again)
  assert b["step"].tolist() == [2, 2] and b["inputs"][0, 0] == 3


@pytest.fixture(scope="module")
def text_seq_dir(tmp_path_factory, write_planted):
  return write_planted(tmp_path_factory.mktemp("demure") / "seq", with_text=True)


def _config(data_dir, **overrides):
  c = load_config_file(str(REPO / "experiments/demure.py") + ":tiny")
  c.data.dir = str(data_dir)
  for k, v in overrides.items():
    c.set(k, v)
  return c


def test_contribution_of_a_zero_modality_is_zero_and_flagged_first(text_seq_dir):
  c = _config(text_seq_dir)
  mesh, task = loop_lib.setup(c, get_task_class("demure"))
  task.net.features.tables[0][1:21] = 0.0  # items 1..20 lose their text features
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  inputs = jnp.asarray([[0, 0, 3, 4, 25, 26, 27, 28], [19, 20, 21, 22, 23, 24, 25, 26]], jnp.int32)
  targets = jnp.concatenate([inputs[:, 1:], jnp.asarray([[29], [27]])], 1)
  negs = jnp.full_like(inputs, 35)
  cvals, valid = jax.jit(lambda *a: contributions(task.net, *a, c.task))(  # one program
      params, inputs, targets, negs)
  cvals = np.asarray(cvals)
  zero = (np.asarray(inputs) <= 20) & (np.asarray(inputs) > 0)
  assert np.all(cvals[..., 0][zero] == 0.0)
  assert np.all(cvals[..., 0][~zero & (np.asarray(inputs) > 0)] > 0.0)
  flags = np.asarray(flag_lowest(jnp.asarray(cvals.reshape(2, -1)),
                                        valid.reshape(2, -1), 0.2)).reshape(cvals.shape)
  assert flags.sum() == 2 + 3  # floor(0.2·12) and floor(0.2·16) real (t, m) pairs
  assert flags[..., 0][zero].all()  # the 2 + 2 zero-contribution pairs come first


def test_integrated_gradients_path_steps(text_seq_dir):
  """task.contribution_path_steps = K: the gradient averaged over the midpoints α = (k − ½)/K of the
  path from the empty sequence (K = 2 against two explicit gradients), and with many steps the
  scores add up to the loss increase when every modality token is removed (completeness)."""
  c = _config(text_seq_dir, **{"task.contribution": "signed", "task.score_normalisation": "none"})
  _, task = loop_lib.setup(c, get_task_class("demure"))
  params = jax.jit(task.init_params)(jax.random.PRNGKey(1))
  inputs = jnp.asarray([[0, 0, 3, 4, 25, 26, 27, 28], [19, 20, 21, 22, 23, 24, 25, 26]], jnp.int32)
  targets = jnp.concatenate([inputs[:, 1:], jnp.asarray([[29], [27]])], 1)
  negs = jnp.full_like(inputs, 35)
  table = task.net.item_table(params)
  xt = task.net.apply(params, DemureModel.modality_tokens, task.net.features.candidates(inputs))

  def total(z):
    return rec_loss(task.net.encode(params, z.sum(-2), inputs), table, targets, negs,
                    c.task.rec_loss)[1]
  grad, total = jax.jit(jax.grad(total)), jax.jit(total)
  scores = jax.jit(lambda k: contributions(task.net, params, inputs, targets, negs, c.task,
                                         path_steps=k)[0],
                   static_argnums=0)
  valid = np.asarray(inputs != 0)[..., None]
  c1 = np.asarray(jax.jit(lambda *a: contributions(task.net, *a, c.task)[0])(
      params, inputs, targets, negs))
  np.testing.assert_allclose(c1, -np.sum(np.asarray(grad(xt) * xt), -1) * valid, atol=1e-5)
  c2 = np.asarray(scores(2))
  mid = (grad(0.25 * xt) + grad(0.75 * xt)) / 2
  np.testing.assert_allclose(c2, -np.sum(np.asarray(mid * xt), -1) * valid, atol=1e-5)
  assert np.abs(c2 - c1).max() > 1e-3  # the path average is not the local gradient
  increase = float(total(jnp.zeros_like(xt)) - total(xt))
  err = {k: abs(float(scores(k).sum()) - increase) for k in (1, 8, 64, 256)}
  # The path crosses kinks of the encoder's activations, so the midpoint sum converges about as
  # 1/K: K = 64 is within about 0.4% here (numpy 2.4 / jax 0.10.2 features), K = 256 within 0.1%.
  assert abs(increase) > 0.1 and err[256] < 0.01 * abs(increase)
  assert err[256] < err[64] < err[8] < err[1] and err[1] > 10 * err[64]
  with pytest.raises(ValueError, match="contribution_path_steps"):
    contributions(task.net, params, inputs, targets, negs, c.task, path_steps=-1)


def _trained_params(c, workdir):
  from mmcl.train import checkpoint as ckpt_lib
  mesh, task = loop_lib.setup(c, get_task_class("demure"))
  _, abstract, shardings, _, _ = loop_lib.build_state(c, task, mesh)
  ck = ckpt_lib.Checkpointer(workdir, read_only=True)
  return task, ck.restore(ck.latest_step(),
                          ckpt_lib.abstract_with_shardings(abstract, shardings)).params


def test_planted_noise_is_found_then_flagged(group_seq_dir, tmp_path):
  """Warm-up (plain L_rec) → item scores → Demure resumes with flags from them, on data whose next
  item's group is named in the item text, with the text of 20% of the items re-drawn at random at
  every occurrence."""
  planted = {"task.plant_noise_modality": "text", "task.plant_noise_mode": "resample",
             "task.lexical_dim": 16, "optim.lr": 1e-2, "train.log_every": 10}
  c = _config(group_seq_dir, **planted, **{"task.denoise": False, "train.total_steps": 40,
                                           "train.checkpoint_every": 40})
  loop_lib.train(c, tmp_path, get_task_class("demure"))
  task, params = _trained_params(c, tmp_path)
  inputs, targets = task.training_rows()
  m = noise_detection(task.scorer, params, inputs, targets, task.noisy_np)
  assert m["noise/planted_share"] > 0.05
  # Random text hurts the loss: its signed contribution, averaged over an item's occurrences, is
  # the lowest; the paper's |g·x| ranks it high instead (AUC below 0.5).
  assert m["noise/auc_signed_item"] > 0.8, m
  assert m["noise/auc_item"] < 0.5, m
  table = task.item_scores(params, "signed")
  _, valid, labels = planted_labels(inputs, c.task, task.noisy_np)
  ig = task.item_scores(params, "signed", path_steps=8)[inputs]
  # Integrated gradients (task.contribution_path_steps) find the same noise at least as well
  # (here 1.00 against 0.998).
  assert roc_auc(-ig[valid], labels[valid]) >= max(
      0.9, roc_auc(-table[inputs][valid], labels[valid]))
  path = tmp_path / "item_scores.npy"
  np.save(path, table)
  c2 = _config(group_seq_dir, **planted, **{"task.contribution": "signed",
                                            "task.item_scores": str(path),
                                            "train.total_steps": 42, "train.checkpoint_every": 42})
  loop_lib.train(c2, tmp_path, get_task_class("demure"))  # resumes at step 40
  rows = [r for r in read_metrics(tmp_path) if "flagged_fraction" in r]
  assert len(rows) == 1 and abs(rows[0]["flagged_fraction"] - 0.2) < 0.05
  assert np.isfinite(rows[0]["loss"])
  _, task2 = loop_lib.setup(c2, get_task_class("demure"))
  inputs = jnp.asarray(task2.training_rows()[0][:32])
  flags, valid = task2.noise_flags(None, inputs)
  planted_pairs = np.zeros(flags.shape, bool)
  planted_pairs[..., 0] = task2.noisy_np["text"][np.asarray(inputs)]
  # The flags follow the table: far more planted pairs among them than the planted share.
  assert planted_pairs[np.asarray(flags)].mean() > 2 * planted_pairs[np.asarray(valid)].mean()
  # task.flag_scope = global: one threshold over all training pairs, the same flags for a row
  # whatever rows share its batch, and a row whose pairs all score high loses none of them.
  _, task3 = loop_lib.setup(_config(group_seq_dir, **planted, **{
      "task.item_scores": str(path), "task.flag_scope": "global"}), get_task_class("demure"))
  all_rows = jnp.asarray(task3.training_rows()[0])
  g_flags, g_valid = (np.asarray(a) for a in task3.noise_flags(None, all_rows))
  assert abs(g_flags.sum() / g_valid.sum() - 0.2) < 0.02
  scores = table[np.asarray(all_rows)]
  assert scores[g_flags].max() <= scores[g_valid & ~g_flags].min()
  np.testing.assert_array_equal(np.asarray(task3.noise_flags(None, all_rows[:5])[0]), g_flags[:5])
  clean_row = np.argsort(table[1:].min(1))[-8:] + 1  # the 8 items whose lowest score is highest
  assert not np.asarray(task3.noise_flags(None, jnp.asarray(clean_row[None], jnp.int32))[0]).any()
  with pytest.raises(ValueError, match="task.flag_scope"):
    loop_lib.setup(_config(group_seq_dir, **{"task.flag_scope": "global"}),
                   get_task_class("demure"))


def test_input_side_noise_oracle_table_and_lambda_zero(text_seq_dir, tmp_path, caplog):
  """task.plant_noise_side=input noises the history only (candidates keep the clean features);
  the oracle table scores exactly the planted pairs −1; λ = 0 gives L = L_rec(denoised) and does
  not encode the noisy view."""
  planted = {"task.plant_noise_modality": "text", "task.plant_noise_mode": "swap",
             "task.plant_noise_item_fraction": 0.3}
  _, both = loop_lib.setup(_config(text_seq_dir, **planted), get_task_class("demure"))
  _, inp = loop_lib.setup(_config(text_seq_dir, **planted, **{"task.plant_noise_side": "input"}),
                          get_task_class("demure"))
  noisy = inp.noisy_np["text"]
  np.testing.assert_array_equal(noisy, both.noisy_np["text"])  # the same planted items
  clean = inp.net.features.occurrence_noise[0][0]
  np.testing.assert_array_equal(inp.net.features.tables[0], clean)  # candidates: clean text
  np.testing.assert_allclose(both.net.features.tables[0][noisy], np.broadcast_to(
      clean[1:].mean(0), both.net.features.tables[0][noisy].shape), rtol=1e-6)  # vs the expectation
  items = jnp.asarray(np.nonzero(noisy)[0][None, :8], jnp.int32)
  x_in, x_both = (np.asarray(t.net.features.inputs(items, jax.random.PRNGKey(3))[0])
                 for t in (inp, both))
  np.testing.assert_array_equal(x_in, x_both)  # the history gets the same swapped draws
  assert not np.allclose(x_in, clean[np.asarray(items)])
  with pytest.raises(ValueError, match="task.plant_noise_side"):
    loop_lib.setup(_config(text_seq_dir, **{"task.plant_noise_modality": "text",
                                            "task.plant_noise_side": "input"}),
                   get_task_class("demure"))

  oracle = oracle_scores(inp.config.task, inp.noisy_np, inp.num_items)
  assert oracle.shape == (inp.num_items + 1, 2)
  np.testing.assert_array_equal(oracle[:, 0] < 0, noisy)
  assert (oracle[:, 1] == 1).all()
  path = tmp_path / "oracle.npy"
  np.save(path, oracle)
  # With ρ above the planted share the global threshold is +1 and flags every pair: logged.
  with caplog.at_level(logging.WARNING, logger="mmcl.demure"):
    loop_lib.setup(_config(text_seq_dir, **planted, **{
        "task.item_scores": str(path), "task.flag_scope": "global", "task.noise_fraction": 0.5}),
        get_task_class("demure"))
  assert "flags 1.000 of the training pairs" in caplog.text
  with pytest.raises(ValueError, match="task.cl_window"):
    loop_lib.setup(_config(text_seq_dir, **{"task.cl_window": 4}), get_task_class("demure"))
  # Global flags from the oracle table at ρ below the planted share are exactly the planted pairs.
  oracle_flags = {**planted, "task.item_scores": str(path), "task.flag_scope": "global",
                  "task.noise_fraction": 0.05}
  c0 = _config(text_seq_dir, **oracle_flags, **{"task.cl_weight": 0.0})
  _, task0 = loop_lib.setup(c0, get_task_class("demure"))
  rows = jnp.asarray(task0.training_rows()[0][:16])
  flags, _ = task0.noise_flags(None, rows)
  np.testing.assert_array_equal(np.asarray(flags)[..., 0], noisy[np.asarray(rows)])
  assert not np.asarray(flags)[..., 1].any()
  params = jax.jit(task0.init_params)(jax.random.PRNGKey(0))
  targets = jnp.concatenate([rows[:, 1:], rows[:, :1]], 1)
  batch = {"inputs": rows, "targets": targets}

  # Each task's loss is evaluated once, jitted (eager dispatch of these losses costs more CPU
  # than compiling them), together with its gradient where the gradient is checked below.
  def loss_fn(t):
    return lambda p: t.loss(p, batch, jax.random.PRNGKey(1), train=False)

  def loss_and_grad(t):
    return jax.jit(jax.value_and_grad(loss_fn(t), has_aux=True))(params)
  (loss, metrics), grad0 = loss_and_grad(task0)
  assert "cl_loss" not in metrics
  # λ = 0.5 adds λ·InfoNCE to the same L_rec(denoised): the rest of the step is unchanged.
  c1 = _config(text_seq_dir, **oracle_flags, **{"task.cl_weight": 0.5})
  _, task1 = loop_lib.setup(c1, get_task_class("demure"))
  (loss1, m1), grad1 = loss_and_grad(task1)
  np.testing.assert_allclose(float(m1["rec_loss"]), float(metrics["rec_loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(loss1), float(loss) + 0.5 * float(m1["cl_loss"]), rtol=1e-5)
  # task.cl_stop_gradient: the same value; the InfoNCE's gradient through the denoised view
  # (the gradient of L w.r.t. h_d) is gone, that through the noisy view stays.
  c_sg = _config(text_seq_dir, **oracle_flags, **{"task.cl_weight": 0.5,
                                                  "task.cl_stop_gradient": True})
  _, task_sg = loop_lib.setup(c_sg, get_task_class("demure"))
  (loss_sg, _), grad_sg = loss_and_grad(task_sg)
  np.testing.assert_allclose(float(loss_sg), float(loss1), rtol=1e-6)
  flat = [np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g)])
          for g in (grad0, grad1, grad_sg)]
  cl_full, cl_sg = flat[1] - flat[0], flat[2] - flat[0]  # λ·∂InfoNCE/∂θ, both paths / noisy only
  assert np.linalg.norm(cl_sg) > 1e-6 and np.linalg.norm(cl_full - cl_sg) > 1e-6
  # task.cl_positions = all: one pair per real position, the other rows' prefixes as negatives
  # and the same row's other prefixes left out; checked against a NumPy InfoNCE.
  all_positions = {**oracle_flags, "task.cl_weight": 0.5, "task.cl_positions": "all",
                   "task.cl_temperature": 0.2}
  c2 = _config(text_seq_dir, **all_positions)
  _, task2 = loop_lib.setup(c2, get_task_class("demure"))
  loss2, m2 = jax.jit(loss_fn(task2))(params)
  np.testing.assert_allclose(float(m2["rec_loss"]), float(metrics["rec_loss"]), rtol=1e-6)
  k_noise = jax.random.split(jax.random.PRNGKey(1), 4)[3]  # the loss's planted-noise draw
  xt = task2.net.apply(params, DemureModel.modality_tokens,
                       task2.net.features.inputs(rows, k_noise))
  fl = np.asarray(flags)[..., None]
  views = [np.asarray(task2.net.encode(params, v, rows))
           for v in (np.asarray(xt * ~fl).sum(-2), np.asarray(xt).sum(-2))]

  def reference(window):
    w = np.asarray(rows)[:, -window:]
    real = w.reshape(-1) != 0
    row_of = np.repeat(np.arange(w.shape[0]), window)[real]
    hd, hn = (v[:, -window:].reshape(-1, v.shape[-1])[real] for v in views)
    hd, hn = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (hd, hn))
    z = hd.astype(np.float64) @ hn.T.astype(np.float64) / 0.2
    allowed = (row_of[:, None] != row_of[None, :]) | np.eye(len(z), dtype=bool)
    lse = lambda x: np.log(np.where(allowed, np.exp(x), 0.0).sum(1))  # noqa: E731
    return np.mean(0.5 * (lse(z) + lse(z.T)) - np.diag(z))
  ref = reference(rows.shape[1])
  np.testing.assert_allclose(float(m2["cl_loss"]), ref, rtol=1e-4)
  np.testing.assert_allclose(float(loss2), float(m2["rec_loss"]) + 0.5 * ref, rtol=1e-4)
  # task.cl_window: only the newest positions are contrasted.
  c3 = _config(text_seq_dir, **all_positions, **{"task.cl_window": 3})
  _, task3 = loop_lib.setup(c3, get_task_class("demure"))
  _, m3 = jax.jit(loss_fn(task3))(params)
  ref3 = reference(3)
  assert abs(ref3 - ref) > 1e-3
  np.testing.assert_allclose(float(m3["cl_loss"]), ref3, rtol=1e-4)
