"""A method in a user's own package (`task.name = "package.module:Class"`) trains, evaluates and
exports without editing mmcl; `import mmcl` exposes the subpackages and the version."""
import importlib.metadata
import json
import pathlib
import textwrap

import pytest

import mmcl
from mmcl.config import ConfigError, load_config_file
from mmcl.eval.evaluator import run_evaluator
from mmcl.export import export_workdir
from mmcl.tasks import get_task_class, make_config
from mmcl.train import loop as loop_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

USER_TASK = '''
"""A user's method: CLIP with a fixed logit scale, declared outside mmcl."""
import jax.numpy as jnp

from mmcl.tasks.clip.task import ClipTask


class FixedTemperatureClip(ClipTask):
  @classmethod
  def declare_config(cls, config):
    super().declare_config(config)
    config.task.define("fixed_scale", 20.0, "the logit scale, not learned")

  def logit_scale(self, params):
    return jnp.asarray(self.config.task.fixed_scale, jnp.float32)
'''


def test_public_api():
  assert mmcl.__version__ == importlib.metadata.version("mmcl")
  assert callable(mmcl.losses.infonce) and callable(mmcl.eval.topk.exact_topk)
  assert mmcl.config.Config is not None and "losses" in dir(mmcl)
  assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
  with pytest.raises(AttributeError):
    mmcl.no_such_thing  # noqa: B018


def test_a_task_from_a_users_package_trains_evaluates_and_exports(shapes_dir, tmp_path,
                                                                  monkeypatch):
  pkg = tmp_path / "src" / "userpkg"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "fixed_clip.py").write_text(textwrap.dedent(USER_TASK))
  monkeypatch.syspath_prepend(str(tmp_path / "src"))
  name = "userpkg.fixed_clip:FixedTemperatureClip"
  c = make_config(name)
  c.update_from_dict({k: v for k, v in load_config_file(
      str(REPO / "experiments/clip_shapes.py") + ":tiny").to_dict().items() if k != "task"})
  c.task.name = name
  c.data.dir = str(shapes_dir)
  c.train.total_steps, c.train.checkpoint_every = 2, 2
  workdir = tmp_path / "run"
  loop_lib.train(c, workdir, get_task_class(name))
  metrics = run_evaluator(str(workdir), resolve_task=get_task_class)
  assert 0.0 < metrics["t2i/recall@10"] <= 1.0 and metrics["num_pairs"] == 128
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert all(r["logit_scale"] == 20.0 for r in rows if "logit_scale" in r)  # the user's loss ran
  manifest = export_workdir(workdir, tmp_path / "export", platforms=("cpu",),
                            resolve_task=get_task_class)
  assert set(manifest["towers"]) == {"image", "text"} and manifest["step"] == 2


def test_bad_task_names_are_config_errors(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match="unknown task 'nope'.*package.module:Class"):
    get_task_class("nope")
  with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.mod'"):
    get_task_class("no_such_pkg.mod:Task")
  (tmp_path / "notatask.py").write_text("class Thing:\n  pass\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(ConfigError, match="notatask.Thing is not a mmcl.train.task.Task subclass"):
    get_task_class("notatask:Thing")
