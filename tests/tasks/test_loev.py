"""LOEV task: per-head SupCon with exclusion masks, LOEV++ branches, learning, evaluation."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmcl.config import load_config_file
from mmcl.losses import supcon
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks import get_task_class

pytest.importorskip("librosa")
REPO = pathlib.Path(__file__).resolve().parents[2]


def _config(variant):
  return load_config_file(str(REPO / "experiments/loev.py") + f":{variant}")


def _task(tmp_path, variant="tiny", **overrides):
  c = _config(variant)
  c.data.dir = str(tmp_path / "music_train")
  c.data.eval_dir = str(tmp_path / "music_eval")
  for k, v in overrides.items():
    c.set(k.replace("__", "."), v)
  return get_task_class("loev")(c, mesh_lib.make_mesh())


def _batch(task, b=8, seed=0):
  rng = np.random.default_rng(seed)
  audio = (0.1 * rng.normal(size=(b, 2, task.out_samples))).astype(np.float32)
  audio[:, 1] = 0.8 * audio[:, 0] + 0.2 * audio[:, 1]  # two correlated views of each clip
  applied = rng.random((b, 2, len(task.tracked))) < 0.5
  return {"audio": audio, "applied": applied,
          "params": np.zeros(applied.shape, np.float32),
          "key": np.zeros(b, np.int32), "tempo": np.zeros(b, np.float32)}


def test_loss_is_mean_of_supcon_heads_with_exclusions(tmp_path):
  task = _task(tmp_path)
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  batch = _batch(task)
  glob = mesh_lib.host_batch_to_global(task.mesh, batch)
  loss_fn = jax.jit(lambda p, b: task.loss(p, b, jax.random.PRNGKey(0), train=True))
  loss, metrics = loss_fn(params, glob)
  clip_ids = jnp.repeat(jnp.arange(8), 2)
  applied = jnp.asarray(batch["applied"]).reshape(16, -1)

  @jax.jit  # the reference, in one program (eager dispatch compiles every operation apart)
  def reference(p, audio):
    heads = task.net.head_outputs(p, task.net.features(p, audio))
    return [supcon(z / jnp.linalg.norm(z, axis=-1, keepdims=True), logit_scale=10.0,
                   clip_ids=clip_ids, exclude=None if h == 0 else applied[:, h - 1],
                   impl="dense") for h, z in enumerate(heads)]
  refs = [float(r) for r in reference(params, jnp.asarray(batch["audio"]).reshape(16, -1))]
  assert len(refs) == 3
  np.testing.assert_allclose([float(metrics[f"loss/{n}"]) for n in task.head_names()], refs,
                             rtol=1e-4)
  np.testing.assert_allclose(float(loss), np.mean(refs), rtol=1e-4)
  # A view with augmentation k is nobody's positive in head k: with pitch on every view, the
  # pitch head has no positive pairs (loss 0) while the invariant head still has them.
  all_pitch = dict(batch)
  all_pitch["applied"] = batch["applied"].copy()
  all_pitch["applied"][..., 0] = True
  _, m2 = loss_fn(params, mesh_lib.host_batch_to_global(task.mesh, all_pitch))
  assert float(m2["loss/pitch"]) == 0.0 and float(m2["loss/invariant"]) > 0.5


def test_variants_heads_and_branches(tmp_path):
  simclr = _task(tmp_path, "tiny_simclr")
  pp = _task(tmp_path, "tiny_plusplus")
  p1 = jax.jit(simclr.init_params)(jax.random.PRNGKey(0))
  p3 = jax.jit(pp.init_params)(jax.random.PRNGKey(0))
  assert list(p1["heads"]) == ["head_0"] and simclr.head_names() == ["invariant"]
  branches = sorted(k for k in p3["trunk"] if k.startswith("last_stage_branch_"))
  assert branches == ["last_stage_branch_0", "last_stage_branch_1", "last_stage_branch_2"]
  feats = jax.jit(pp.net.features)(p3, jnp.zeros((2, pp.out_samples)) + 0.01)
  assert feats.shape == (2, 3, 2 * pp.config.model.channels[-1])
  long = _config("simclr_long")
  assert long.task.variant == "simclr" and long.data.view_bank == 8
  for bad in ("plusplus_simclr", "long_wide_wide", "long_v4_narrow"):
    with pytest.raises(ValueError, match="unknown variant"):
      _config(bad)
  # The recommended configurations (docs/results/loev.md): LOEV on the wider trunk, LOEV++ with
  # linear heads, both with four views per clip; the flags change only what they name.
  wide = _config("long_v4_wide")
  narrow = _config("long_v4")
  assert tuple(wide.model.channels) == (16, 32, 64, 128) and wide.data.num_views == 4
  narrow.model.channels = wide.model.channels
  assert narrow.to_dict() == wide.to_dict()
  lin = _config("plusplus_long_v4_lin")
  assert lin.task.variant == "loev++" and lin.model.head_hidden == 0
  assert _config("tiny_lin").model.head_hidden == 0
  # Branches have their own weights, so their features differ.
  assert float(jnp.abs(feats[:, 0] - feats[:, 1]).max()) > 1e-4
  # Evaluation spaces: loev++ subspaces are the branches, plus each head's projection of its branch.
  audio = np.full((3, pp.out_samples), 0.01, np.float32)
  emb = pp.net.embed(p3, audio, batch_size=2)
  assert sorted(emb) == sorted(["whole"] + [f"{kind}/{h}" for kind in ("sub", "head")
                                             for h in pp.head_names()])
  assert emb["sub/pitch"].shape == (3, 2 * pp.config.model.channels[-1])
  assert emb["head/pitch"].shape == (3, pp.config.model.head_dim)
  assert sorted(simclr.net.embed(p1, audio, batch_size=2)) == ["sub/invariant", "whole"]


def test_learns_on_a_fixed_batch(tmp_path):
  task = _task(tmp_path, "tiny_plusplus")
  params = jax.jit(task.init_params)(jax.random.PRNGKey(1))
  glob = mesh_lib.host_batch_to_global(task.mesh, _batch(task, seed=2))
  tx = optax.adam(5e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    (l, _), g = jax.value_and_grad(lambda q: task.loss(q, glob, jax.random.PRNGKey(0),
                                                       train=True), has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l

  losses = []
  for _ in range(25):
    params, opt, l = step(params, opt)
    losses.append(float(l))
  assert losses[-1] < 0.8 * losses[0]


def test_evaluate_reports_every_probe(tmp_path):
  task = _task(tmp_path, data__num_eval_clips=24)
  metrics = task.evaluate(jax.jit(task.init_params)(jax.random.PRNGKey(0)), str(tmp_path / "eval"))
  for space in ("whole", "sub/invariant", "sub/pitch", "sub/stretch"):
    for aug in ("pitch", "stretch"):
      assert np.isfinite(metrics[f"equivariance/{aug}/{space}/r2"])
      for probe in ("equivariance_cf", "equivariance_rbf_cf"):
        assert np.isfinite(metrics[f"{probe}/{aug}/{space}/r2"])
        assert metrics[f"{probe}/{aug}/{space}/r2/se"] > 0
    assert 0 <= metrics[f"knn/key/{space}/hit@10"] <= 1
    assert 0 <= metrics[f"knn/tempo/{space}/hit@10"] <= 1
    assert 0 <= metrics[f"invariance/pitch/{space}/own_top1"] <= 1
    assert metrics[f"equivariance/pitch/{space}/r2/se"] > 0
    assert np.isfinite(metrics[f"probe_cf/tempo/{space}/r2"])
    assert metrics[f"probe_cf/tempo/{space}/r2/se"] > 0
    assert 0 <= metrics[f"probe_cf/key/{space}/accuracy"] <= 1
  assert 0 <= metrics["probe/key_accuracy"] <= 1
  assert 0 < metrics["knn/key/chance"] < 0.2
  assert (tmp_path / "eval" / "loev_eval.json").is_file()


def test_linear_heads_and_the_four_view_variant(tmp_path):
  # model.head_hidden = 0: each head is one affine map of its branch, h(a + b) = h(a) + h(b) − h(0).
  task = _task(tmp_path, "tiny_plusplus_v4", model__head_hidden=0)
  assert task.config.data.num_views == 4 and task.config.data.global_batch_size == 8
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  assert set(params["heads"]["head_1"]) == {"out"}
  rng = np.random.default_rng(0)
  width = params["heads"]["head_1"]["out"]["kernel"].shape[0]  # the branch's feature width
  a, b = (jnp.asarray(rng.normal(size=(3, task.num_heads, width)), jnp.float32) for _ in range(2))
  heads = jax.jit(task.net.head_outputs)
  h = lambda f: np.asarray(heads(params, f)[1])  # noqa: E731
  np.testing.assert_allclose(h(a + b), h(a) + h(b) - h(jnp.zeros_like(a)), atol=1e-5)
  # The loss takes four views per clip (v = 4) and is finite.
  rng = np.random.default_rng(1)
  audio = (0.1 * rng.normal(size=(8, 4, task.out_samples))).astype(np.float32)
  batch = {"audio": audio, "applied": rng.random((8, 4, len(task.tracked))) < 0.5}
  glob = mesh_lib.host_batch_to_global(task.mesh, batch)
  loss, _ = jax.jit(lambda p, b: task.loss(p, b, jax.random.PRNGKey(0), train=True))(params, glob)
  assert np.isfinite(float(loss))


def test_no_projection_heads(tmp_path):
  # model.head_dim = 0 (loev++): head h's output is branch h itself, so the loss acts on the
  # representation; the same loss as computing SupCon on the branches by hand.
  task = _task(tmp_path, "tiny_plusplus", model__head_dim=0)
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  assert params["heads"] == {}
  batch = _batch(task)
  glob = mesh_lib.host_batch_to_global(task.mesh, batch)
  loss, _ = jax.jit(lambda p, b: task.loss(p, b, jax.random.PRNGKey(0), train=True))(params, glob)
  clip = jnp.repeat(jnp.arange(8), 2)
  applied = jnp.asarray(batch["applied"]).reshape(16, -1)

  @jax.jit  # the reference, in one program (eager dispatch compiles every operation apart)
  def reference(p, audio):
    feats = task.net.features(p, audio)
    ref = []
    for h in range(task.num_heads):
      z = feats[:, h] / jnp.linalg.norm(feats[:, h], axis=-1, keepdims=True)
      ref.append(supcon(z, logit_scale=1 / task.config.task.temperature, clip_ids=clip,
                        exclude=None if h == 0 else applied[:, h - 1], impl="dense"))
    return jnp.mean(jnp.stack(ref))
  np.testing.assert_allclose(float(loss),
                             float(reference(params, jnp.asarray(batch["audio"]).reshape(16, -1))),
                             rtol=1e-5)
  # loev without heads would be one space for every head: refused with the key named.
  with pytest.raises(ValueError, match="model.head_dim"):
    _task(tmp_path, "tiny", model__head_dim=0)
