"""The training loop: one readable function from config to checkpoints (big_vision / flax-examples style).

`train(config, workdir, task_cls)`:
  mesh from config → task → sharded state (created already sharded) → resume from the newest
  checkpoint in `workdir` if any (params, optimizer, step, RNG and the data iterator; else, with
  `train.init_from`, from another run's checkpoint: a fork) → jitted generic
  step → periodic metric logging and asynchronous checkpoints → final checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import records
from mmcl.config import Config, ConfigError
from mmcl.parallel import mesh as mesh_lib
from mmcl.parallel import sharding as sharding_lib
from mmcl.train import checkpoint as ckpt_lib
from mmcl.train import finished as finished_lib
from mmcl.train import preemption
from mmcl.train import preflight
from mmcl.train.config import base_config
from mmcl.train.metric_log import MetricLogger
from mmcl.train.optim import make_optimizer
from mmcl.train.state import TrainState
from mmcl.train.step import make_eval_step, make_train_step
from mmcl.train.task import Task

log = logging.getLogger("mmcl.train")

# Dense bf16 peak FLOP/s by device kind (datasheet), for MFU; other devices report no MFU.
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12}


SKIP_LEDGER_DIR = "data_skips"  # per-process counts of skipped records (data.skip_bad_records)


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
  except ckpt_lib.CorruptCheckpointError as e:
    raise ConfigError(f"config key train.init_from = {spec!r}: the checkpoint at step {step} "
                      f"cannot be restored as this run's model/optimizer state ({e.reason})") from e
  finally:
    source.close()
  return state, step


def _params_finite(tree) -> bool:
  """Whether every floating-point leaf of `tree` is finite (one jitted reduction, one host read)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return True
  return bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _read_saved_config(path: pathlib.Path) -> dict | None:
  if not path.is_file():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path}: not a readable config ({type(e).__name__}: {e}); restore it or "
                      f"use a new workdir") from e


def _resume(config: Config, task_cls: type[Task], workdir: pathlib.Path, ckpt, task, mesh,
            abstract, shardings, data_iter) -> tuple[Any, int, dict]:
  """Restores the newest usable checkpoint of `workdir` after checking `config` against it.

  Corrupt newer steps are logged, passed over and moved aside into checkpoints_corrupt/ (never
  deleted). Returns (state, step, {changed key: (old, new)}).
  """
  target = ckpt_lib.abstract_with_shardings(abstract, shardings)
  steps = ckpt.all_steps()
  usable = ckpt.newest_usable_step()  # verified once; the restore below reuses the result
  changes: dict = {}
  saved = _read_saved_config(workdir / "config.json")
  if saved is not None and usable is not None:
    def config_for(d):
      c = base_config()
      task_cls.declare_config(c)
      c.update_from_dict(d)
      return c

    def abstract_for(c):
      return build_state(c, task_cls(c, mesh), mesh)[1]
    changes = preflight.check_resume(workdir, saved, config, ckpt.step_dir(usable), abstract,
                                     config_for, abstract_for)
  start, state, skipped = ckpt.restore_newest(target, data_iter, steps)
  log.info("resuming from %s at step %d", ckpt_lib.checkpoint_dir(workdir), start)
  if skipped:
    if jax.process_index() == 0:
      for s in skipped:
        log.warning("moved corrupt checkpoint step %d to %s", s.step,
                    ckpt.quarantine(s.step, s.reason))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("mmcl_quarantine")
    ckpt.manager.reload()
  return state, start, changes


def train(config: Config, workdir: str | os.PathLike, task_cls: type[Task]) -> dict[str, float]:
  """Trains (or resumes) the job described by `config` in `workdir`; returns the last step's metrics.

  Everything that can be checked is checked before the workdir is written: the batch against the
  mesh, and on resume the config against the saved one and the checkpoint's shapes; config.json is
  replaced only after the restore succeeded.
  """
  workdir = pathlib.Path(workdir)
  mesh, task = setup(config, task_cls)
  preflight.check_batch(config, mesh)
  with contextlib.ExitStack() as stack:
    # With data.skip_bad_records, skips (of this process and its grain workers) are counted here.
    ledger = (stack.enter_context(records.skip_ledger(workdir / SKIP_LEDGER_DIR))
              if config.data.skip_bad_records else None)
    preempt = preemption.PreemptionGuard()  # SIGTERM from here on: stop at an agreed step, saved
    stack.callback(preempt.close)
    return _start(config, workdir, task_cls, ledger, mesh, task, preempt)


