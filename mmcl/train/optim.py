"""Optimizer and learning-rate schedule from config (optax)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from mmcl.config import Config
from mmcl.parallel.sharding import tree_paths


def make_schedule(optim: Config, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `optim.lr`, then cosine / linear decay to lr·end_lr_ratio, or constant."""
  warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = optim.lr * optim.end_lr_ratio
  if optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_ratio)
  elif optim.schedule == "linear":
    after = optax.linear_schedule(optim.lr, end, decay_steps)
  else:
    after = optax.constant_schedule(optim.lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def _decay_mask(params: Any) -> Any:
  """Weight decay applies to matrices/kernels only, not to biases, norm scales or scalars."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: Config, total_steps: int,
                   frozen: Callable[[str], bool] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule). Parameters for which `frozen(path)` is true get no update and no state."""
  schedule = make_schedule(optim, total_steps)
  if optim.name == "adamw":
    core = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay, mask=_decay_mask)
  elif optim.name == "adam":
    core = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
  elif optim.name == "lamb":
    core = optax.lamb(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=_decay_mask)
  else:
    core = optax.sgd(schedule, momentum=optim.b1 or None)
  parts = [core]
  if optim.grad_clip_norm is not None:
    parts.insert(0, optax.clip_by_global_norm(optim.grad_clip_norm))
  tx = optax.chain(*parts)
  if frozen is not None:
    def labels(params):
      leaves, treedef = jax.tree.flatten(params)
      return jax.tree.unflatten(treedef, ["frozen" if frozen(p) else "trained"
                                          for p in tree_paths(params)])
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx, schedule
