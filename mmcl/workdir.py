"""A finished or running `mmcl train` workdir, opened read-only by another process.

The evaluator (`mmcl eval`) and the exporter (`mmcl export`) both read a workdir the same way: the
saved `config.json`, the task it names, a mesh over this process's own devices (whatever the trainer
used), and the finalized orbax checkpoints. This module is that one way. The task class comes
from the caller (`resolve_task`, e.g. the CLI's `mmcl.tasks.get_task_class`): nothing below the
command line knows the table of methods.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

from mmcl.config import ConfigError
from mmcl.train import checkpoint as ckpt_lib
from mmcl.train import loop as loop_lib
from mmcl.train.config import task_config
from mmcl.train.task import Task

TaskResolver = Callable[[str], type[Task]]


class TrainedWorkdir:
  """config, mesh, task and read-only checkpoints of a workdir.

  Attributes:
    workdir: the path. config: the saved config, re-targeted to one process on local devices.
    mesh, task: built from it. ckpt: a read-only `Checkpointer`.
  """

  def __init__(self, workdir: str | pathlib.Path, overrides: Sequence[str] = (), *,
               resolve_task: TaskResolver):
    """Opens `workdir`; `overrides` ("key=value", as `mmcl train --set`) change the saved config
    before the task is built (evaluation settings: a restore still needs the trained shapes);
    `resolve_task(task.name)` is the saved config's `Task` subclass."""
    self.workdir = pathlib.Path(workdir)
    cfg_path = self.workdir / "config.json"
    if not cfg_path.is_file():
      raise FileNotFoundError(f"{cfg_path} not found: is {self.workdir} a `mmcl train` workdir?")
    saved = json.loads(cfg_path.read_text())
    name = saved.get("task", {}).get("name")
    if not name:
      raise ConfigError(f"{cfg_path}: the saved config has no task.name")
    task_class = resolve_task(name)
    config = task_config(task_class, saved)
    # One process on its own devices, whatever the trainer used.
    config.distributed.coordinator_address = None
    config.distributed.num_processes = None
    config.distributed.process_id = None
    config.mesh.data, config.mesh.model = -1, 1
    for o in overrides:
      config.override(o)
    self.config = config
    self.task_class = task_class
    self.mesh, self.task = loop_lib.setup(config, task_class)
    _, abstract, shardings, _, _ = loop_lib.build_state(config, self.task, self.mesh)
    self._abstract = ckpt_lib.abstract_with_shardings(abstract, shardings)
    self.ckpt = ckpt_lib.Checkpointer(self.workdir, read_only=True)

  def finished_steps(self) -> list[int]:
    """Steps of complete checkpoints (never one still being written)."""
    return self.ckpt.all_steps()

  def resolve_step(self, step: int | None) -> int:
    """`step` if it is a finished checkpoint, the newest one when None; else a clear error."""
    steps = self.finished_steps()
    where = ckpt_lib.checkpoint_dir(self.workdir)
    if not steps:
      raise FileNotFoundError(f"no finished checkpoint in {where}")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"checkpoint step {step} not in {where} (finished steps: {steps})")
    return step

  def restore_params(self, step: int) -> Any:
    """The parameters of checkpoint `step`, sharded on this process's mesh.

    Raises:
      CorruptCheckpointError: the step fails verification or cannot be restored (one line).
    """
    return self.ckpt.restore(step, self._abstract).params

  def restore_usable_params(self, step: int | None = None) -> tuple[int, Any]:
    """(step, parameters): of `step` when given (an error if it is corrupt), else of the newest
    step that verifies and restores, each newer corrupt one logged as a warning and passed over."""
    if step is not None:
      step = self.resolve_step(step)
      return step, self.restore_params(step)
    self.resolve_step(None)  # a clear error when there is no checkpoint at all
    step, state, _ = self.ckpt.restore_newest(self._abstract)
    return step, state.params

  def close(self) -> None:
    self.ckpt.close()
