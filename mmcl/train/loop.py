"""The training loop: one readable function from config to checkpoints (big_vision / flax-examples style).

`train(config, workdir, task_cls)`:
  mesh from config → task → sharded state (created already sharded) → resume from the newest
  checkpoint in `workdir` if any (params, optimizer, step, RNG and the data iterator; else, with
  `train.init_from`, from another run's checkpoint: a fork) → jitted generic
  step → periodic metric logging and asynchronous checkpoints → final checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.config import Config
from mmcl.parallel import mesh as mesh_lib
from mmcl.parallel import sharding as sharding_lib
from mmcl.train import checkpoint as ckpt_lib
from mmcl.train import finished as finished_lib
from mmcl.train import preemption
from mmcl.train.metric_log import MetricLogger
from mmcl.train.optim import make_optimizer
from mmcl.train.state import TrainState
from mmcl.train.step import make_eval_step, make_train_step
from mmcl.train.task import Task

log = logging.getLogger("mmcl.train")

# Dense bf16 peak FLOP/s by device kind (datasheet), for MFU; other devices report no MFU.
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12}


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss or gradient; the last checkpoint is intact."""


def setup(config: Config, task_cls: type[Task]) -> tuple[jax.sharding.Mesh, Task]:
  """Initialises multi-process JAX if configured, builds the mesh and the task."""
  d = config.distributed
  mesh_lib.maybe_initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
  mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.model)
  return mesh, task_cls(config, mesh)


def build_state(config: Config, task: Task, mesh: jax.sharding.Mesh):
  """Returns (state_fn, abstract_state, shardings, tx, schedule); state_fn() makes the sharded state."""
  frozen = task.frozen_params_filter
  tx, schedule = make_optimizer(config.optim, config.train.total_steps, frozen)

  def init(seed_key):
    params_key, step_key = jax.random.split(seed_key)
    params = task.init_params(params_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=step_key)

  key = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(init, key)
  rules = list(task.sharding_rules() or []) + sharding_lib.STRATEGIES[config.mesh.param_sharding]
  shardings = sharding_lib.tree_shardings(abstract, rules, mesh)
  state_fn = lambda: jax.jit(init, out_shardings=shardings)(key)
  return state_fn, abstract, shardings, tx, schedule


def _to_float(metrics: dict) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def _validate(eval_step, params, task: Task, mesh, num_batches: int) -> dict[str, float]:
  """Mean of the task's loss metrics over the first `num_batches` held-out batches."""
  it = task.val_iterator(jax.process_index(), jax.process_count())
  if it is None or num_batches == 0:
    return {}
  sums: dict[str, float] = {}
  n = 0
  for _, local in zip(range(num_batches), it):
    m = _to_float(eval_step(params, mesh_lib.host_batch_to_global(mesh, local)))
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + v
    n += 1
  return {f"val/{k}": v / max(n, 1) for k, v in sums.items()}


def parse_init_from(spec: str) -> tuple[pathlib.Path, int | None]:
  """"WORKDIR" or "WORKDIR:STEP" (config key train.init_from) -> (workdir, step or None)."""
  head, sep, tail = spec.rpartition(":")
  if sep and tail.isdigit():
    return pathlib.Path(head), int(tail)
  return pathlib.Path(spec), None


def fork_from(spec: str, abstract, shardings, data_iter) -> tuple[Any, int]:
  """Restores another run's checkpoint (state + data iterator) as this run's starting point.

  The checkpoint must match this run's state structure (same model and optimizer); the config may
  differ elsewhere (task options, total_steps). Returns (state, step).
  """
  src, step = parse_init_from(spec)
  if not ckpt_lib.checkpoint_dir(src).is_dir():
    raise FileNotFoundError(f"config key train.init_from = {spec!r}: no checkpoints in "
                            f"{ckpt_lib.checkpoint_dir(src)}")
  source = ckpt_lib.Checkpointer(src, read_only=True)
  steps = source.all_steps()
  step = steps[-1] if step is None and steps else step
  if step not in steps:
    raise FileNotFoundError(f"config key train.init_from = {spec!r}: {ckpt_lib.checkpoint_dir(src)} "
                            f"has no step {step} (it has {steps})")
  log.info("forking from %s at step %d", ckpt_lib.checkpoint_dir(src), step)
  try:
    state = source.restore(step, ckpt_lib.abstract_with_shardings(abstract, shardings), data_iter)
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"config key train.init_from = {spec!r}: the checkpoint at step {step} does "
                     f"not match this run's model/optimizer state: {e}") from e
  finally:
    source.close()
  return state, step


