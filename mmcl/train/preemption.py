"""Stopping cleanly on SIGTERM: every process stops at the same step, after a checkpoint.

SLURM (at preemption, and ahead of the time limit with `sbatch --signal=TERM@S`), Kubernetes and
Cloud TPU maintenance all announce the end of a job with SIGTERM. `PreemptionGuard.reached(step)` is
asked once per step, after the step has been dispatched; it turns True at the same step on every
process, the trainer then saves that step's state (with the data-iterator position), waits for the
checkpoint to be committed and raises `Preempted`, and `mmcl train` exits with `EXIT_CODE`. A rerun
resumes from that checkpoint, so at most the step in flight when the signal arrived is redone, and
the resumed run is bit-identical to an uninterrupted one.

How processes agree:
  * several processes (`jax.distributed` initialised, preemption service on, the default): JAX's
    preemption sync manager catches SIGTERM in any process, the coordination service picks the step
    after the highest step any process has reached, and `reached_preemption_sync_point(step)` is
    True there on all of them. No collective runs per step.
  * several processes with the service off (`jax_enable_preemption_service=False`): a Python
    handler sets a local flag, and the flags are all-reduced (max) every step.
  * one process: the Python handler's flag.
"""

from __future__ import annotations

import logging
import signal
import threading
import weakref

import jax
import numpy as np

log = logging.getLogger("mmcl.train")

# EX_TEMPFAIL of sysexits.h ("try again later"): distinct from success, errors (1, 2, 3) and deaths
# by signal (128 + n); the generated sbatch scripts requeue the job on it.
EXIT_CODE = 75


class Preempted(Exception):
  """Training stopped on SIGTERM after committing the checkpoint of `step`; rerun to resume."""

  def __init__(self, step: int, checkpoint_dir: str):
    super().__init__(f"stopped on SIGTERM after step {step}; its checkpoint is committed in "
                     f"{checkpoint_dir}: rerun the same command to resume")
    self.step = step


class PreemptionGuard:
  """Answers, once per step, whether all processes have agreed to stop after this step."""

  def __init__(self):
    self._flag = False
    self._restore = None
    # jax.distributed.initialize starts the preemption sync manager when this option is on.
    self._sync_manager = (jax.distributed.is_initialized()
                          and bool(jax.config.jax_enable_preemption_service))
    self._allreduce = jax.process_count() > 1 and not self._sync_manager
    if not self._sync_manager and threading.current_thread() is threading.main_thread():
      # The handler holds the guard weakly, and the previous handler comes back when the guard is
      # closed or garbage-collected (e.g. train() raised before its `finally`).
      ref = weakref.ref(self)
      previous = signal.signal(signal.SIGTERM, lambda signum, frame: _on_signal(ref))
      self._restore = weakref.finalize(self, _restore_handler, previous)

  def reached(self, step: int) -> bool:
    """True when every process stops after `step` (call with every step, on every process)."""
    if self._sync_manager:
      from jax.experimental import multihost_utils
      stop = multihost_utils.reached_preemption_sync_point(step)
    elif self._allreduce:
      from jax.experimental import multihost_utils
      stop = bool(np.max(multihost_utils.process_allgather(np.int32(self._flag))))
    else:
      stop = self._flag
    if stop:
      log.warning("preemption: all processes stop after step %d", step)
    return stop

  def close(self) -> None:
    """Restores the SIGTERM handler that was installed before."""
    if self._restore is not None:
      self._restore()


def _on_signal(ref) -> None:
  guard = ref()
  if guard is None:
    return
  if not guard._flag:  # pylint: disable=protected-access
    log.warning("SIGTERM: stopping after the step in flight, with a checkpoint")
  guard._flag = True  # pylint: disable=protected-access


def _restore_handler(previous) -> None:
  try:
    signal.signal(signal.SIGTERM, previous)
  except ValueError:  # not in the main thread: leave it
    pass
