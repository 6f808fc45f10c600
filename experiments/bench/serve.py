"""Load test of `mmcl serve` on loopback: requests/s and p50 / p99 latency of /embed and /search.

  mmcl export --workdir workdirs/quickstart --out workdirs/quickstart-export --format onnx \
      --corpus --index faiss
  .venv/bin/python experiments/bench/serve.py --export workdirs/quickstart-export \
      --random-corpus 1000000 --duration 5 --max-requests 2000

For each server configuration — the export as it is, and (with --random-corpus N) the same towers
over a corpus of N random unit vectors with an exact FAISS index — and each batching setting
(--batching: on = up to 64 rows per model call, the requests that queued while the previous call
ran; off = one call per request), a
fresh `mmcl serve` process is started on a free loopback port, then for each route and each
concurrency C (--concurrency 1 8 64) C aiohttp clients send requests back to back until
--duration seconds or --max-requests requests (whichever comes first; both bound every cell).
/embed sends one held-out caption of the quickstart's test split, /search the same caption
against the image corpus with k = 10. A warm-up of 20 requests per cell is not counted.

Only loopback (127.0.0.1) is ever addressed. The client runs on the same cores as the server, so
on a small machine the numbers are those of the pair. Output: a Markdown table on stdout and the
rows as JSON with --json PATH.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--export", required=True, help="an `mmcl export --corpus` directory (CLIP)")
  p.add_argument("--data", default="data/shapes", help="the dataset of the held-out captions")
  p.add_argument("--random-corpus", type=int, default=0,
                 help="also serve N random unit vectors as the image corpus (0: skip)")
  p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
  p.add_argument("--batching", nargs="+", default=["on", "off"], choices=("on", "off"))
  p.add_argument("--routes", nargs="+", default=["embed", "search"], choices=("embed", "search"))
  p.add_argument("--duration", type=float, default=5.0, help="seconds per cell (upper bound)")
  p.add_argument("--max-requests", type=int, default=2000, help="requests per cell (upper bound)")
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def _random_corpus_export(src: pathlib.Path, n: int, out: pathlib.Path) -> pathlib.Path:
  """A copy of `src` whose "images" corpus is n random unit vectors with an exact FAISS index."""
  import faiss  # pylint: disable=g-import-not-at-top
  manifest = json.loads((src / "manifest.json").read_text())
  entry = manifest["corpus"]["images"]
  shutil.copytree(src, out, ignore=shutil.ignore_patterns("corpus"))
  (out / "corpus").mkdir()
  rng = np.random.default_rng(0)
  emb = np.empty((n, entry["dim"]), np.float32)
  for start in range(0, n, 1 << 16):  # in blocks: no float64 copy of the whole corpus
    block = rng.standard_normal((min(n - start, 1 << 16), entry["dim"]), dtype=np.float32)
    emb[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
  np.save(out / "corpus" / "images.npy", emb)
  (out / "corpus" / "images.ids.txt").write_text("".join(f"r{i}\n" for i in range(n)))
  index = faiss.IndexFlatIP(entry["dim"])
  index.add(emb)
  faiss.write_index(index, str(out / "corpus" / "images.faiss"))
  manifest["corpus"] = {"images": {**entry, "count": n, "description": f"{n} random unit vectors",
                                   "index": {**entry.get("index", {}), "kind": "flat",
                                             "file": "corpus/images.faiss", "params": {},
                                             "check": None}}}
  files = {}
  for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"):
    h = hashlib.sha256(path.read_bytes()).hexdigest()
    files[path.relative_to(out).as_posix()] = {"sha256": h, "bytes": path.stat().st_size}
  manifest["files"] = files
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
  return out


def _start(export: pathlib.Path, batching: str) -> tuple[subprocess.Popen, str]:
  flags = ["--max-batch-size", "64", "--max-wait-ms", "0"] if batching == "on" else \
      ["--max-batch-size", "1"]
  proc = subprocess.Popen([sys.executable, "-m", "mmcl.cli", "serve", str(export), "--host",
                           "127.0.0.1", "--port", "0", *flags], stdout=subprocess.PIPE,
                          text=True, cwd=REPO)
  line = proc.stdout.readline()
  if "listening on" not in line:
    proc.kill()
    raise SystemExit(f"mmcl serve did not start: {line!r}")
  return proc, line.split("listening on ")[1].split()[0]


def _stop(proc: subprocess.Popen) -> None:
  proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()


async def _cell(url: str, path: str, bodies: list[dict], concurrency: int, duration: float,
                max_requests: int) -> dict:
  import aiohttp  # pylint: disable=g-import-not-at-top
  latencies: list[float] = []
  errors = 0
  sent = 0
  connector = aiohttp.TCPConnector(limit=concurrency)
  async with aiohttp.ClientSession(connector=connector) as session:
    async def one(i: int) -> float:
      start = time.perf_counter()
      async with session.post(url + path, json=bodies[i % len(bodies)]) as r:
        await r.read()
        if r.status != 200:
          raise RuntimeError(f"{path}: HTTP {r.status}")
      return time.perf_counter() - start

    for i in range(20):  # warm-up, not counted
      await one(i)
    deadline = time.perf_counter() + duration

    async def client():
      nonlocal sent, errors
      while sent < max_requests and time.perf_counter() < deadline:
        sent += 1
        try:
          latencies.append(await one(sent))
        except RuntimeError:
          errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
  lat = np.asarray(latencies) * 1000
  return {"requests": len(latencies), "errors": errors, "seconds": round(wall, 2),
          "requests_per_s": round(len(latencies) / wall, 1),
          "p50_ms": round(float(np.percentile(lat, 50)), 2),
          "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def main(argv=None) -> None:
  args = _parse(argv)
  sys.path.insert(0, str(REPO))
  from data_pipelines import image_text as data_lib  # pylint: disable=g-import-not-at-top
  source = data_lib.open_source(args.data, "test")
  captions = [r["caption"] for r in source.read_many(list(range(min(256, len(source)))))]
  export = pathlib.Path(args.export)
  corpora = [("quickstart", export)]
  scratch = tempfile.mkdtemp(prefix="mmcl-serve-bench-")
  try:
    if args.random_corpus:
      t0 = time.perf_counter()
      corpora.append((f"random {args.random_corpus:,}",
                      _random_corpus_export(export, args.random_corpus,
                                            pathlib.Path(scratch) / "random")))
      print(f"random corpus export built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = []
    for corpus_name, path in corpora:
      count = json.loads((path / "manifest.json").read_text())["corpus"]["images"]["count"]
      for batching in args.batching:
        proc, url = _start(path, batching)
        try:
          for route in args.routes:
            if route == "embed" and corpus_name != "quickstart":
              continue  # /embed does not touch the corpus
            bodies = ([{"tower": "text", "inputs": [c]} for c in captions] if route == "embed"
                      else [{"corpus": "images", "query": c, "k": 10} for c in captions])
            for c in args.concurrency:
              r = asyncio.run(_cell(url, f"/{route}", bodies, c, args.duration,
                                    args.max_requests))
              r.update({"route": f"/{route}", "corpus": f"{corpus_name} ({count:,})",
                        "batching": batching, "concurrency": c})
              rows.append(r)
              print(json.dumps(r), file=sys.stderr, flush=True)
        finally:
          _stop(proc)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print("| route | corpus | batching | concurrency | requests | requests/s | p50 ms | p99 ms |")
  print("|---|---|---|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['route']} | {r['corpus']} | {r['batching']} | {r['concurrency']} | "
          f"{r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