def train(config: Config, workdir: str | os.PathLike, task_cls: type[Task]) -> dict[str, float]:
  """Trains (or resumes) the job described by `config` in `workdir`; returns the last step's metrics."""
  workdir = pathlib.Path(workdir)
  mesh, task = setup(config, task_cls)
  preempt = preemption.PreemptionGuard()  # SIGTERM from here on: stop at an agreed step, saved
  is_main = jax.process_index() == 0
  workdir.mkdir(parents=True, exist_ok=True)
  if is_main:
    finished_lib.clear(workdir)
    tmp = workdir / "config.json.tmp"
    tmp.write_text(config.to_json())
    tmp.replace(workdir / "config.json")

  tc = config.train
  state_fn, abstract, shardings, tx, schedule = build_state(config, task, mesh)
  data_iter = task.train_iterator(jax.process_index(), jax.process_count())
  ckpt = ckpt_lib.Checkpointer(workdir, keep=tc.keep_checkpoints, keep_best=tc.keep_best,
                               best_metric=tc.best_metric if tc.val_batches else None,
                               best_mode=tc.best_mode, async_save=tc.async_checkpointing)
  start = ckpt.latest_step()
  if start is not None:
    log.info("resuming from %s at step %d", ckpt_lib.checkpoint_dir(workdir), start)
    state = ckpt.restore(start, ckpt_lib.abstract_with_shardings(abstract, shardings), data_iter)
  elif tc.init_from:
    state, start = fork_from(tc.init_from, abstract, shardings, data_iter)
  else:
    state, start = state_fn(), 0

  batch_sharding = mesh_lib.batch_sharding(mesh)
  grad_cache = (task.embed, task.loss_from_embeddings) if tc.grad_cache else None
  step_fn = jax.jit(make_train_step(task.loss, tx, schedule, grad_accum_steps=tc.grad_accum_steps,
                                    mesh=mesh, grad_cache=grad_cache),
                    in_shardings=(shardings, batch_sharding),
                    out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(task.loss))

  flops = task.flops_per_example()
  peak = PEAK_FLOPS.get(jax.devices()[0].device_kind)
  end = tc.total_steps
  if tc.stop_after_steps is not None:
    end = min(end, start + tc.stop_after_steps)
  logger = MetricLogger(workdir, total_steps=tc.total_steps, is_main_process=is_main,
                        progress=tc.progress_bar)
  last: dict[str, float] = {}
  t_last, steps_since = time.perf_counter(), 0
  pending = None

  def check_finite(p):
    if p is None or not int(p[1]["nonfinite"]):
      return
    done, m, rows = p
    rows = None if rows is None else np.asarray(rows).tolist()
    where = "" if rows is None else (
        f"; the batch's host-local record indices: {rows[:64]}{'…' if len(rows) > 64 else ''}")
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {done} (loss={float(m['loss'])}, "
        f"grad_norm={float(m['grad_norm'])}){where}. The update was not applied; training "
        f"stopped. Last good checkpoint: step {ckpt.latest_step()} in "
        f"{ckpt_lib.checkpoint_dir(workdir)}")

  try:
    for step in range(start, end):
      try:
        local = next(data_iter)
      except StopIteration:
        log.info("data exhausted after %d steps (data.num_epochs=%s)", step, config.data.num_epochs)
        end = step
        break
      batch = mesh_lib.host_batch_to_global(mesh, local)
      state, metrics = step_fn(state, batch)
      steps_since += 1
      done = step + 1
      if step == start:  # keep compilation out of the throughput numbers
        jax.block_until_ready(metrics)
        t_last, steps_since = time.perf_counter(), 0
      # The finiteness of step t is read after step t+1 is dispatched, so the host never waits on
      # the device in steady state; nothing is logged or saved before the check.
      check_finite(pending)
      pending = (done, metrics, local.get("index"))
      if done % tc.log_every == 0 or done % tc.checkpoint_every == 0 or done == end:
        check_finite(pending)
        pending = None
      if done % tc.log_every == 0 or done == end:
        last = _to_float(metrics)
        last.pop("nonfinite", None)
        dt = time.perf_counter() - t_last
        if steps_since:
          last["examples_per_s"] = steps_since * config.data.global_batch_size / dt
        if flops and peak and steps_since:
          last["mfu"] = 3 * flops * last["examples_per_s"] / (peak * jax.device_count())
        logger.write(done, last)
        t_last, steps_since = time.perf_counter(), 0
      if done % tc.checkpoint_every == 0 or done == end:
        val = _validate(eval_step, state.params, task, mesh, tc.val_batches)
        if val:
          logger.write(done, val)
          last.update(val)
        ckpt.save(done, state, data_iter, metrics=val or None)
        t_last, steps_since = time.perf_counter(), 0  # keep validation/saving out of throughput
      if done != end and preempt.reached(done):
        check_finite(pending)
        if done % tc.checkpoint_every:
          ckpt.save(done, state, data_iter)
        raise preemption.Preempted(done, str(ckpt_lib.checkpoint_dir(workdir)))
    check_finite(pending)
  finally:
    ckpt.close()
    logger.close()
    preempt.close()
  if is_main:
    (workdir / "train_summary.json").write_text(json.dumps({"step": end, **last}, indent=2))
    finished_lib.mark(workdir, step=end, checkpoint=ckpt.latest_step(), total_steps=tc.total_steps)
  return last
