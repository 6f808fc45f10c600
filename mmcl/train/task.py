"""The contract between the generic trainer/evaluator and a method ("task").

Everything method-specific lives in a `Task` subclass under `mmcl/tasks/`: which towers, how a batch
becomes embeddings and a loss, where the data comes from, and how a checkpoint is evaluated. The
trainer (`mmcl.train.loop`) and the evaluator (`mmcl.eval.evaluator`) only call these methods.
"""

from __future__ import annotations

import abc
from typing import Any, Iterator

import jax
from jax.sharding import Mesh

from mmcl.config import Config

Params = Any
Batch = dict[str, jax.Array]


class Task(abc.ABC):
  """A method: data, parameters, loss and evaluation. Subclasses register with `mmcl.tasks`."""

  # The evaluator's headline metric (higher is better): tracked as "best so far" in watch mode.
  primary_metric: str | None = None

  def __init__(self, config: Config, mesh: Mesh):
    self.config = config
    self.mesh = mesh

  @classmethod
  @abc.abstractmethod
  def declare_config(cls, config: Config) -> None:
    """Declares the task's keys (with docs) in `config.task`, `config.model`, `config.data`."""

  # --- training ----------------------------------------------------------------------------------
  @abc.abstractmethod
  def train_iterator(self, process_index: int, process_count: int) -> Any:
    """A checkpointable iterator (`get_state`/`set_state`) of this host's rows of each global batch.

    Yields dicts of numpy arrays [B / process_count, ...].
    """

  def val_iterator(self, process_index: int, process_count: int) -> Iterator[dict] | None:
    """Held-out host-local batches (same layout as training) for the checkpoint metric, or None."""
    return None

  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> Params:
    """Initial parameters (traceable: called under jit with output shardings)."""

  def sharding_rules(self) -> list[tuple[str, Any]] | None:
    """Task-specific regex → PartitionSpec rules tried before the mesh's default strategy."""
    return None

  @abc.abstractmethod
  def loss(self, params: Params, batch: Batch, rng: jax.Array, *,
           train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and scalar metrics for one (micro-)batch of global arrays [B, ...]."""

  def frozen_params_filter(self, path: str) -> bool:
    """True for parameters that receive no updates and no optimizer state (locked towers)."""
    return False

  def flops_per_example(self) -> float | None:
    """Forward FLOPs per training example (for MFU); None when unknown."""
    return None

  # --- evaluation (runs in the separate evaluator process) ---------------------------------------
  @abc.abstractmethod
  def evaluate(self, params: Params, out_dir: str) -> dict[str, float]:
    """Evaluates `params` on the task's held-out data; writes artefacts into `out_dir`.

    Returns flat metrics {name: value}.
    """
