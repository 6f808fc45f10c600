"""What sealing checkpoints costs: the time `Checkpointer.save` blocks training, with and without
the integrity seal, and the seal's own time in the background.

  .venv/bin/python experiments/bench/checkpoint.py --megabytes 64 256 --repeats 5

For each state size it builds a train-state-like pytree of float32 arrays (about M MB, sharded over
every local device), then saves it --repeats times with an asynchronous `Checkpointer`:

  - blocked ms: wall time of the `save()` call itself, which is all the training loop waits for
    (device-to-host copy and dispatch; the write and the seal run in background threads);
  - committed ms: from the call until orbax has renamed the step into place;
  - sealed ms: from the call until `mmcl_integrity.json` exists (the SHA-256 of every file);
  - verify ms: `verify_step` of one committed step (what every restore pays first).

"seal off" replaces the sealing thread with nothing, i.e. the checkpointer as it was before seals.
Medians over the repeats; the first save of each configuration (compilation, directory creation) is
excluded. Output: a Markdown table on stdout, and the rows as JSON with --json PATH.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from mmcl.parallel import mesh as mesh_lib
from mmcl.train import checkpoint as ckpt_lib


def _state(megabytes: int, mesh) -> dict:
  """~megabytes of float32 in 16 arrays [rows, 1024], rows a multiple of the device count."""
  n = mesh.size
  rows = max(n, int(megabytes * 2**20 / 4 / 1024 / 16) // n * n)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  make = jax.jit(lambda k: jax.random.normal(k, (rows, 1024), jnp.float32), out_shardings=sharding)
  keys = jax.random.split(jax.random.PRNGKey(0), 16)
  return {f"layer_{i}": make(k) for i, k in enumerate(keys)}


def _wait_for(path: pathlib.Path, timeout: float = 600.0) -> float:
  start = time.perf_counter()
  while not path.exists():
    if time.perf_counter() - start > timeout:
      raise TimeoutError(f"{path} did not appear in {timeout} s")
    time.sleep(0.001)
  return time.perf_counter()


def _run(megabytes: int, seal: bool, repeats: int, mesh) -> dict:
  state = _state(megabytes, mesh)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  blocked, committed, sealed = [], [], []
  with tempfile.TemporaryDirectory(prefix="mmcl-bench-ckpt-") as d:
    ckpt = ckpt_lib.Checkpointer(d, keep=2, async_save=True)
    if not seal:
      ckpt._seal = False  # pylint: disable=protected-access — the checkpointer without seals
    for step in range(repeats + 1):
      state = jax.tree.map(lambda x: x + 1.0, state)  # a new state each step, as in training
      jax.block_until_ready(state)
      t0 = time.perf_counter()
      ckpt.save(step, state, None)
      t1 = time.perf_counter()
      t_commit = _wait_for(ckpt.step_dir(step))
      t_seal = _wait_for(ckpt.step_dir(step) / ckpt_lib.INTEGRITY_FILE) if seal else None
      ckpt.wait()
      if step:  # the first save creates directories and compiles the copies
        blocked.append((t1 - t0) * 1e3)
        committed.append((t_commit - t0) * 1e3)
        if t_seal is not None:
          sealed.append((t_seal - t0) * 1e3)
    last = ckpt.step_dir(repeats)
    t0 = time.perf_counter()
    status = ckpt_lib.verify_step(last)[0] if seal else "-"
    verify_ms = (time.perf_counter() - t0) * 1e3 if seal else None
    ckpt.close()
  med = lambda xs: round(statistics.median(xs), 1) if xs else None
  return {"megabytes": round(nbytes / 2**20, 1), "seal": seal, "blocked_ms": med(blocked),
          "committed_ms": med(committed), "sealed_ms": med(sealed),
          "verify_ms": None if verify_ms is None else round(verify_ms, 1), "status": status,
          "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--megabytes", type=int, nargs="+", default=[64, 256])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", help="also write the rows as JSON here")
  a = p.parse_args(argv)
  mesh = mesh_lib.make_mesh()
  rows = []
  for mb in a.megabytes:
    for seal in (False, True, False, True):  # alternated, so drift in the machine's load is shared
      rows.append(_run(mb, seal, a.repeats, mesh))
  print(f"device: {jax.devices()[0].device_kind} × {jax.device_count()}, "
        f"jax {jax.__version__}")
  print("| state MB | seal | blocked ms | committed ms | sealed ms | verify ms |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['megabytes']} | {'on' if r['seal'] else 'off'} | {r['blocked_ms']} | "
          f"{r['committed_ms']} | {r['sealed_ms'] or '–'} | {r['verify_ms'] or '–'} |")
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
