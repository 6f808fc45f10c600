"""Orbax checkpoints of the train state and the grain iterator.

Layout: `workdir/checkpoints/<step>/{state,data_iter}` written by an asynchronous
`CheckpointManager`. Orbax writes each step into a temporary directory and renames it only when every
process has finished, so a crash or SIGKILL mid-save never leaves a step that readers list; committed
steps are never touched by a later failure. Retention: the newest `keep` steps plus the best `keep_best`
by a metric passed at save time.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


class Checkpointer:
  """Saves/restores {state, data_iter}; read-only mode is what the evaluator uses."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, keep_best: int = 0,
               best_metric: str | None = None, best_mode: str = "min",
               async_save: bool = True, read_only: bool = False):
    policies: list[pp.PreservationPolicy] = [pp.LatestN(n=keep)]
    if keep_best and best_metric:
      policies.append(pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                               n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save and not read_only,
        preservation_policy=pp.AnyPreservationPolicy(policies),
        read_only=read_only, create=not read_only)
    directory = checkpoint_dir(workdir)
    if read_only and not directory.is_dir():
      raise FileNotFoundError(f"no checkpoints in {directory}: has `mmcl train --workdir "
                              f"{pathlib.Path(workdir)}` saved one yet?")
    self.manager = ocp.CheckpointManager(directory, options=options,
                                         item_names=("state", "data_iter"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Finalized steps only (never one still being written)."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any | None, metrics: dict | None = None,
           force: bool = True) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
    """Restores the state into the shardings of `abstract_state` (and the iterator in place)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
