"""Parameter sharding rules: a small ordered registry of regex → PartitionSpec (big_vision style).

A rule list is `[(regex, spec), ...]`; the first regex that matches a parameter's '/'-joined path
gives its PartitionSpec. Specs are tuples of axis names / None, or one of the strategies:
  "replicate": P() — every device holds the whole parameter (plain data parallelism);
  "fsdp": shard the largest dimension divisible by the `data` axis size over `data`
    (ZeRO-3 style; XLA inserts the all-gathers), small parameters (< `min_fsdp_size` elements)
    stay replicated.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmcl.parallel.mesh import DATA_AXIS

Rule = tuple[str, Any]

# Default strategies selectable by config `mesh.param_sharding`.
STRATEGIES: dict[str, list[Rule]] = {
    "replicate": [(".*", "replicate")],
    "fsdp": [(".*", "fsdp")],
}


def tree_paths(tree: Any) -> list[str]:
  """'/'-joined key paths of every leaf, in `jax.tree.leaves` order."""
  paths = []
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = []
    for p in path:
      parts.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
    paths.append("/".join(parts))
  return paths


def _fsdp_spec(shape: Sequence[int], data_size: int, min_size: int) -> P:
  if int(np.prod(shape, dtype=np.int64)) < min_size or data_size == 1:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % data_size == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def spec_for(path: str, shape: Sequence[int], rules: Sequence[Rule], mesh: Mesh,
             min_fsdp_size: int = 2**14) -> P:
  """PartitionSpec of the parameter at `path` with `shape` under `rules` (first match wins)."""
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      if spec == "replicate":
        return P()
      if spec == "fsdp":
        return _fsdp_spec(shape, mesh.shape[DATA_AXIS], min_fsdp_size)
      spec = P(*spec)
      for dim, axis in enumerate(spec):
        if axis is not None and shape[dim] % mesh.shape[axis]:
          raise ValueError(f"sharding rule {pattern!r} puts dim {dim} of '{path}' {tuple(shape)} on "
                           f"mesh axis {axis!r} of size {mesh.shape[axis]}, which does not divide it")
      return spec
  raise ValueError(f"no sharding rule matches parameter '{path}'; end the rule list with ('.*', ...)")


def tree_shardings(abstract_tree: Any, rules: Sequence[Rule], mesh: Mesh) -> Any:
  """NamedShardings for every leaf of `abstract_tree` (arrays or ShapeDtypeStructs)."""
  leaves, treedef = jax.tree.flatten(abstract_tree)
  paths = tree_paths(abstract_tree)
  out = [NamedSharding(mesh, spec_for(p, np.shape(x), rules, mesh)) for p, x in zip(paths, leaves)]
  return jax.tree.unflatten(treedef, out)
