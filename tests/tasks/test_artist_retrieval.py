"""Artist retrieval task: loss semantics, training on planted artists, the evaluator's report."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.recipes import artists
from mmcl.config import load_config_file
from mmcl.eval.evaluator import Evaluator
from mmcl.losses import infonce, multimodal_infonce
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks import get_task_class
from mmcl.tasks.artist_retrieval import evaluate
from mmcl.tasks.artist_retrieval.loss import multi_positive_infonce, neighbour_matrix
from mmcl.tasks.artist_retrieval.data import training_neighbours
from mmcl.train import loop as loop_lib
from mmcl.train.metric_log import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("artists")
  facts = artists.write_planted_sources(root)
  out = root / "data"
  artists.build_artist_dataset(facts["sas"], facts["hetrec"], out, cf_dim=8, tag_dim=8,
                               text_encoder="tfidf", text_dim=16, drop_fraction=0.2,
                               test_fraction=0.1, val_fraction=0.1, seed=0)
  return out


def _config(data_dir, **overrides):
  c = load_config_file(str(REPO / "experiments/artist_retrieval.py") + ":tiny")
  c.data.dir = str(data_dir)
  for k, v in overrides.items():
    c.set(k.replace("__", "."), v)
  return c


def test_loss_is_multimodal_infonce_and_ignores_missing_vectors(planted_dir):
  c = _config(planted_dir)
  mesh = mesh_lib.make_mesh()
  task = get_task_class("artist_retrieval")(c, mesh)
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  batch = next(iter(artists.train_iterator(planted_dir, global_batch_size=64, seed=0)))
  glob = mesh_lib.host_batch_to_global(mesh, batch)
  loss, _ = jax.jit(lambda p, b: task.loss(p, b, jax.random.PRNGKey(1), train=False))(params, glob)

  @jax.jit  # the reference, in one program (eager dispatch compiles every operation apart)
  def reference(p, b):
    emb = {m: task.net.project(p, m, b[m]) for m in task.modalities}
    valid = {m: b[f"has_{m}"] for m in task.modalities}
    return multimodal_infonce(emb, valid, logit_scale=10.0, group_ids=b["artist"], impl="dense")
  ref = reference(params, {k: jnp.asarray(v) for k, v in batch.items()})
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  # An absent modality never enters the loss: scrambling its stored vector changes nothing.
  scrambled = dict(batch)
  for m in task.modalities:
    noise = np.random.default_rng(0).normal(size=batch[m].shape).astype(np.float32)
    scrambled[m] = np.where(batch[f"has_{m}"][:, None], batch[m], noise)
  loss2, _ = jax.jit(lambda p, b: task.loss(p, b, jax.random.PRNGKey(1), train=False))(
      params, mesh_lib.host_batch_to_global(mesh, scrambled))
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)


def test_trains_and_evaluates_on_planted_artists(planted_dir, tmp_path):
  c = _config(planted_dir, train__total_steps=60, train__log_every=10,
              train__checkpoint_every=60, optim__lr=3e-3)
  loop_lib.train(c, tmp_path, get_task_class("artist_retrieval"))
  rows = [r for r in read_metrics(tmp_path) if "loss" in r]
  assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
  metrics = Evaluator(tmp_path, resolve_task=get_task_class).evaluate(60)
  n = metrics["num_catalogue"]
  chance_recall = 10 / (n - 1)
  # The shared space retrieves similar artists far above chance, also across modalities (which the
  # raw spaces cannot do at all), and for queries that lack a modality.
  assert metrics["contrastive/recall@10"] > 5 * chance_recall
  assert metrics["contrastive/missing_any/recall@10"] > 3 * chance_recall
  assert metrics["matrix/text->cf/recall@10"] > 3 * chance_recall
  assert metrics["matrix/cf->tags/recall@10"] > 3 * chance_recall
  # On planted data where every modality carries the genre, fusing beats each single raw space
  # (those cannot embed the queries that lack their modality).
  best_single = max(metrics[f"raw_{m}/recall@10"] for m in ("cf", "tags", "text"))
  assert metrics["contrastive/recall@10"] > best_single
  # Artefacts: the systems table and the JSON with every bucket.
  out = tmp_path / "eval" / "60"
  table = (out / "artist_retrieval.md").read_text()
  assert "| contrastive |" in table and "| concat |" in table and "Modality matrix" in table
  data = json.loads((out / "artist_retrieval.json").read_text())
  assert {"pop_q1/num_queries", "complete/num_queries"} <= set(data["contrastive"])
  assert 0 <= metrics["contrastive/coverage@10"] <= 1


def test_rank_catalogue_masks_and_self_exclusion():
  corpus = np.eye(4, dtype=np.float32)
  corpus[3] = [0.9, 0.1, 0, 0]
  queries = corpus[[0, 1]]
  ranked = evaluate.rank_catalogue(queries, np.array([True, False]), np.array([0, 1]),
                                      corpus, np.array([True, True, False, True]), 4)
  assert ranked[0].tolist() == [3, 1, -1, -1]  # self and the corpus item without embedding left out
  assert ranked[1].tolist() == [-1, -1, -1, -1]  # a query without embedding retrieves nothing


def test_modality_bias_and_popularity_buckets():
  avail = {"a": np.array([True, True, False, False]), "b": np.ones(4, bool)}
  ranked = np.array([[1, 2], [0, -1], [3, 1]])
  bias = evaluate.modality_bias(ranked, avail, np.array([0, 1, 2]), k=2)
  assert bias["bias/a/share_if_query_has"] == pytest.approx(2 / 3)  # items 1, 2, 0
  assert bias["bias/a/share_if_query_lacks"] == pytest.approx(1 / 2)  # items 3, 1
  assert bias["bias/a/base_rate"] == 0.5
  listeners = np.array([0, 1, 1, 1, 1, 2, 3, 4, 5, 9, 9])
  b = evaluate.popularity_buckets(listeners, np.arange(11))
  assert b[0] == "pop_unknown"
  assert b[1:].tolist() == ["pop_q1", "pop_q1", "pop_q2", "pop_q2", "pop_q3", "pop_q3", "pop_q4",
                            "pop_q4", "pop_q5", "pop_q5"]


def test_baselines_concat_and_average():
  rng = np.random.default_rng(0)
  vecs = {"a": rng.normal(size=(6, 3)).astype(np.float32),
          "b": rng.normal(size=(6, 5)).astype(np.float32)}
  avail = {"a": np.array([1, 1, 1, 0, 1, 1], bool), "b": np.array([1, 0, 1, 1, 1, 1], bool)}
  base = evaluate.baseline_embeddings(vecs, avail, np.arange(6))
  concat, ok = base["concat"]
  assert concat.shape == (6, 8) and ok.all()
  np.testing.assert_allclose(np.linalg.norm(concat, axis=1), 1.0, atol=1e-6)
  assert np.all(concat[1, 3:] == 0) and np.all(concat[3, :3] == 0)  # zeros for missing parts
  avg, _ = base["average"]
  assert avg.shape == (6, 3)  # the PCA common dimension is the smallest modality's
  # An artist with only modality a: its average is its (PCA-projected) a vector alone.
  a_proj = evaluate.l2_normalize(evaluate.pca_project(vecs["a"], np.flatnonzero(avail["a"]),
                                                            3))
  np.testing.assert_allclose(avg[1], a_proj[1], atol=1e-5)


def _reference_multi_positive(a, b, a_ok, b_ok, artist, nb, s, lam):
  """The multi-positive loss by hand: loops over anchors, positives and candidates."""
  n = len(artist)
  terms = []
  for x, y, x_ok, y_ok in ((a, b, a_ok, b_ok), (b, a, b_ok, a_ok)):
    for i in range(n):
      if not x_ok[i]:
        continue
      cand = [j for j in range(n) if y_ok[j] and (j == i or artist[j] != artist[i])]
      pos = {j: lam for j in cand if nb[i][j]}
      if x_ok[i] and y_ok[i]:
        pos[i] = 1.0
      if not pos or sum(pos.values()) == 0:
        continue
      log_z = np.log(sum(np.exp(s * float(x[i] @ y[j])) for j in cand))
      terms.append(-sum(w * (s * float(x[i] @ y[j]) - log_z) for j, w in pos.items())
                   / sum(pos.values()))
  return sum(terms) / len(terms), len(terms)


def test_multi_positive_loss_on_four_artists():
  # 4 catalogue artists (+ one oversampled copy of artist 0): 0 lists 1 as similar, 2 lists 3;
  # row 3 lacks modality b, row 2 lacks a.
  ang = np.array([0.0, 0.4, 1.9, 2.3, 0.0])
  a = np.stack([np.cos(ang), np.sin(ang)], 1).astype(np.float32)
  b = np.stack([np.cos(ang + 0.2), np.sin(ang + 0.2)], 1).astype(np.float32)
  artist = np.array([0, 1, 2, 3, 0], np.int32)
  a_ok = np.array([1, 1, 0, 1, 1], bool)
  b_ok = np.array([1, 1, 1, 0, 1], bool)
  table = np.array([[1, -1], [-1, -1], [3, -1], [-1, -1]], np.int32)
  nb = np.asarray(neighbour_matrix(jnp.asarray(artist), jnp.asarray(table)))
  expected_nb = np.zeros((5, 5), bool)
  for i, j in ((0, 1), (4, 1), (2, 3)):
    expected_nb[i, j] = expected_nb[j, i] = True
  np.testing.assert_array_equal(nb, expected_nb)  # symmetrised, copies share their artist's links
  for lam in (1.0, 0.3):
    got, count = multi_positive_infonce(jnp.asarray(a), jnp.asarray(b), jnp.asarray(a_ok),
                                           jnp.asarray(b_ok), jnp.asarray(artist), jnp.asarray(nb),
                                           logit_scale=10.0, neighbour_weight=lam)
    ref, ref_count = _reference_multi_positive(a, b, a_ok, b_ok, artist, nb, 10.0, lam)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    # Anchors: a→b rows 0, 1, 4 (self) and 3 (its neighbour 2 has b); b→a rows 0, 1, 4 and 2.
    assert int(count) == ref_count == 8
  # Without neighbours and with every modality present it is InfoNCE with group ids.
  ones = jnp.ones(5, bool)
  got, _ = multi_positive_infonce(jnp.asarray(a), jnp.asarray(b), ones, ones,
                                     jnp.asarray(artist), jnp.asarray(nb), logit_scale=10.0,
                                     neighbour_weight=0.0)
  ref = infonce(jnp.asarray(a), jnp.asarray(b), logit_scale=10.0, group_ids=jnp.asarray(artist),
                impl="dense")
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)

  # Positives only ever link two role-train artists (queries and blocked neighbours never).
  meta = {"catalogue": {"gold": [[1, 2], [0, 3], [3, 0], [2, 1]],
                        "role": ["train", "train", "test", "blocked"]}}
  np.testing.assert_array_equal(training_neighbours(meta),
                                [[1, -1], [0, -1], [-1, -1], [-1, -1]])


def test_residual_text_path_is_frozen_and_keeps_text_geometry(planted_dir):
  c = _config(planted_dir, model__skip_modalities=("text",), model__skip_weight=1e4)
  task = get_task_class("artist_retrieval")(c, mesh_lib.make_mesh())
  params = task.init_params(jax.random.PRNGKey(0))
  x = jnp.asarray(artists.read_split(planted_dir, "validation")["text"][:8])
  project = jax.jit(lambda p: task.net.project(p, "text", x))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(project(p)[:, 0])))(params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads["skip"]))
  assert float(jnp.abs(grads["projectors"]["text"]["out"]["kernel"]).max()) > 0
  assert task.frozen_params_filter("skip/text/basis")
  # A dominant residual path is the (centred) principal-direction projection of the raw vector.
  fit = task.skip_fits()["text"]
  ref = evaluate.l2_normalize((np.asarray(x) - fit["mean"]) @ fit["basis"])
  np.testing.assert_allclose(np.asarray(project(params)), ref, atol=1e-3)
