"""Tasks (methods) by name, and configs assembled from the trainer's keys plus a task's keys.

`task.name` is a registered name (`TASKS`) or "package.module:Class", a `Task` subclass in any
importable module: a method in a user's own package trains, evaluates and exports without editing
mmcl (the evaluator and exporter import it the same way, so it must be importable there too).
"""

from __future__ import annotations

import importlib
from typing import Any

from mmcl.config import Config, ConfigError
from mmcl.train.config import task_config
from mmcl.train.task import Task

# name -> "module:Class" (one package per method, mmcl/tasks/<name>/); imported lazily so that one
# task's dependencies never load for another.
TASKS: dict[str, str] = {
    "clip": "mmcl.tasks.clip.task:ClipTask",
    "sasrec": "mmcl.tasks.sasrec.task:SASRecTask",
    "demure": "mmcl.tasks.demure.task:DemureTask",
    "mmsrec": "mmcl.tasks.mmsrec.task:MMSRecTask",
    "artist_retrieval": "mmcl.tasks.artist_retrieval.task:ArtistRetrievalTask",
    "loev": "mmcl.tasks.loev.task:LOEVTask",
    "gcl": "mmcl.tasks.gcl.task:GCLTask",
}


def get_task_class(name: str) -> type[Task]:
  """The `Task` subclass a `task.name` names (a registered name or "package.module:Class")."""
  if name not in TASKS and ":" not in name:
    raise ConfigError(f"config key 'task.name': unknown task {name!r}; known: {sorted(TASKS)}, "
                      "or 'package.module:Class' for a Task subclass of your own")
  module_name, _, cls_name = TASKS.get(name, name).partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ConfigError(f"config key 'task.name' = {name!r}: cannot import module {module_name!r} "
                      f"({e})") from e
  cls = getattr(module, cls_name, None)
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise ConfigError(f"config key 'task.name' = {name!r}: {module_name}.{cls_name} is not a "
                      f"mmcl.train.task.Task subclass")
  return cls


def make_config(name: str) -> Config:
  """The trainer's base config plus the keys task `name` declares, all at their defaults."""
  return task_config(get_task_class(name), {"task": {"name": name}})


def config_from_dict(d: dict[str, Any]) -> Config:
  """Rebuilds a config saved with `Config.to_dict()` (e.g. workdir/config.json)."""
  try:
    name = d["task"]["name"]
  except KeyError as e:
    raise ConfigError("saved config has no task.name") from e
  return task_config(get_task_class(name), d)
