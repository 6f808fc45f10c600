"""Fixtures shared by the export tests and the features-from-trained-towers tests."""
import pathlib

import pytest

from mmcl.config import load_config_file
from mmcl.export import export_workdir
from mmcl.tasks import get_task_class
from mmcl.train import checkpoint as ckpt_lib
from mmcl.train import loop as loop_lib

REPO = pathlib.Path(__file__).resolve().parents[2]


def _config(shapes_dir):
  c = load_config_file(str(REPO / "experiments/clip_shapes.py") + ":tiny")
  c.data.dir = str(shapes_dir)
  return c


@pytest.fixture(scope="session")
def workdir(shapes_dir, tmp_path_factory):
  """A workdir with one checkpoint (step 3) of freshly initialised tiny CLIP parameters: the
  export does not care whether they were trained, and skipping the train step keeps this fast."""
  c = _config(shapes_dir)
  path = tmp_path_factory.mktemp("export") / "run"
  path.mkdir()
  (path / "config.json").write_text(c.to_json())
  mesh, task = loop_lib.setup(c, get_task_class("clip"))
  state_fn, *_ = loop_lib.build_state(c, task, mesh)
  ckpt = ckpt_lib.Checkpointer(path, async_save=False)
  ckpt.save(3, state_fn(), None)
  ckpt.close()
  return path


@pytest.fixture(scope="session")
def exported(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("out") / "serving"
  manifest = export_workdir(workdir, out, corpus=True)
  return out, manifest
