"""The one-time check that lets impl="auto" choose the Pallas `fused` kernels on a GPU.

`fused_usable()` compiles the fused InfoNCE (loss and gradients) on the current device for a small
random problem whose batch is not a multiple of the tile, with duplicate groups and invalid rows, and
compares it with the plain-XLA `tiled` kernel. Only when it compiles, runs and agrees does "auto"
pick "fused"; otherwise "auto" uses "tiled" and the reason is logged once. The result is cached per
backend and device kind for the life of the process. An explicit `impl="fused"` is never probed,
and `task.loss_impl=tiled` (any task) bypasses the fused kernels altogether.
"""
from __future__ import annotations

import functools
import logging
import threading

import jax
import jax.numpy as jnp

log = logging.getLogger("mmcl.losses")

PROBE_BATCH, PROBE_DIM = 200, 128  # 200 is not a multiple of any tile edge
RTOL = 1e-2  # bf16 inputs: the GPU tests' tolerance


def _problem():
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (PROBE_BATCH, PROBE_DIM), jnp.float32)
  b = a + 0.5 * jax.random.normal(kb, (PROBE_BATCH, PROBE_DIM), jnp.float32)
  normalise = lambda x: (x / jnp.linalg.norm(x, axis=1, keepdims=True)).astype(jnp.bfloat16)
  groups = (jnp.arange(PROBE_BATCH) % 50).astype(jnp.int32)  # four duplicates of each id
  valid = jnp.arange(PROBE_BATCH) % 7 != 3
  return normalise(a), normalise(b), groups, valid


def _loss_and_grads(impl: str, a, b, groups, valid):
  from mmcl.losses.infonce import infonce  # imported late: infonce -> kernels -> common -> here

  def f(a, b):
    return infonce(a, b, logit_scale=20.0, group_ids=groups, a_valid=valid, impl=impl)
  loss, (ga, gb) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(a, b)
  return (jnp.asarray(loss, jnp.float32), jnp.asarray(ga, jnp.float32),
          jnp.asarray(gb, jnp.float32))


def _compare() -> str | None:
  try:
    problem = _problem()
    fused = _loss_and_grads("fused", *problem)
    tiled = _loss_and_grads("tiled", *problem)
    for name, x, y in zip(("loss", "grad a", "grad b"), fused, tiled):
      if not bool(jnp.all(jnp.isfinite(x))):
        return f"the fused kernel's {name} is not finite"
      err = float(jnp.max(jnp.abs(x - y)))
      bound = RTOL * max(1.0, float(jnp.max(jnp.abs(y))))
      if not err <= bound:
        return f"the fused kernel's {name} differs from the tiled one by {err:.3g} (> {bound:.3g})"
  except Exception as e:  # noqa: BLE001 — a failed compile or launch is the answer
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"the fused kernel failed to compile or run: {type(e).__name__}: {first}"
  return None


def run_probe() -> str | None:
  """None when the fused kernels compile here and agree with the tiled ones, else the reason.

  Runs in a thread of its own: JAX's tracing state is per thread, so the probe computes concrete
  values even when it is first asked for while a loss is being traced under jit.
  """
  result: list[str | None] = []
  thread = threading.Thread(target=lambda: result.append(_compare()), name="mmcl-fused-probe")
  thread.start()
  thread.join()
  return result[0] if result else "the probe thread died"


@functools.lru_cache(maxsize=None)
def _probe_for(backend: str, device_kind: str) -> bool:
  why = run_probe()
  if why is None:
    log.info("impl=auto: the fused Pallas kernels passed their check on %s (%s)", device_kind,
             backend)
    return True
  log.warning("impl=auto uses the tiled loss kernel on %s (%s): %s", device_kind, backend, why)
  return False


def fused_usable() -> bool:
  """Whether impl="auto" may choose "fused" on the current default device (probed once)."""
  return _probe_for(jax.default_backend(), jax.devices()[0].device_kind)
