"""Tasks (methods) by name, and configs assembled from the trainer's keys plus a task's keys.

A new method is a module here with a `Task` subclass plus a line in `TASKS`; nothing else changes.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmcl.config import Config, ConfigError
from mmcl.train.config import base_config
from mmcl.train.task import Task

# name -> "module:Class"; imported lazily so that one task's dependencies never load for another.
TASKS: dict[str, str] = {
    "clip": "mmcl.tasks.clip:ClipTask",
    "sasrec": "mmcl.tasks.sasrec:SASRecTask",
    "demure": "mmcl.tasks.demure:DemureTask",
    "mmsrec": "mmcl.tasks.mmsrec:MMSRecTask",
    "artist_retrieval": "mmcl.tasks.artist_retrieval:ArtistRetrievalTask",
    "loev": "mmcl.tasks.loev:LOEVTask",
    "gcl": "mmcl.tasks.gcl:GCLTask",
}


def get_task_class(name: str) -> type[Task]:
  if name not in TASKS:
    raise ConfigError(f"config key 'task.name': unknown task {name!r}; known: {sorted(TASKS)}")
  module, cls = TASKS[name].split(":")
  return getattr(importlib.import_module(module), cls)


def make_config(name: str) -> Config:
  """The trainer's base config plus the keys task `name` declares, all at their defaults."""
  c = base_config()
  c.task.name = name
  get_task_class(name).declare_config(c)
  return c


def config_from_dict(d: dict[str, Any]) -> Config:
  """Rebuilds a config saved with `Config.to_dict()` (e.g. workdir/config.json)."""
  try:
    name = d["task"]["name"]
  except KeyError as e:
    raise ConfigError("saved config has no task.name") from e
  c = make_config(name)
  c.update_from_dict(d)
  return c
