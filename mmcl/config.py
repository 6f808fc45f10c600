"""Typed, self-documenting configs.

A config is a tree of `Config` sections. Every key is *declared* with a default, a type and a one-line
doc string at the place that defines it (the trainer's keys in `mmcl.train.config`, a task's keys in its
task module), and experiment files under `experiments/` only *assign* declared keys:

  def get_config(arg=None):
    c = mmcl.train.config.base_config()       # trainer keys, each documented there
    c.task.name = "clip"                      # assignment of a declared key: type-checked
    return c

Assigning an undeclared key, or a value of the wrong type, raises `ConfigError` naming the full dotted
key, so a typo in an experiment file or in `--set optim.lr=...` never passes silently.

Values are plain Python scalars, strings, None or tuples; `to_dict()` gives a JSON-able dict (written
to `workdir/config.json`) and `from_dict()` reads it back (the evaluator does this).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import pathlib
import sys
from typing import Any, Iterator


class ConfigError(ValueError):
  """A config key is unknown, or a value has the wrong type."""


_MISSING = object()


@dataclasses.dataclass
class _Key:
  value: Any
  type: tuple[type, ...]
  doc: str
  choices: tuple[Any, ...] | None = None
  bounds: tuple[float | None, float | None] | None = None


def _check_value(path: str, key: _Key, value: Any) -> Any:
  """Returns `value` converted to the key's type, or raises ConfigError naming `path`."""
  if value is None and type(None) in key.type:
    return None
  if isinstance(value, list):
    value = tuple(value)
  # ints are acceptable floats; bools are not ints here (True for a batch size is a mistake).
  if float in key.type and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  ok = isinstance(value, key.type) and not (isinstance(value, bool) and bool not in key.type)
  if not ok:
    names = "/".join(t.__name__ for t in key.type)
    raise ConfigError(f"config key '{path}' expects {names}, got {type(value).__name__} {value!r}")
  if key.choices is not None and value not in key.choices:
    raise ConfigError(f"config key '{path}' must be one of {list(key.choices)}, got {value!r}")
  if key.bounds is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
    lo, hi = key.bounds
    if (lo is not None and not value >= lo) or (hi is not None and not value <= hi):
      want = (f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
      raise ConfigError(f"config key '{path}' must be {want}, got {value!r}")
  return value


class Config:
  """A section of declared, typed, documented keys (and nested sections)."""

  def __init__(self, doc: str = "", *, _path: str = ""):
    object.__setattr__(self, "_doc", doc)
    object.__setattr__(self, "_path", _path)
    object.__setattr__(self, "_keys", {})
    object.__setattr__(self, "_sections", {})

  # --- declaration -------------------------------------------------------------------------------
  def define(self, name: str, default: Any, doc: str, *, type: Any = None,
             choices: tuple[Any, ...] | None = None,
             bounds: tuple[float | None, float | None] | None = None) -> None:
    """Declares key `name` with its default, doc string and type.

    Args:
      name: key name (no dots).
      default: default value; its type is the key's type unless `type` is given.
      doc: one line saying what the key does (shown by `mmcl train --help-config`).
      type: a type or tuple of types; pass e.g. `(int, type(None))` for an optional int.
      choices: allowed values, if the key is an enumeration.
      bounds: (lower, upper) inclusive limits of a numeric key, None for an open side; a value
        outside them (or NaN) is a ConfigError naming the key.
    """
    if not doc:
      raise ConfigError(f"config key '{self._child(name)}' is declared without a doc string")
    if name in self._keys or name in self._sections:
      raise ConfigError(f"config key '{self._child(name)}' is declared twice")
    if type is None:
      if default is None:
        raise ConfigError(f"config key '{self._child(name)}' has default None: give its type")
      type = tuple if isinstance(default, list) else default.__class__
    types = type if isinstance(type, tuple) else (type,)
    key = _Key(value=None, type=types, doc=doc, choices=choices, bounds=bounds)
    key.value = _check_value(self._child(name), key, default)
    self._keys[name] = key

  def section(self, name: str, doc: str) -> "Config":
    """Declares (or returns the existing) nested section `name`."""
    if name in self._keys:
      raise ConfigError(f"config key '{self._child(name)}' is a value, not a section")
    if name not in self._sections:
      self._sections[name] = Config(doc, _path=self._child(name))
    return self._sections[name]

  # --- access ------------------------------------------------------------------------------------
  def _child(self, name: str) -> str:
    return f"{self._path}.{name}" if self._path else name

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    keys, sections = self.__dict__["_keys"], self.__dict__["_sections"]
    if name in keys:
      return keys[name].value
    if name in sections:
      return sections[name]
    raise ConfigError(f"unknown config key '{self._child(name)}'; known here: "
                      f"{sorted(list(keys) + list(sections))}")

  def __setattr__(self, name: str, value: Any) -> None:
    if name in self._sections:
      raise ConfigError(f"config key '{self._child(name)}' is a section; assign its keys instead")
    if name not in self._keys:
      raise ConfigError(f"unknown config key '{self._child(name)}'; known here: "
                        f"{sorted(list(self._keys) + list(self._sections))}")
    key = self._keys[name]
    key.value = _check_value(self._child(name), key, value)

  def __contains__(self, name: str) -> bool:
    return name in self._keys or name in self._sections

  def get(self, dotted: str) -> Any:
    node: Any = self
    for part in dotted.split("."):
      node = getattr(node, part)
    return node

  def set(self, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = self
    for part in parents:
      node = getattr(node, part)
      if not isinstance(node, Config):
        raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
    setattr(node, last, value)

  def override(self, assignment: str) -> None:
    """Applies a command-line `key.sub=value`; the value is parsed as a Python literal if it can be.

    Strings need no quotes (`--set task.name=clip`); `none`/`None` gives None for optional keys.
    """
    if "=" not in assignment:
      raise ConfigError(f"override {assignment!r} is not of the form key=value")
    dotted, text = assignment.split("=", 1)
    dotted = dotted.strip()
    key = self._key(dotted)
    value: Any
    if text.strip() in ("none", "None", "null") and type(None) in key.type:
      value = None
    elif bool in key.type and text.strip().lower() in ("true", "false"):
      value = text.strip().lower() == "true"
    else:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text
      # Unquoted strings: `--set task.name=clip`, or `--set data.dir=123` for a str key.
      if str in key.type and not isinstance(value, key.type):
        value = text
    self.set(dotted, value)

  def _key(self, dotted: str) -> _Key:
    *parents, last = dotted.split(".")
    node = self
    for part in parents:
      node = getattr(node, part)
      if not isinstance(node, Config):
        raise ConfigError(f"config key '{dotted}': '{part}' is a value, not a section")
    if last not in node._keys:
      raise ConfigError(f"unknown config key '{dotted}'; known in '{node._path or '<root>'}': "
                        f"{sorted(list(node._keys) + list(node._sections))}")
    return node._keys[last]

  # --- serialisation -----------------------------------------------------------------------------
  def items(self) -> Iterator[tuple[str, Any]]:
    """Yields (dotted key, value) for every key, depth first."""
    for name, key in self._keys.items():
      yield self._child(name), key.value
    for sec in self._sections.values():
      yield from sec.items()

  def to_dict(self) -> dict[str, Any]:
    out: dict[str, Any] = {n: k.value for n, k in self._keys.items()}
    for n, s in self._sections.items():
      out[n] = s.to_dict()
    return out

  def update_from_dict(self, d: dict[str, Any]) -> None:
    """Assigns every key in the nested dict `d` (all must be declared)."""
    for name, value in d.items():
      if isinstance(value, dict):
        getattr(self, name).update_from_dict(value)
      else:
        setattr(self, name, value)

  def describe(self) -> str:
    """Every key with its value, type and doc (what `--help-config` prints)."""
    lines = []
    for name, key in self._keys.items():
      names = "|".join(t.__name__ for t in key.type)
      limits = "" if key.bounds is None else (
          f", {'' if key.bounds[0] is None else f'>= {key.bounds[0]}'}"
          f"{' and ' if None not in key.bounds else ''}"
          f"{'' if key.bounds[1] is None else f'<= {key.bounds[1]}'}")
      lines.append(f"{self._child(name)} = {key.value!r}  ({names}{limits}) — {key.doc}")
    for sec in self._sections.values():
      lines.append(f"[{sec._path}] {sec._doc}")
      lines.append(sec.describe())
    return "\n".join(lines)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  def __repr__(self) -> str:
    return f"Config({self._path or '<root>'}: {self.to_dict()!r})"


def load_config_file(spec: str) -> Config:
  """Loads `path/to/file.py[:arg]` and returns its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"config file {path!r} not found (from --config {spec!r})")
  mod_name = f"_mmcl_config_{file.stem}"
  module_spec = importlib.util.spec_from_file_location(mod_name, file)
  assert module_spec is not None and module_spec.loader is not None
  module = importlib.util.module_from_spec(module_spec)
  sys.modules[mod_name] = module
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg)")
  cfg = module.get_config(arg or None)
  if not isinstance(cfg, Config):
    raise ConfigError(f"{path}: get_config must return mmcl.config.Config, got {type(cfg).__name__}")
  return cfg
