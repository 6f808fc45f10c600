"""A failed `mmcl train` leaves the workdir as it was; every user-facing error is one line."""
import json

import pytest
from reliability_helpers import tiny_config

from mmcl import cli
from mmcl.config import ConfigError
from mmcl.tasks import get_task_class
from mmcl.train import loop as loop_lib
from mmcl.train import preflight


def _snapshot(path):
  return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("overrides, message", [
    ({"model__embed_dim": 48}, "model.embed_dim: 32 → 48"),
    ({"model__text__depth": 2, "train__total_steps": 12},
     "changed key(s): model.text.depth: 1 → 2"),
    ({"data__global_batch_size": 30}, "'data.global_batch_size' = 30 is not divisible by the "
                                      "mesh's data axis (8 devices)"),
    ({"train__grad_accum_steps": 3}, "is not divisible by train.grad_accum_steps (3)"),
])
def test_a_failed_resume_changes_nothing(workdir, overrides, message):
  before = _snapshot(workdir)
  c = tiny_config(json.loads((workdir / "config.json").read_text())["data"]["dir"], **overrides)
  with pytest.raises(ConfigError) as e:
    loop_lib.train(c, workdir, get_task_class("clip"))
  assert message in str(e.value)
  if "embed_dim" in message:  # the shapes that differ are named, parameters first
    assert "params.image.head.proj.kernel: [32, 32] float32 in the checkpoint, [32, 48]" in str(
        e.value)
    assert "train.total_steps" not in str(e.value)
  assert _snapshot(workdir) == before


def test_allowed_changes_are_recorded(workdir):
  c = tiny_config(json.loads((workdir / "config.json").read_text())["data"]["dir"],
                  train__total_steps=10, optim__lr=5e-4, train__checkpoint_every=2,
                  train__keep_checkpoints=4)
  loop_lib.train(c, workdir, get_task_class("clip"))
  rows = [json.loads(line) for line in
          (workdir / preflight.CHANGES_FILE).read_text().splitlines()]
  assert len(rows) == 1 and rows[0]["resumed_at_step"] == 8
  assert rows[0]["changes"] == {"optim.lr": {"old": 2e-3, "new": 5e-4},
                                "train.total_steps": {"old": 8, "new": 10}}
  assert json.loads((workdir / "config.json").read_text())["train"]["total_steps"] == 10


@pytest.mark.parametrize("setting, message", [
    ("train.checkpoint_every=0", "config key 'train.checkpoint_every' must be >= 1, got 0"),
    ("train.log_every=-2", "config key 'train.log_every' must be >= 1, got -2"),
    ("optim.lr=-0.1", "config key 'optim.lr' must be >= 0.0, got -0.1"),
    ("data.global_batch_size=0", "config key 'data.global_batch_size' must be >= 1, got 0"),
])
def test_out_of_bounds_values_are_one_line(workdir, setting, message, capsys):
  before = _snapshot(workdir)
  data_dir = json.loads((workdir / "config.json").read_text())["data"]["dir"]
  assert cli.main(["train", "--config", "experiments/clip_shapes.py:tiny", "--workdir",
                   str(workdir), "--set", f"data.dir={data_dir}", "--set", setting]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [f"mmcl train: error: {message}"]
  assert _snapshot(workdir) == before
