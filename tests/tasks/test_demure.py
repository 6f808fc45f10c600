"""Demure task: AUC, flagging, TF-IDF+SVD, planted noise, contribution scores and training."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.config import load_config_file
from mmcl.tasks import demure, get_task_class
from mmcl.train import loop as loop_lib
from mmcl.train.metric_log import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_roc_auc_matches_pair_counting():
  rng = np.random.default_rng(0)
  s = rng.integers(0, 5, size=60).astype(float)  # many ties
  y = rng.random(60) < 0.3
  pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
  assert demure.roc_auc(s, y) == pytest.approx(np.mean(pairs))
  assert demure.roc_auc(np.arange(4.0), np.asarray([0, 0, 1, 1], bool)) == 1.0


def test_flag_lowest_per_row():
  s = jnp.asarray([[5., 1., 3., 2., 9.], [1., 2., 3., 4., 5.]])
  valid = jnp.asarray([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool)
  f = np.asarray(demure.flag_lowest(s, valid, 0.4))
  np.testing.assert_array_equal(f, [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]])


def test_tfidf_svd_groups_similar_texts():
  texts = ["red apple fruit", "green apple fruit", "steel drill tool", "power drill tool"]
  x = demure.tfidf_svd(texts, 3, seed=0)
  assert x.shape == (4, 3)
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
  sim = x @ x.T
  assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[1, 3]
  np.testing.assert_array_equal(x, demure.tfidf_svd(texts, 3, seed=0))


def test_plant_noise_keeps_norms_and_fraction():
  f = np.random.default_rng(1).normal(size=(101, 6)).astype(np.float32)
  f[0] = 0
  g, noisy = demure.plant_noise(f, 0.2, seed=3)
  assert noisy.sum() == 20 and not noisy[0]
  np.testing.assert_allclose(np.linalg.norm(g, axis=1), np.linalg.norm(f, axis=1), rtol=1e-5)
  np.testing.assert_array_equal(g[~noisy], f[~noisy])
  assert np.abs(g[noisy] - f[noisy]).max() > 0.1


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
  task.features_np[0][1:21] = 0.0  # items 1..20 lose their text features
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  inputs = jnp.asarray([[0, 0, 3, 4, 25, 26, 27, 28], [19, 20, 21, 22, 23, 24, 25, 26]], jnp.int32)
  targets = jnp.concatenate([inputs[:, 1:], jnp.asarray([[29], [27]])], 1)
  negs = jnp.full_like(inputs, 35)
  cvals, valid = task.contributions(params, inputs, targets, negs)
  cvals = np.asarray(cvals)
  zero = (np.asarray(inputs) <= 20) & (np.asarray(inputs) > 0)
  assert np.all(cvals[..., 0][zero] == 0.0)
  assert np.all(cvals[..., 0][~zero & (np.asarray(inputs) > 0)] > 0.0)
  flags = np.asarray(demure.flag_lowest(jnp.asarray(cvals.reshape(2, -1)),
                                        valid.reshape(2, -1), 0.2)).reshape(cvals.shape)
  assert flags.sum() == 2 + 3  # floor(0.2·12) and floor(0.2·16) real (t, m) pairs
  assert flags[..., 0][zero].all()  # the 2 + 2 zero-contribution pairs come first


def test_demure_trains_and_reports_noise_detection(text_seq_dir, tmp_path):
  c = _config(text_seq_dir, **{"train.total_steps": 40, "train.log_every": 10,
                               "train.checkpoint_every": 40, "optim.lr": 1e-2,
                               "task.plant_noise_modality": "text"})
  loop_lib.train(c, tmp_path, get_task_class("demure"))
  rows = [r for r in read_metrics(tmp_path) if "loss" in r]
  assert rows[-1]["rec_loss"] < 0.85 * rows[0]["rec_loss"]
  assert all(abs(r["flagged_fraction"] - 0.2) < 0.05 for r in rows)
  mesh, task = loop_lib.setup(c, get_task_class("demure"))
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  m = task.evaluate(params, str(tmp_path))
  assert 0.0 <= m["noise/auc"] <= 1.0 and m["noise/planted_share"] > 0
  assert m["test/num_users"] == 96
