"""The contract between the generic trainer/evaluator and a method ("task").

Everything method-specific lives in a `Task` subclass under `mmcl/tasks/`: which towers, how a batch
becomes embeddings and a loss, where the data comes from, and how a checkpoint is evaluated. The
trainer (`mmcl.train.loop`) and the evaluator (`mmcl.eval.evaluator`) only call these methods.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from mmcl.config import Config

Params = Any
Batch = dict[str, jax.Array]


class TowerExport(NamedTuple):
  """One tower as a serving function (what `Task.export_towers` returns per tower).

  Attributes:
    fn: fn(params, x) -> [B, D] float embeddings; traceable with a symbolic batch size B (the
      exporter closes over `params`, so the weights are embedded in the artifact).
    input_spec: jax.ShapeDtypeStruct of an example input [1, ...]; the leading axis is the batch
      and is exported as the symbolic dimension "b".
    preprocessing: JSON-serialisable description of how raw inputs become `x` (normalisation,
      tokenizer settings, ...), copied into the export manifest.
    files: paths of files the preprocessing needs (e.g. tokenizer.json), copied beside the
      artifact and named in the manifest by their base name.
    l2_normalized: whether the output rows have unit L2 norm (inner product = cosine).
    example: optional [n, ...] real inputs (e.g. the first rows of the test split) on which a
      converted artifact (`mmcl export --format onnx`) is checked against `fn`; None draws random
      normal floats (or ids 0 and 1 for integer inputs).
  """
  fn: Callable[[Params, jax.Array], jax.Array]
  input_spec: jax.ShapeDtypeStruct
  preprocessing: dict[str, Any]
  files: tuple[str, ...] = ()
  l2_normalized: bool = True
  example: np.ndarray | None = None


class CorpusExport(NamedTuple):
  """Embeddings of a retrieval corpus (what `Task.export_corpus` returns per corpus).

  Attributes:
    tower: the `export_towers` tower that embeds this corpus's items.
    embeddings: [N, D] float32, row i the embedding of item ids[i].
    ids: N unique strings without newlines.
    description: what the items and the ids are.
    query_tower: the tower that embeds queries against this corpus (`mmcl serve`'s /search);
      None: `tower` itself (item-to-item search).
    queries: optional [Q, D] float32 embeddings of the task's test queries for this corpus: an
      exported index is checked on them against the evaluator's exact top-k (`--index`).
  """
  tower: str
  embeddings: np.ndarray
  ids: list[str]
  description: str
  query_tower: str | None = None
  queries: np.ndarray | None = None


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

  # Optional split of `loss` for gradient caching (config train.grad_cache): with both defined,
  # loss(params, batch, rng) == loss_from_embeddings(params, embed(params, batch, rng), batch), and
  # `embed` is row-wise (row i of each embedding depends only on row i of the batch).
  def embed(self, params: Params, batch: Batch, rng: jax.Array, *,
            train: bool) -> dict[str, jax.Array]:
    """The batch's embeddings {name: [B, D]} (no loss)."""
    raise NotImplementedError(
        f"task {type(self).__name__} does not split its loss into embed + loss_from_embeddings, "
        "so train.grad_cache is not available for it")

  def loss_from_embeddings(self, params: Params, embeddings: dict[str, jax.Array],
                           batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of the whole batch given its embeddings (and params such as the temperature)."""
    raise NotImplementedError(
        f"task {type(self).__name__} does not implement loss_from_embeddings")

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

  # --- export to serving (`mmcl export`) ---------------------------------------------------------
  def export_towers(self, params: Params) -> dict[str, TowerExport]:
    """{tower name: TowerExport} of the towers a serving stack calls (e.g. "image", "text").

    Optional: tasks without it cannot be exported. `params` are host (numpy) parameters.
    """
    raise NotImplementedError(
        f"task {type(self).__name__} does not implement Task.export_towers(params), so it cannot "
        "be exported; see mmcl/train/task.py and mmcl/tasks/clip/ for an example")

  def export_corpus(self, params: Params) -> dict[str, CorpusExport]:
    """{corpus name: CorpusExport} of the items a serving stack retrieves (`mmcl export --corpus`).

    Optional; computed with the task's own (sharded) embedding passes.
    """
    raise NotImplementedError(
        f"task {type(self).__name__} does not implement Task.export_corpus(params), so "
        "`mmcl export --corpus` is not available for it; see mmcl/tasks/clip/ for an example")
