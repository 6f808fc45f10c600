"""Locked, partially unlocked and tuned towers: which parameters train (LiT, Zhai et al. 2022).

A tower's parameters sit under one top-level key of the task's parameter tree (e.g. "image"); the
trainer asks `Task.frozen_params_filter(path)` for every '/'-joined parameter path and gives the
frozen ones no update and no optimizer state (`mmcl.train.optim`, optax.multi_transform). This
module builds that predicate from one `TowerLock` per tower:

  mode "tuned"   every parameter of the tower trains;
  mode "locked"  none does (LiT's locked image tower);
  mode "top"     the top `unlocked_blocks` encoder blocks train, and so does everything above the
                 blocks (final LayerNorm "ln_final", projection "head"); the embeddings / patch
                 stem and the lower blocks stay frozen. `unlocked_blocks=0` trains only the parts
                 above the blocks (a new head on a frozen encoder).

Blocks are recognised by the `block_{i}` path component that every mmcl tower uses (ViT,
TextTransformer, BertTower). Usage in a task:

  # in __init__:
  self._frozen = frozen_filter(TowerLock("image", "locked"), TowerLock("text", "top", 12, 2))

  def frozen_params_filter(self, path):
    return self._frozen(path)

and, inside the loss, `stop_frozen_gradients(params, self._frozen)` so that no gradient is even
computed for frozen parameters (XLA then drops their weight-gradient matmuls).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax

LOCK_MODES = ("tuned", "locked", "top")
# Path components of the parameters above the encoder blocks, in any mmcl tower.
TOP_COMPONENTS = ("ln_final", "head")
_BLOCK = re.compile(r"block_(\d+)")


@dataclasses.dataclass(frozen=True)
class TowerLock:
  """Which parameters of one tower train.

  Attributes:
    prefix: the tower's top-level path in the parameter tree (e.g. "image"); "" = the whole tree.
    mode: "tuned", "locked" or "top" (see the module docstring).
    depth: number of encoder blocks of the tower (needed by mode "top").
    unlocked_blocks: with mode "top", how many of the highest blocks train (0 ≤ N ≤ depth).
  """
  prefix: str
  mode: str = "tuned"
  depth: int = 0
  unlocked_blocks: int = 0

  def __post_init__(self):
    if self.mode not in LOCK_MODES:
      raise ValueError(f"TowerLock({self.prefix!r}): mode must be one of {LOCK_MODES}, found "
                       f"{self.mode!r}")
    if self.mode == "top" and not 0 <= self.unlocked_blocks <= self.depth:
      raise ValueError(f"TowerLock({self.prefix!r}): unlocked_blocks must be in [0, depth="
                       f"{self.depth}], found {self.unlocked_blocks}")

  def covers(self, path: str) -> bool:
    """Whether `path` is one of this tower's parameters."""
    return not self.prefix or path == self.prefix or path.startswith(self.prefix + "/")

  def frozen(self, path: str) -> bool:
    """Whether the parameter at `path` (one this lock covers) is frozen."""
    if self.mode == "tuned":
      return False
    if self.mode == "locked":
      return True
    parts = path[len(self.prefix):].strip("/").split("/")
    for part in parts:
      match = _BLOCK.fullmatch(part)
      if match:
        index = int(match.group(1))
        if index >= self.depth:
          raise ValueError(f"TowerLock({self.prefix!r}): parameter '{path}' is in block {index}, "
                           f"but the lock was given depth={self.depth}")
        return index < self.depth - self.unlocked_blocks
    return not any(part in TOP_COMPONENTS for part in parts)


def frozen_filter(*locks: TowerLock) -> Callable[[str], bool]:
  """The predicate `path -> frozen?` for `Task.frozen_params_filter`.

  The first lock whose prefix covers a path decides; paths no lock covers (e.g. the logit scale)
  train. Prefixes must not overlap.
  """
  prefixes = [lock.prefix for lock in locks]
  for a in prefixes:
    for b in prefixes:
      if a is not b and (not a or b == a or b.startswith(a + "/")):
        raise ValueError(f"frozen_filter: tower prefixes overlap: {a!r} and {b!r}")

  def frozen(path: str) -> bool:
    for lock in locks:
      if lock.covers(path):
        return lock.frozen(path)
    return False
  return frozen


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = ["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p)
           for p, _ in flat]
  return paths, [leaf for _, leaf in flat], treedef


def stop_frozen_gradients(params: Any, frozen: Callable[[str], bool]) -> Any:
  """Returns `params` with `jax.lax.stop_gradient` on every frozen leaf (same values)."""
  paths, leaves, treedef = _paths_and_leaves(params)
  return jax.tree_util.tree_unflatten(
      treedef, [jax.lax.stop_gradient(x) if frozen(p) else x for p, x in zip(paths, leaves)])


def count_frozen(params: Any, frozen: Callable[[str], bool]) -> tuple[int, int]:
  """(frozen, trained) parameter counts (elements, not arrays), e.g. for a start-up log line."""
  paths, leaves, _ = _paths_and_leaves(params)
  n_frozen = sum(int(x.size) for p, x in zip(paths, leaves) if frozen(p))
  return n_frozen, sum(int(x.size) for x in leaves) - n_frozen
