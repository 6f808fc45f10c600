"""`mmcl serve EXPORT_DIR`: an aiohttp service over an `mmcl export` directory.

Routes (JSON in, JSON out):
  GET  /healthz    {"status": "ok"}
  GET  /metadata   the towers (input kind, dim, runtime), the corpora (count, query tower,
                   index), the batching settings, task, step and format of the export
  POST /embed      {"tower": NAME, "inputs": [RAW, ...]}
                   → {"tower", "dim", "embeddings": [[float] * dim, ...]}
  POST /search     {"corpus": NAME, "query": RAW, "k": 10 (optional), "tower": NAME (optional,
                   default the corpus's query tower)}
                   → {"corpus", "k", "ids": [str] * k, "scores": [float] * k}
RAW is what the tower's preprocessing takes (`mmcl.serve.model`): a string for a text tower,
base64 image bytes for an image tower, the input array as nested lists otherwise.

A bad request gets a 4xx whose JSON body {"error": MESSAGE, "field": FIELD} names the field; a
failure inside a model call is a 500 for the requests of that batch only, and the process goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import signal
import sys
from typing import Any

import numpy as np
from aiohttp import web

from mmcl.serve.batching import Batcher, BatchingConfig
from mmcl.serve.model import RequestError, ServedExport, load_export

log = logging.getLogger("mmcl.serve")

MAX_INPUTS_PER_REQUEST = 256
DEFAULT_K = 10


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """Settings of `mmcl serve` (each is a command-line flag of the same name).

  host, port: where to listen (port 0: a free port, printed at start).
  runtime: "auto" (ONNX Runtime where the export has ONNX models, else jax), "onnx" or "jax".
  max_batch_size, max_wait_ms: request batching (`mmcl.serve.batching`); 1 disables it.
  max_k: the largest k a /search may ask for (also bounded by the corpus size).
  max_request_bytes: the largest request body (413 beyond).
  threads: worker threads running model calls and searches.
  """
  host: str = "127.0.0.1"
  port: int = 8000
  runtime: str = "auto"
  max_batch_size: int = 64
  max_wait_ms: float = 0.0
  max_k: int = 1000
  max_request_bytes: int = 16 << 20
  threads: int = max(2, min(8, os.cpu_count() or 2))


class _State:
  """The loaded export, one batcher per tower and per corpus, the thread pool."""

  def __init__(self, served: ServedExport, config: ServeConfig):
    self.served = served
    self.config = config
    self.executor = concurrent.futures.ThreadPoolExecutor(config.threads,
                                                          thread_name_prefix="mmcl-serve")
    batching = BatchingConfig(config.max_batch_size, config.max_wait_ms)
    self.embedders = {name: Batcher(lambda x, _, t=t: t.run(x), batching, self.executor)
                      for name, t in served.towers.items()}
    self.searchers = {name: Batcher(lambda q, ks, c=c: c.search(q, max(ks)), batching,
                                    self.executor)
                      for name, c in served.corpora.items()}

  async def start(self, _app=None):
    for b in (*self.embedders.values(), *self.searchers.values()):
      await b.start()

  async def stop(self, _app=None):
    for b in (*self.embedders.values(), *self.searchers.values()):
      await b.stop()
    self.executor.shutdown(wait=False, cancel_futures=True)


def _error(status: int, message: str, field: str | None = None) -> web.Response:
  return web.json_response({"error": message, "field": field}, status=status)


@web.middleware
async def _errors(request: web.Request, handler):
  try:
    return await handler(request)
  except RequestError as e:
    return _error(e.status, str(e), e.field)
  except web.HTTPException as e:
    if e.status >= 400 and e.content_type != "application/json":
      return _error(e.status, e.reason if not e.text else e.text.strip())
    raise
  except asyncio.CancelledError:
    raise
  except Exception as e:  # a bug or a failing model call: this request fails, the server stays
    log.exception("request %s %s failed", request.method, request.path)
    return _error(500, f"internal error: {type(e).__name__}: {e}")


async def _body(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
  try:
    raw = await request.read()
  except web.HTTPRequestEntityTooLarge:
    raise RequestError("body", f"request body over {request.app['state'].config.max_request_bytes}"
                               " bytes", 413) from None
  try:
    body = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError("body", f"not valid JSON ({e})") from None
  if not isinstance(body, dict):
    raise RequestError("body", f"expected a JSON object, got {type(body).__name__}")
  for key in body:
    if key not in allowed:
      raise RequestError(key, f"unknown field; this route takes {', '.join(allowed)}")
  return body


def _name(body: dict, field: str, choices: dict, what: str, default: str | None = None) -> str:
  value = body.get(field, default)
  if value is None:
    raise RequestError(field, f"required: the {what} ({', '.join(sorted(choices))})")
  if not isinstance(value, str) or value not in choices:
    raise RequestError(field, f"unknown {what} {value!r}; choose one of "
                              f"{', '.join(sorted(choices))}", 404 if isinstance(value, str)
                       else 400)
  return value


def _finite(x: np.ndarray, what: str) -> np.ndarray:
  if not np.all(np.isfinite(x)):
    raise RuntimeError(f"{what}: the tower returned non-finite values")
  return x


async def healthz(request: web.Request) -> web.Response:
  return web.json_response({"status": "ok"})


async def metadata(request: web.Request) -> web.Response:
  state: _State = request.app["state"]
  m = state.served.manifest
  return web.json_response({
      "format": m["format"], "task": m.get("task"), "step": m.get("step"),
      "towers": {name: {"input": getattr(t.preprocess, "kind", ""), "dim": t.dim,
                        "runtime": t.runtime,
                        "preprocessing": m["towers"][name]["preprocessing"]}
                 for name, t in state.served.towers.items()},
      "corpora": {name: {"count": c.count, "dim": c.dim, "tower": c.tower,
                         "query_tower": c.query_tower, "index": c.index_kind,
                         "index_check": m["corpus"][name].get("index", {}).get("check")}
                  for name, c in state.served.corpora.items()},
      # What this process has loaded: the export's runtimes only, never mmcl's training code.
      "process": {"runtimes": sorted({t.runtime for t in state.served.towers.values()}),
                  "jax_imported": "jax" in sys.modules,
                  "training_code_imported": any(m.split(".")[:2] in (["mmcl", "train"],
                                                                     ["mmcl", "tasks"])
                                                for m in list(sys.modules))},
      "batching": {"max_batch_size": state.config.max_batch_size,
                   "max_wait_ms": state.config.max_wait_ms},
      # Model calls and rows so far (rows / calls: the mean batch size request batching reached).
      "stats": {**{name: {"calls": b.calls, "rows": b.rows}
                   for name, b in state.embedders.items()},
                **{f"search:{name}": {"calls": b.calls, "rows": b.rows}
                   for name, b in state.searchers.items()}},
      "limits": {"max_k": state.config.max_k, "max_inputs_per_request": MAX_INPUTS_PER_REQUEST,
                 "max_request_bytes": state.config.max_request_bytes}})


async def embed(request: web.Request) -> web.Response:
  state: _State = request.app["state"]
  body = await _body(request, ("tower", "inputs"))
  name = _name(body, "tower", state.served.towers, "tower")
  tower = state.served.towers[name]
  inputs = body.get("inputs")
  if not isinstance(inputs, list) or not inputs:
    raise RequestError("inputs", f"required: a non-empty list of {tower.preprocess.kind}")
  if len(inputs) > MAX_INPUTS_PER_REQUEST:
    raise RequestError("inputs", f"{len(inputs)} inputs; at most {MAX_INPUTS_PER_REQUEST} per "
                                 "request", 413)
  rows = np.stack([tower.preprocess(v, f"inputs[{i}]") for i, v in enumerate(inputs)])
  out = _finite(await state.embedders[name](rows), f"tower {name!r}")
  return web.json_response({"tower": name, "dim": tower.dim,
                            "embeddings": np.asarray(out, np.float32).tolist()})


async def search(request: web.Request) -> web.Response:
  state: _State = request.app["state"]
  body = await _body(request, ("corpus", "query", "k", "tower"))
  name = _name(body, "corpus", state.served.corpora, "corpus")
  corpus = state.served.corpora[name]
  tower_name = _name(body, "tower", state.served.towers, "tower", default=corpus.query_tower)
  tower = state.served.towers[tower_name]
  if tower.dim != corpus.dim:
    raise RequestError("tower", f"tower {tower_name!r} embeds into {tower.dim} dimensions, corpus "
                                f"{name!r} has {corpus.dim}")
  k = body.get("k", DEFAULT_K)
  limit = min(state.config.max_k, corpus.count)
  if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= limit:
    raise RequestError("k", f"expected an integer in [1, {limit}], got {k!r}")
  if "query" not in body:
    raise RequestError("query", f"required: {tower.preprocess.kind}")
  row = tower.preprocess(body["query"], "query")[None]
  query = _finite(await state.embedders[tower_name](row), f"tower {tower_name!r}")
  scores, rows = await state.searchers[name](np.asarray(query, np.float32), k)
  scores, rows = scores[0][:k], rows[0][:k]
  found = rows >= 0
  return web.json_response({"corpus": name, "tower": tower_name, "k": k,
                            "ids": [corpus.ids[int(r)] for r in rows[found]],
                            "scores": [float(s) for s in scores[found]]})


def build_app(served: ServedExport, config: ServeConfig) -> web.Application:
  app = web.Application(middlewares=[_errors], client_max_size=config.max_request_bytes)
  state = _State(served, config)
  app["state"] = state
  app.on_startup.append(state.start)
  app.on_cleanup.append(state.stop)
  app.router.add_get("/healthz", healthz)
  app.router.add_get("/metadata", metadata)
  app.router.add_post("/embed", embed)
  app.router.add_post("/search", search)
  return app


def run_server(export_dir: str | os.PathLike, config: ServeConfig) -> None:
  """Loads the export, listens, prints "mmcl serve: listening on http://HOST:PORT" (the actual
  port when `config.port` is 0) and serves until SIGINT or SIGTERM."""
  served = load_export(pathlib.Path(export_dir), config.runtime)
  app = build_app(served, config)

  async def main():
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    port = runner.addresses[0][1]
    towers = ", ".join(f"{n} ({t.runtime})" for n, t in served.towers.items())
    corpora = ", ".join(f"{n} ({c.count} × {c.dim}, {c.index_kind})"
                        for n, c in served.corpora.items()) or "none"
    print(f"mmcl serve: listening on http://{config.host}:{port} — towers {towers}; corpora "
          f"{corpora}; batching up to {config.max_batch_size} rows / {config.max_wait_ms} ms",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
      loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()

  asyncio.run(main())
