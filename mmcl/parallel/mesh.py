"""Device mesh construction and multi-process start-up.

The mesh has two named axes: `data` (batch / FSDP parameter sharding) and `model` (tensor
parallelism for rules that name it). `mesh_shape` -1 on one axis means "all remaining devices".
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def maybe_initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                                 process_id: int | None) -> None:
  """Calls `jax.distributed.initialize` when this is one process of several.

  Explicit arguments (config `distributed.*`) win; otherwise a cluster environment that JAX detects
  itself (a SLURM job step, Open MPI, Cloud TPU, or `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES`
  + `JAX_PROCESS_ID`) triggers a bare `initialize()`. A single plain process does nothing, and so
  does a process started inside a SLURM allocation without `srun` (an sbatch script or salloc
  shell): there SLURM describes the allocation but no job step, and the process runs on its own.
  """
  if jax.distributed.is_initialized():
    return
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError("config distributed.coordinator_address is set, so distributed.num_processes "
                       "and distributed.process_id must be set too")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif launched_by_cluster(os.environ):
    jax.distributed.initialize()


def launched_by_cluster(env) -> bool:
  """Whether `env` describes one process of a multi-process launch that `jax.distributed.initialize()`
  understands without arguments."""
  if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" not in env and "JAX_NUM_PROCESSES" not in env:
    # An sbatch script or salloc shell: SLURM describes the allocation but no job step (only srun
    # sets SLURM_STEP_NODELIST, which JAX needs), so this is one process on its own.
    return False
  return any(v in env for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"))


def make_mesh(data: int = -1, model: int = 1, devices: list | None = None) -> Mesh:
  """Builds a (data, model) mesh over `devices` (default: all devices of all processes).

  Args:
    data: size of the data axis; -1 = number of devices // model.
    model: size of the model axis.
  Returns:
    A `Mesh` with Auto axis types, so jit propagates shardings through matmuls of sharded operands.
  """
  devices = list(jax.devices()) if devices is None else list(devices)
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(f"config mesh.model={model} must divide the number of devices ({n})")
  if data == -1:
    data = n // model
  if data * model != n:
    raise ValueError(f"config mesh.data={data} × mesh.model={model} = {data * model} does not match "
                     f"the {n} available devices")
  # Keep each process's devices contiguous along `data` so host-local batches map to one block.
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  grid = np.asarray(devices, dtype=object).reshape(data, model)
  return Mesh(grid, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading dim over `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_batch_to_global(mesh: Mesh, local_batch: dict) -> dict:
  """Assembles this process's rows into globally sharded arrays.

  Args:
    local_batch: dict of numpy arrays [b_local, ...] — this process's contiguous block of the global
      batch (process p holds rows [p·B/P, (p+1)·B/P)).
  Returns:
    dict of `jax.Array` [B, ...] sharded over `data`.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def describe_devices() -> str:
  """One line naming this process's devices, for benchmark records: the CPU model and core count on
  a CPU (from /proc/cpuinfo), else "N x <device kind>"."""
  import platform
  devices = jax.devices()
  dev = devices[0]
  if dev.platform == "cpu":
    model = platform.processor() or "cpu"
    try:
      with open("/proc/cpuinfo") as f:
        model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
      pass
    return f"CPU {model}, {os.cpu_count()} cores, {len(devices)} device(s)"
  return f"{len(devices)} x {dev.device_kind}"


def embed_rows(fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray], mesh: Mesh,
               batch_size: int = 1024) -> np.ndarray:
  """Applies a jitted row-wise `fn(*batch_arrays) -> [b, D]` to all rows, batch-sharded on the mesh.

  arrays: each [R, ...]; the last batch is padded with row 0 and the padding dropped.
  Returns [R, D] float32 numpy.
  """
  n_dev = mesh.shape[DATA_AXIS]
  bs = max(n_dev, batch_size // n_dev * n_dev)
  sharding = batch_sharding(mesh)
  rows = arrays[0].shape[0]
  out = []
  for start in range(0, rows, bs):
    chunk = [a[start:start + bs] for a in arrays]
    real = chunk[0].shape[0]
    if real < bs:
      chunk = [np.concatenate([c, np.repeat(c[:1], bs - real, 0)]) for c in chunk]
    out.append(np.asarray(fn(*[jax.device_put(c, sharding) for c in chunk]))[:real])
  return np.concatenate(out).astype(np.float32)


def put_on_mesh(batch: dict, mesh: Mesh) -> dict:
  """A data pipeline's host rows → global `jax.Array`s sharded over the mesh's data axis (leading
  dim); fields of Python objects (ids, raw strings) are left out."""
  return host_batch_to_global(mesh, {k: v for k, v in batch.items()
                                     if np.asarray(v).dtype != object})
