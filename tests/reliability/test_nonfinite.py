"""A diverged model never scores: NaN ranks last, the trainer saves no non-finite checkpoint, and
every evaluation path stops with one line naming the step and the tower."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reliability_helpers import tiny_config

from mmcl import cli
from mmcl.eval import evaluator as evaluator_lib
from mmcl.eval import finite
from mmcl.eval import metrics as metrics_lib
from mmcl.eval import topk
from mmcl.losses import common as loss_common
from mmcl.losses import probe
from mmcl.tasks import get_task_class
from mmcl.train import checkpoint as ckpt_lib
from mmcl.train import loop as loop_lib


def _unit_rows(n, d, seed):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_positive_ranks_puts_nan_last():
  q, c = _unit_rows(6, 8, 0), _unit_rows(6, 8, 0)  # every query's positive is itself
  q[2] = np.nan  # a NaN query: all its scores NaN
  c[4] = np.nan  # a NaN corpus row: query 4's positive and everyone's negative
  ranks = np.asarray(topk.positive_ranks(q, c, np.arange(6), np.arange(6)))
  assert ranks[2] == 5 and ranks[4] == 5  # last of 6, never first
  assert all(ranks[i] == 0 for i in (0, 1, 3, 5))  # the NaN row outranks no one


def test_exact_topk_puts_nan_last():
  q, c = _unit_rows(3, 8, 1), _unit_rows(5, 8, 2)
  c[0] = np.nan
  scores, idx = topk.exact_topk(q, c, 5)
  # The NaN item is never retrieved: the last slot is empty (index -1, score -inf).
  np.testing.assert_array_equal(np.asarray(idx)[:, -1], -1)
  assert np.isneginf(np.asarray(scores)[:, -1]).all()
  assert np.isfinite(np.asarray(scores)[:, :-1]).all()
  assert not (np.asarray(idx) == 0).any()


def test_sampled_ranks_put_nan_last():
  pos = np.array([0.5, np.nan, 0.5])
  neg = np.array([[0.1, 0.9], [0.1, 0.2], [np.nan, 0.1]])
  for ties in ("pessimistic", "optimistic"):
    np.testing.assert_array_equal(metrics_lib.sampled_ranks(pos, neg, ties=ties), [1, 2, 0])


def test_require_scorable_names_the_tower_and_rows():
  ok = _unit_rows(4, 3, 0)
  bad = ok.copy()
  bad[[1, 3], 0] = np.inf
  with pytest.raises(finite.NonFiniteError, match=r"^text tower: 2 of 4 rows are non-finite"):
    finite.require_scorable({"image tower": ok, "text tower": bad})
  with pytest.raises(finite.NonFiniteError, match="scores of huge against huge overflow float32"):
    finite.require_scorable({"huge": ok * 1e20})
  finite.require_scorable({"a": ok, "b": ok})


def test_diverged_resume_keeps_last_good_checkpoint_evaluable(workdir):
  """The NaN reproduction: resume with lr=1e30 and a checkpoint every step."""
  data_dir = json.loads((workdir / "config.json").read_text())["data"]["dir"]
  c = tiny_config(data_dir, optim__lr=1e30, train__checkpoint_every=1, train__total_steps=16,
                  train__keep_checkpoints=10)
  with pytest.raises(loop_lib.NonFiniteLossError) as e:
    loop_lib.train(c, workdir, get_task_class("clip"))
  msg = str(e.value)
  steps = ckpt_lib.Checkpointer(workdir, read_only=True).all_steps()
  assert f"Last good checkpoint: step {steps[-1]} in" in msg
  assert "not saved" in msg or "update was not applied" in msg
  # Every saved checkpoint is finite and evaluates to a real (not perfect) score.
  ev = evaluator_lib.Evaluator(workdir, resolve_task=get_task_class)
  for step in steps:
    finite.require_finite_params(ev.restore_params(step))
  metrics = ev.evaluate(steps[-1])
  assert 0.0 <= metrics["t2i/recall@1"] < 1.0 and np.isfinite(metrics["t2i/mrr"])


def test_evaluator_stops_on_nan_parameters(workdir, capsys):
  """A checkpoint holding NaN parameters (written by hand, as an older mmcl could) is never
  scored: one line naming the step and the parameter, exit code 3."""
  c = tiny_config(json.loads((workdir / "config.json").read_text())["data"]["dir"])
  mesh, task = loop_lib.setup(c, get_task_class("clip"))
  state_fn, *_ = loop_lib.build_state(c, task, mesh)
  state = state_fn()
  state = state.replace(params=jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), state.params))
  ck = ckpt_lib.Checkpointer(workdir, async_save=False, keep=10)
  ck.save(12, state, None)
  ck.close()
  assert cli.main(["eval", "--workdir", str(workdir), "--step", "12"]) == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1
  assert err[0].startswith("mmcl eval: error: checkpoint step 12: parameters:")
  assert "are non-finite" in err[0]


def test_evaluator_stops_on_overflowing_embeddings(workdir, capsys):
  """Finite but huge parameters (what lr=1e30 leaves) overflow the towers: named, not scored."""
  c = tiny_config(json.loads((workdir / "config.json").read_text())["data"]["dir"])
  mesh, task = loop_lib.setup(c, get_task_class("clip"))
  state_fn, *_ = loop_lib.build_state(c, task, mesh)
  state = state_fn()
  state = state.replace(params=jax.tree.map(lambda x: x * 1e30, state.params))
  ck = ckpt_lib.Checkpointer(workdir, async_save=False, keep=10)
  ck.save(12, state, None)
  ck.close()
  assert cli.main(["eval", "--workdir", str(workdir), "--step", "12"]) == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "checkpoint step 12: image tower (test split):" in err[0]
  assert "rows are non-finite" in err[0]


def test_auto_impl_uses_fused_only_after_the_probe_passes(monkeypatch, caplog):
  big = int(np.sqrt(loss_common.AUTO_TILED_MIN_LOGITS)) + 1
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  probe._probe_for.cache_clear()
  calls = []

  def failing(impl, *args):
    calls.append(impl)
    if impl == "fused":
      raise RuntimeError("Triton compilation failed\nmore detail")
    return (jnp.zeros(()), jnp.zeros((2, 2)), jnp.zeros((2, 2)))

  monkeypatch.setattr(probe, "_loss_and_grads", failing)
  with caplog.at_level(logging.WARNING, logger="mmcl.losses"):
    assert loss_common.resolve_impl("auto", big, big, "t") == "tiled"
    assert loss_common.resolve_impl("auto", big, big, "t") == "tiled"  # probed once
  assert calls == ["fused"]
  assert "impl=auto uses the tiled loss kernel" in caplog.text
  assert "RuntimeError: Triton compilation failed" in caplog.text
  # A probe whose fused result disagrees with the tiled one also keeps "tiled".
  probe._probe_for.cache_clear()
  monkeypatch.setattr(probe, "_loss_and_grads", lambda impl, *a: (
      jnp.full((), 1.0 if impl == "fused" else 2.0), jnp.zeros((2, 2)), jnp.zeros((2, 2))))
  assert loss_common.resolve_impl("auto", big, big, "t") == "tiled"
  # One that agrees lets "auto" choose "fused"; small problems stay dense; explicit is explicit.
  probe._probe_for.cache_clear()
  monkeypatch.setattr(probe, "_loss_and_grads", lambda impl, *a: (
      jnp.ones(()), jnp.zeros((2, 2)), jnp.zeros((2, 2))))
  assert loss_common.resolve_impl("auto", big, big, "t") == "fused"
  assert loss_common.resolve_impl("auto", 8, 8, "t") == "dense"
  assert loss_common.resolve_impl("tiled", big, big, "t") == "tiled"
  probe._probe_for.cache_clear()
