"""Non-finite values never become scores.

A diverged model (NaN or inf parameters, or parameters so large that embeddings overflow) must stop
the evaluator with one line, never print a metric: every evaluation path (each task's `evaluate`,
`mmcl features`, `mmcl export`) passes its embeddings through `require_scorable` before ranking,
and the evaluator names the checkpoint step in front of the message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


class NonFiniteError(ValueError):
  """Embeddings, scores or parameters hold NaN/inf (the message names what, and how many rows)."""


def nonfinite_rows(x: Any) -> int:
  """Number of rows of `x` [N, ...] with any NaN or inf entry."""
  x = np.asarray(x)
  if x.ndim == 0:
    return int(not np.isfinite(x))
  return int((~np.isfinite(x.reshape(x.shape[0], -1))).any(axis=1).sum())


def require_finite(x: Any, what: str) -> None:
  """Raises NonFiniteError naming `what` when any row of `x` [N, ...] is not finite."""
  bad = nonfinite_rows(x)
  if bad:
    n = np.shape(x)[0] if np.ndim(x) else 1
    raise NonFiniteError(f"{what}: {bad} of {n} rows are non-finite (NaN or inf)")


def require_scorable(embeddings: Mapping[str, Any]) -> None:
  """Checks that inner products among `embeddings` ({what: [N, D]}) are finite float32 scores.

  Every array must be finite, and the largest row norms of any two must multiply to less than the
  float32 maximum (Cauchy–Schwarz: then no inner product between them overflows).
  """
  norms = {}
  for what, x in embeddings.items():
    require_finite(x, what)
    x = np.asarray(x, np.float64)
    norms[what] = float(np.sqrt((x * x).sum(axis=-1)).max()) if x.size else 0.0
  names = list(norms)
  for i, a in enumerate(names):
    for b in names[i:]:
      if norms[a] * norms[b] >= FLOAT32_MAX:
        raise NonFiniteError(f"scores of {a} against {b} overflow float32 (row norms up to "
                             f"{norms[a]:.3g} and {norms[b]:.3g})")


def require_finite_params(params: Any, what: str = "parameters") -> None:
  """Raises NonFiniteError naming how many parameter arrays (and the first one) are non-finite."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  bad = [jax.tree_util.keystr(p) for p, x in leaves  # reduced where the array lives
         if jnp.issubdtype(x.dtype, jnp.inexact) and not bool(jnp.isfinite(x).all())]
  if bad:
    raise NonFiniteError(f"{what}: {len(bad)} of {len(leaves)} arrays are non-finite (NaN or inf), "
                         f"e.g. {bad[0]}")
