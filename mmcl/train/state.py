"""The train state: everything a checkpoint must hold to resume exactly (the data iterator aside)."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """step: [] int32; params / opt_state: pytrees; rng: [2] uint32 base key (step keys fold in step)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
