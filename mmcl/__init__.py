"""mmcl: multimodal contrastive learning in JAX/Flax.

  import mmcl
  mmcl.losses.infonce(a, b, logit_scale=...)     # contrastive losses (dense, tiled, fused, sharded)
  mmcl.eval.topk.exact_topk(queries, corpus, k)  # retrieval, metrics, the evaluator
  mmcl.config.load_config_file("experiments/clip_shapes.py:tiny")

Subpackages load on first use (PEP 562), so `import mmcl` alone does not import JAX, and a module
that needs none of them (reading precomputed features) stays light.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = ("config", "eval", "export", "losses", "models", "parallel", "pretrained", "sweep",
               "tasks", "train", "workdir")
__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
  if name in _SUBMODULES:
    return importlib.import_module(f"mmcl.{name}")
  raise AttributeError(f"module 'mmcl' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(__all__)
