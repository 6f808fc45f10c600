"""`mmcl eval --set ... --tag T`: another evaluation protocol on the same checkpoint, kept apart."""
import json

import pytest

from mmcl.config import ConfigError
from mmcl.eval.evaluator import Evaluator, run_evaluator
from mmcl.tasks import get_task_class


def test_overrides_change_the_protocol_and_write_to_the_tagged_folder(tiny_clip_workdir):
  default = run_evaluator(str(tiny_clip_workdir), step=3, resolve_task=get_task_class)
  tagged = run_evaluator(str(tiny_clip_workdir), step=3, overrides=["task.eval_ks=(1, 2)"],
                         tag="k12", resolve_task=get_task_class)
  # The default protocol's reports stay where they were; the tagged run has its own.
  assert json.loads((tiny_clip_workdir / "eval/latest.json").read_text())["step"] == 3
  written = json.loads((tiny_clip_workdir / "eval-k12/3/metrics.json").read_text())
  assert {k for k in written if "@2" in k} and not {k for k in default if "@2" in k}
  # Same checkpoint, same embeddings: the metric both protocols report agrees.
  shared = sorted(k for k in default if k in tagged and "@1" in k)
  assert shared and all(default[k] == pytest.approx(tagged[k], abs=1e-6) for k in shared)


def test_overrides_need_a_tag_and_known_keys(tiny_clip_workdir):
  with pytest.raises(ValueError, match="needs a tag"):
    Evaluator(tiny_clip_workdir, ["task.eval_ks=(1,)"], resolve_task=get_task_class)
  with pytest.raises(ConfigError, match="task.eval_kz"):
    Evaluator(tiny_clip_workdir, ["task.eval_kz=(1,)"], tag="x", resolve_task=get_task_class)
