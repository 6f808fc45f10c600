"""Checks `mmcl train` makes before it writes anything into a workdir.

A failed command must leave the workdir as it was: the config is checked against the mesh, and, when
the workdir already holds a run, against its saved `config.json` and the newest checkpoint's array
shapes, before `config.json` is touched. Keys that change the train state's structure (parameter or
optimizer-state shapes and dtypes) cannot change on resume; any other key may (`train.total_steps`,
`optim.lr`, ...), and such changes are recorded in `config_changes.jsonl`.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from mmcl.config import Config, ConfigError

CHANGES_FILE = "config_changes.jsonl"


def check_batch(config: Config, mesh: jax.sharding.Mesh) -> None:
  """The global batch must split evenly over processes, the data axis and micro-batches."""
  b = config.data.global_batch_size
  data = mesh.shape["data"]
  accum = config.train.grad_accum_steps
  procs = jax.process_count()
  for what, n in ((f"the mesh's data axis ({data} devices)", data),
                  (f"the process count ({procs})", procs),
                  (f"train.grad_accum_steps ({accum})", accum)):
    if b % n:
      raise ConfigError(f"config key 'data.global_batch_size' = {b} is not divisible by {what}")


def flat_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flat_dict(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old, new)} of every key whose value differs between two config dicts."""
  a, b = flat_dict(old), flat_dict(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _leaf_name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return ".".join(parts)


def array_specs(abstract_state: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{leaf name: (shape, dtype)} of a state pytree, named as orbax names checkpointed arrays."""
  return {_leaf_name(p): (tuple(x.shape), str(x.dtype))
          for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}


def checkpoint_specs(step_dir: pathlib.Path) -> dict[str, tuple[tuple[int, ...], str]] | None:
  """{array name: (shape, dtype)} of a checkpoint step's train state, None if unreadable."""
  try:
    meta = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata
    tree = getattr(meta, "tree", meta)
    return {_leaf_name(p): (tuple(m.shape), str(m.dtype))
            for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]}
  except Exception:  # noqa: BLE001 — a damaged checkpoint is reported by the restore instead
    return None


def spec_differences(saved: dict, now: dict, limit: int = 3) -> list[str]:
  """Human-readable differences between two {name: (shape, dtype)} maps (at most `limit`)."""
  out = []
  # Parameters first: they name the layer; optimizer moments repeat them.
  for name in sorted(set(saved) | set(now), key=lambda n: (not n.startswith("params."), n)):
    a, b = saved.get(name), now.get(name)
    if a == b:
      continue
    fmt = lambda s: "absent" if s is None else f"{list(s[0])} {s[1]}"
    out.append(f"{name}: {fmt(a)} in the checkpoint, {fmt(b)} now")
  extra = len(out) - limit
  return out[:limit] + ([f"{extra} more"] if extra > 0 else [])


def check_resume(workdir: pathlib.Path, saved_config: dict[str, Any], config: Config,
                 step_dir: pathlib.Path, abstract_state: Any,
                 config_for: Callable[[dict[str, Any]], Config],
                 abstract_for: Callable[[Config], Any]) -> dict[str, tuple[Any, Any]]:
  """Checks that `config` can resume the run whose newest checkpoint is `step_dir`.

  Args:
    saved_config: the workdir's config.json as a dict.
    abstract_state: the train state `config` builds (ShapeDtypeStructs).
    config_for: config dict -> Config of the same task.
    abstract_for: Config -> abstract state; with `config_for`, it names the keys that change the
      structure (the saved config with one changed key at a time).

  Returns:
    The changed keys {key: (old, new)} (all allowed).
  Raises:
    ConfigError: naming each key that changes the state's structure, with its old and new value.
  """
  changes = config_changes(saved_config, config.to_dict())
  saved = checkpoint_specs(step_dir)
  now = array_specs(abstract_state)
  if saved is None or saved == now:
    return changes
  structural = []
  for key, (old, new) in changes.items():
    try:
      trial = config_for(saved_config)
      trial.set(key, tuple(new) if isinstance(new, list) else new)
      if array_specs(abstract_for(trial)) != saved:
        structural.append(f"{key}: {old!r} → {new!r}")
    except Exception:  # noqa: BLE001 — a key that cannot even be tried alone is named too
      structural.append(f"{key}: {old!r} → {new!r}")
  diffs = "; ".join(spec_differences(saved, now))
  keys = ", ".join(structural or [f"{k}: {o!r} → {n!r}" for k, (o, n) in changes.items()])
  raise ConfigError(
      f"{workdir}: the config changes the shapes of the saved train state ({diffs}), so the run "
      f"cannot resume from {step_dir.name}; changed key(s): {keys or 'none'}. Use a new workdir "
      f"(or train.init_from for a run of the same shapes)")


def record_changes(workdir: pathlib.Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
  """Appends the keys a resume changed to workdir/config_changes.jsonl."""
  if not changes:
    return
  row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_at_step": step,
         "changes": {k: {"old": o, "new": n} for k, (o, n) in changes.items()}}
  with open(workdir / CHANGES_FILE, "a", encoding="utf-8") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")
