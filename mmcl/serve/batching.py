"""Request batching: inputs of concurrent requests run through a model together.

A `Batcher` owns one model call (a tower, or an index search). Requests put their rows on its
queue and await a future; one worker task takes every request waiting (up to `max_batch_size`
rows), runs the call once on the concatenated rows in a worker thread (the event loop keeps
accepting requests meanwhile) and hands each request its slice of the result. Requests that
arrive while a call runs form the next batch, so under load batches grow by themselves and an
idle server adds no delay; `max_wait_ms` > 0 also lets the first request of a batch wait that
long for company. A request with more rows than `max_batch_size` runs
alone. With `max_batch_size` 1 there is no queue: each request calls the model in its own thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
  """max_batch_size: rows per model call (1 disables batching); max_wait_ms: how long the first
  request of a batch waits for others."""
  max_batch_size: int = 64
  max_wait_ms: float = 0.0

  def __post_init__(self):
    if self.max_batch_size < 1 or self.max_wait_ms < 0:
      raise ValueError(f"batching: max_batch_size >= 1 and max_wait_ms >= 0 expected, got "
                       f"{self.max_batch_size} and {self.max_wait_ms}")


@dataclasses.dataclass
class _Pending:
  rows: np.ndarray
  extra: Any
  future: asyncio.Future


class Batcher:
  """Runs `fn(rows [n, ...], extras) -> [n, ...] array or tuple of arrays` over batched requests.

  `extras` is the list of each request's `extra` argument (e.g. its k), one per row.
  """

  def __init__(self, fn: Callable[[np.ndarray, list], Any], config: BatchingConfig,
               executor: concurrent.futures.Executor):
    self.fn = fn
    self.config = config
    self.executor = executor
    self.queue: asyncio.Queue[_Pending] | None = None
    self.worker: asyncio.Task | None = None
    self.calls = 0
    self.rows = 0

  async def start(self) -> None:
    if self.config.max_batch_size > 1:
      self.queue = asyncio.Queue()
      self.worker = asyncio.create_task(self._run())

  async def stop(self) -> None:
    if self.worker is not None:
      self.worker.cancel()
      try:
        await self.worker
      except asyncio.CancelledError:
        pass

  async def __call__(self, rows: np.ndarray, extra: Any = None):
    loop = asyncio.get_running_loop()
    if self.queue is None:
      self.calls += 1
      self.rows += len(rows)
      return await loop.run_in_executor(self.executor, self.fn, rows, [extra] * len(rows))
    future = loop.create_future()
    await self.queue.put(_Pending(rows, extra, future))
    return await future

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    carry: _Pending | None = None
    while True:
      first = carry or await self.queue.get()
      carry = None
      batch, count = [first], len(first.rows)
      deadline = time.monotonic() + self.config.max_wait_ms / 1000
      while count < self.config.max_batch_size:
        try:
          item = self.queue.get_nowait()
        except asyncio.QueueEmpty:
          left = deadline - time.monotonic()
          if left <= 0:
            break
          try:
            item = await asyncio.wait_for(self.queue.get(), left)
          except asyncio.TimeoutError:
            break
        if count + len(item.rows) > self.config.max_batch_size:
          carry = item  # starts the next batch
          break
        batch.append(item)
        count += len(item.rows)
      await self._call(loop, batch)

  async def _call(self, loop, batch: list[_Pending]) -> None:
    rows = np.concatenate([p.rows for p in batch]) if len(batch) > 1 else batch[0].rows
    extras = [p.extra for p in batch for _ in range(len(p.rows))]
    self.calls += 1
    self.rows += len(rows)
    try:
      out = await loop.run_in_executor(self.executor, self.fn, rows, extras)
    except Exception as e:  # every waiting request gets the error; the worker goes on
      for p in batch:
        if not p.future.done():
          p.future.set_exception(e)
      return
    start = 0
    for p in batch:
      stop = start + len(p.rows)
      part = tuple(o[start:stop] for o in out) if isinstance(out, tuple) else out[start:stop]
      if not p.future.done():
        p.future.set_result(part)
      start = stop
