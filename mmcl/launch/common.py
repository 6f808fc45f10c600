"""What every launcher needs: the resolved config of a run and the environment its processes get."""

from __future__ import annotations

import json
import os
import pathlib
import shlex
from collections.abc import Mapping, Sequence

from mmcl.config import Config, ConfigError, load_config_file

# Variables of the launching shell that decide where the code is and how JAX runs; a launcher writes
# the ones that are set into the job script, so resubmitting the script alone reproduces the run.
CAPTURED_ENV_PREFIXES = ("JAX_", "XLA_", "MMCL_")
CAPTURED_ENV_NAMES = ("PYTHONPATH",)


def load_config_json(path: str | os.PathLike) -> Config:
  """A resolved config written as JSON (a workdir's config.json, a launch script's copy)."""
  from mmcl.tasks import config_from_dict
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} not found")
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e})") from e
  return config_from_dict(data)


def resolve_config(spec: str, overrides: Sequence[str]) -> Config:
  """`--config spec` with every `--set` applied (errors name the key)."""
  config = load_config_json(spec) if spec.endswith(".json") else load_config_file(spec)
  for o in overrides:
    config.override(o)
  return config


def captured_env(environ: Mapping[str, str], extra: Sequence[str] = ()) -> dict[str, str]:
  """The launching shell's JAX_*, XLA_*, MMCL_* and PYTHONPATH, plus `extra` KEY=VALUE entries
  (which win)."""
  env = {k: v for k, v in sorted(environ.items())
         if k in CAPTURED_ENV_NAMES or k.startswith(CAPTURED_ENV_PREFIXES)}
  for item in extra:
    key, sep, value = item.partition("=")
    if not sep or not key.isidentifier():
      raise ConfigError(f"--env {item!r} is not of the form NAME=VALUE")
    env[key] = value
  return env


def quote(args: Sequence[str | os.PathLike]) -> str:
  return " ".join(shlex.quote(str(a)) for a in args)
