"""`mmcl sweep`: every grid combination trained (and evaluated), one row each in results.csv/.md."""
import csv
import pathlib

import pytest

import shared_runs

from mmcl import cli
from mmcl.config import ConfigError
from mmcl.sweep import parse_grid, run_sweep

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_parse_grid():
  assert parse_grid(["optim.lr=1e-3,2e-3", "model.embed_dim=32"]) == [
      ("optim.lr", ["1e-3", "2e-3"]), ("model.embed_dim", ["32"])]
  with pytest.raises(ConfigError, match="key=v1,v2"):
    parse_grid(["optim.lr"])


def test_bad_grid_value_fails_before_any_training(tmp_path):
  with pytest.raises(ConfigError, match="config key 'optim.lr' expects float"):
    run_sweep(str(REPO / "experiments/clip_shapes.py:tiny"), str(tmp_path),
              grids=["optim.lr=fast"], overrides=[])
  assert not any(tmp_path.iterdir())


def test_sweep_runs_every_combination(shapes_dir, tmp_path, monkeypatch, capfd):
  # `mmcl sweep` itself runs in this process (it only starts the runs, both at once); every
  # run trains and evaluates in its own `python -m mmcl.cli train --eval` subprocess, 2 devices
  # each. The grid is a host-side data option and the learning rate is constant, so both runs
  # execute the shared reference run's train step (tests/shared_runs.py), which the compilation
  # cache holds, for 8 steps.
  monkeypatch.setenv("XLA_FLAGS", shared_runs.xla_flags(2))
  monkeypatch.chdir(REPO)
  rc = cli.main(["sweep", "--config", "experiments/clip_shapes.py:tiny",
                 "--workdir", str(tmp_path), "--grid", "data.augment=true,false",
                 "--parallel", "2",
                 "--set", f"data.dir={shapes_dir}", *shared_runs.SCHEDULE,
                 "--set", "train.total_steps=8", "--set", "train.checkpoint_every=4"])
  assert rc == 0, capfd.readouterr().err[-3000:]
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert [row["data.augment"] for row in rows] == ["true", "false"]
  for row in rows:
    assert row["status"] == "ok"
    assert float(row["final/loss"]) > 0 and row["best_step"] in ("4", "8")
    assert 0.0 <= float(row["eval/t2i/recall@1"]) <= 1.0
  assert rows[0]["final/loss"] != rows[1]["final/loss"]  # the grid value reached the runs
  md = (tmp_path / "results.md").read_text()
  assert md.count("| ok |") == 2 and "final/loss" in md and "best_step" in md


def test_train_eval_needs_a_single_process(tmp_path, capsys):
  """`mmcl train --eval` (how a sweep element trains and evaluates in one process) refuses a
  multi-process run before training anything."""
  rc = cli.main(["train", "--config", str(REPO / "experiments/clip_shapes.py") + ":tiny",
                 "--workdir", str(tmp_path / "run"), "--set", "distributed.num_processes=2",
                 "--eval"])
  assert rc == 2 and "--eval evaluates in the training process" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()