def _start(config: Config, workdir: pathlib.Path, task_cls: type[Task], ledger, mesh, task,
           preempt) -> dict[str, float]:
  """Builds the state, restores or forks it, records the config, then runs the loop."""
  tc = config.train
  is_main = jax.process_index() == 0
  state_fn, abstract, shardings, tx, schedule = build_state(config, task, mesh)
  data_iter = task.train_iterator(jax.process_index(), jax.process_count())
  _read_saved_config(workdir / "config.json")  # an unreadable one stops before anything is written
  workdir.mkdir(parents=True, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=tc.keep_checkpoints, keep_best=tc.keep_best,
                               best_metric=tc.best_metric if tc.val_batches else None,
                               best_mode=tc.best_mode, async_save=tc.async_checkpointing)
  try:
    changes: dict = {}
    if ckpt.all_steps():
      state, start, changes = _resume(config, task_cls, workdir, ckpt, task, mesh, abstract,
                                      shardings, data_iter)
    elif tc.init_from:
      state, start = fork_from(tc.init_from, abstract, shardings, data_iter)
    else:
      state, start = state_fn(), 0
    if is_main:
      finished_lib.clear(workdir)
      tmp = workdir / "config.json.tmp"
      tmp.write_text(config.to_json())
      tmp.replace(workdir / "config.json")
      preflight.record_changes(workdir, start, changes)
  except BaseException:
    ckpt.close()
    raise
  return _train_loop(config, workdir, task, mesh, ckpt, state, start, shardings, tx, schedule,
                     data_iter, is_main, ledger, preempt)


def _train_loop(config: Config, workdir: pathlib.Path, task: Task, mesh, ckpt, state, start: int,
                shardings, tx, schedule, data_iter, is_main: bool, ledger,
                preempt) -> dict[str, float]:
  """Runs steps start..total_steps with logging, validation and checkpoints."""
  tc = config.train
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

  def last_good() -> str:
    ckpt.wait()
    good = ckpt.newest_usable_step()
    where = ckpt_lib.checkpoint_dir(workdir)
    return f"Last good checkpoint: step {good} in {where}" if good is not None else (
        f"No good checkpoint in {where}")

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
        f"stopped. {last_good()}")

  def check_savable(done, val):
    bad = sorted(k for k, v in val.items() if not math.isfinite(v))
    params_ok = _params_finite((state.params, state.opt_state))
    if not bad and params_ok:
      return
    what = ", ".join([f"{k}={val[k]}" for k in bad] + ([] if params_ok else
                                                        ["parameters or optimizer state"]))
    raise NonFiniteLossError(
        f"non-finite values at step {done} ({what}); its checkpoint was not saved and training "
        f"stopped. {last_good()}")

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
        if ledger is not None:
          last.update(records.skip_metrics(ledger.counts()))
        logger.write(done, last)
        t_last, steps_since = time.perf_counter(), 0
      if done % tc.checkpoint_every == 0 or done == end:
        val = _validate(eval_step, state.params, task, mesh, tc.val_batches)
        if val:
          logger.write(done, val)
          last.update(val)
        check_savable(done, val)
        ckpt.save(done, state, data_iter, metrics=val or None)
        t_last, steps_since = time.perf_counter(), 0  # keep validation/saving out of throughput
      if done != end and preempt.reached(done):
        check_finite(pending)
        if done % tc.checkpoint_every:
          check_savable(done, {})
          ckpt.save(done, state, data_iter)
        raise preemption.Preempted(done, str(ckpt_lib.checkpoint_dir(workdir)))
    check_finite(pending)
  finally:
    ckpt.close()
    logger.close()
    if hasattr(data_iter, "close"):  # stops grain worker processes (data.worker_count > 0)
      data_iter.close()
  if ledger is not None:
    last.update(records.skip_metrics(ledger.counts()))
  if is_main:
    (workdir / "train_summary.json").write_text(json.dumps({"step": end, **last}, indent=2))
    finished_lib.mark(workdir, step=end, checkpoint=ckpt.latest_step(), total_steps=tc.total_steps)
  return last
