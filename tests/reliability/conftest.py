"""One small trained CLIP workdir per test session, which fault-injection tests copy and damage."""
import pathlib
import shutil

import pytest
from reliability_helpers import tiny_config

from mmcl.tasks import get_task_class
from mmcl.train import loop as loop_lib


@pytest.fixture(scope="session")
def trained_workdir(shapes_dir, tmp_path_factory) -> pathlib.Path:
  """Tiny CLIP trained 8 steps, sealed checkpoints at steps 2, 4, 6 and 8 (read-only: copy it)."""
  path = tmp_path_factory.mktemp("reliability") / "run"
  c = tiny_config(shapes_dir, train__checkpoint_every=2, train__keep_checkpoints=4)
  loop_lib.train(c, path, get_task_class("clip"))
  return path


@pytest.fixture
def workdir(trained_workdir, tmp_path) -> pathlib.Path:
  """A private copy of `trained_workdir` that a test may damage."""
  dst = tmp_path / "run"
  shutil.copytree(trained_workdir, dst)
  return dst
