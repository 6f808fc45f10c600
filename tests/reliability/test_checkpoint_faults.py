"""Damaged checkpoints are detected, reported in one line and passed over; never silently read."""
import json
import logging
import shutil

import numpy as np
import pytest
from reliability_helpers import tiny_config

from mmcl import cli
from mmcl.eval import evaluator as evaluator_lib
from mmcl.tasks import get_task_class
from mmcl.train import checkpoint as ckpt_lib
from mmcl.train import loop as loop_lib


def _largest_data_file(step_dir):
  return max((step_dir / "state").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)


def overwrite_in_place(step_dir):
  """About 1 KB of a data file overwritten: same size, other bytes."""
  path = _largest_data_file(step_dir)
  data = bytearray(path.read_bytes())
  data[100:1100] = bytes((b + 1) % 256 for b in data[100:1100])
  path.write_bytes(bytes(data))


def truncate(step_dir):
  path = _largest_data_file(step_dir)
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_file(step_dir):
  (step_dir / "state" / "manifest.ocdbt").unlink()


def garbage_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_text("{not json")


DAMAGE = {"overwrite": (overwrite_in_place, "changed since it was saved"),
          "truncate": (truncate, "bytes, "),
          "delete": (delete_file, "state/manifest.ocdbt is missing"),
          "garbage_metadata": (garbage_metadata, "state/_METADATA has")}


def test_sealed_steps_verify(trained_workdir):
  rows = ckpt_lib.list_checkpoints(trained_workdir)
  assert [(r["step"], r["status"]) for r in rows] == [(s, "valid") for s in (2, 4, 6, 8)]
  seal = json.loads((trained_workdir / "checkpoints/8" / ckpt_lib.INTEGRITY_FILE).read_text())
  assert "state/_METADATA" in seal["files"] and "data_iter/process_0-of-1.json" in seal["files"]


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_each_damage_is_detected_and_named(workdir, kind, capsys):
  damage, reason = DAMAGE[kind]
  damage(workdir / "checkpoints/8")
  status = ckpt_lib.Checkpointer(workdir, read_only=True).status(8)
  assert status.status == ckpt_lib.CORRUPT and reason in status.reason
  assert cli.main(["checkpoints", str(workdir)]) == 0
  out = capsys.readouterr().out.splitlines()
  assert [line.split()[:2] for line in out] == [["2", "valid"], ["4", "valid"], ["6", "valid"],
                                                 ["8", "corrupt"]]
  assert reason in out[-1]
  # An explicit step stops with one line naming the step and the reason, exit code 2.
  assert cli.main(["eval", "--workdir", str(workdir), "--step", "8"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "checkpoint step 8" in err[0] and reason in err[0]


def test_evaluator_falls_back_to_the_previous_valid_step(workdir, caplog):
  overwrite_in_place(workdir / "checkpoints/8")
  garbage_metadata(workdir / "checkpoints/6")
  with caplog.at_level(logging.WARNING, logger="mmcl.checkpoint"):
    metrics = evaluator_lib.run_evaluator(str(workdir), resolve_task=get_task_class)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 2
  assert "checkpoint step 8" in warnings[0]
  assert "using the previous checkpoint (step 6)" in warnings[0]
  assert "checkpoint step 6" in warnings[1] and "(step 4)" in warnings[1]
  assert json.loads((workdir / "eval/latest.json").read_text())["step"] == 4
  assert 0.0 < metrics["t2i/recall@10"] < 1.0
  # Nothing was deleted or moved by the read-only evaluator.
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6", "8"]


def test_watch_skips_a_corrupt_step_and_evaluates_the_rest(workdir, caplog):
  truncate(workdir / "checkpoints/6")
  with caplog.at_level(logging.WARNING):
    state = evaluator_lib.run_evaluator(str(workdir), watch=True, poll_seconds=0.0,
                                        timeout_seconds=0.0, resolve_task=get_task_class)
  assert sorted(state.done) == [2, 4, 8]
  assert any("checkpoint step 6" in r.getMessage() and "skipped" in r.getMessage()
             for r in caplog.records)


def test_resume_behind_a_corrupt_step_equals_an_uninterrupted_run(workdir, trained_workdir):
  """Step 8 unsealed (as an older mmcl wrote it) with a garbage data-iterator file: the resume
  fails to restore it, passes over it to step 6, moves it aside (never deleting it), and retrains
  7..8 to exactly the parameters of the undamaged run."""
  step_dir = workdir / "checkpoints/8"
  (step_dir / ckpt_lib.INTEGRITY_FILE).unlink()
  (step_dir / "data_iter/process_0-of-1.json").write_text("{garbage")
  assert ckpt_lib.Checkpointer(workdir, read_only=True).status(8).status == ckpt_lib.UNVERIFIED
  data_dir = json.loads((workdir / "config.json").read_text())["data"]["dir"]
  c = tiny_config(data_dir, train__checkpoint_every=2, train__keep_checkpoints=4)
  loop_lib.train(c, workdir, get_task_class("clip"))
  rows = [(r["step"], r["status"]) for r in ckpt_lib.list_checkpoints(workdir)]
  assert rows == [(2, "valid"), (4, "valid"), (6, "valid"), (8, "valid"), (8, "quarantined")]
  moved = workdir / ckpt_lib.QUARANTINE_DIR / "8"
  assert (moved / "data_iter/process_0-of-1.json").read_text() == "{garbage"
  abstract = _abstract(c)
  got = ckpt_lib.Checkpointer(workdir, read_only=True).restore(8, abstract).params
  want = ckpt_lib.Checkpointer(trained_workdir, read_only=True).restore(8, abstract).params
  for g, w in zip(_leaves(got), _leaves(want)):
    np.testing.assert_array_equal(g, w)


def _abstract(c):
  mesh, task = loop_lib.setup(c, get_task_class("clip"))
  _, abstract, shardings, _, _ = loop_lib.build_state(c, task, mesh)
  return ckpt_lib.abstract_with_shardings(abstract, shardings)


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_no_usable_checkpoint_is_one_line(workdir, capsys):
  for step in (2, 4, 6, 8):
    delete_file(workdir / "checkpoints" / str(step))
  assert cli.main(["eval", "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no usable checkpoint" in err[0] and "step 2:" in err[0]


def test_export_uses_the_newest_valid_step(workdir, tmp_path, caplog):
  from mmcl.export import export_workdir
  garbage_metadata(workdir / "checkpoints/8")
  with caplog.at_level(logging.WARNING, logger="mmcl.checkpoint"):
    manifest = export_workdir(workdir, tmp_path / "export", platforms=("cpu",),
                              resolve_task=get_task_class)
  assert manifest["step"] == 6
  assert any("checkpoint step 8" in r.getMessage() for r in caplog.records)
  shutil.rmtree(tmp_path / "export")
