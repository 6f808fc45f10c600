"""`mmcl sweep`: every grid combination trained (and evaluated), one row each in results.csv/.md."""
import csv
import os
import pathlib
import subprocess
import sys

import pytest

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


def test_sweep_runs_every_combination(shapes_dir, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  r = subprocess.run(
      [sys.executable, "-m", "mmcl.cli", "sweep", "--config", "experiments/clip_shapes.py:tiny",
       "--workdir", str(tmp_path), "--grid", "optim.lr=0.001,0.003",
       "--set", f"data.dir={shapes_dir}", "--set", "train.total_steps=4",
       "--set", "train.checkpoint_every=2"], cwd=REPO, env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = list(csv.DictReader(open(tmp_path / "results.csv")))
  assert [row["optim.lr"] for row in rows] == ["0.001", "0.003"]
  for row in rows:
    assert row["status"] == "ok"
    assert float(row["final/loss"]) > 0 and row["best_step"] in ("2", "4")
    assert 0.0 <= float(row["eval/t2i/recall@1"]) <= 1.0
  md = (tmp_path / "results.md").read_text()
  assert md.count("| ok |") == 2 and "final/loss" in md and "best_step" in md
