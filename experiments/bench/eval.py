"""Benchmark of exact retrieval (`mmcl.eval.topk.exact_topk`): queries/s against an N x D corpus.

  .venv/bin/python experiments/bench/eval.py --corpus 100000 1000000 --dim 512 --queries 256
  .venv/bin/python experiments/bench/eval.py --corpus 10000000 --dim 512 --queries 1024  # GPU

For each corpus size N it draws N random unit vectors [N, D] directly on the devices (sharded over
"data" for --shard corpus, so no host copy and no device holds more than its slice), Q unit
queries, and times `exact_topk(queries, corpus, k)` over every local device:

  - the median wall time of --repeats runs after one warm-up run (compilation excluded, reported
    separately),
  - queries/s = Q / t and corpus items scored per second = Q · N / t,
  - the score TFLOP/s = 2 · Q · N · D / t (float32 inputs are scored at full float32 precision),
  - XLA's compiled memory per device (arguments + temporaries): it stays near N·D·bytes / S for
    the corpus slice plus O(query_chunk · corpus_chunk) whatever N is.

With --peers it instead compares, on the host CPU, in alternated rounds on the same float32 unit
vectors (generated with numpy): `exact_topk` as callers use it (backend "auto": FAISS on a CPU
host), its XLA path (backend "xla"), and FAISS as its users run it (`faiss.IndexFlatIP`, corpus
added once outside the timing, `index.search`). It reports the median seconds per call, the ratio
to FAISS, the machine's load average and whether the top-k indices are identical:

  .venv/bin/python experiments/bench/eval.py --peers --corpus 100000 1000000 --rounds 5

Each configuration is checked against a plain float64 argsort on a few queries (--check, on by
default) so a fast wrong answer cannot pass. A configuration that runs out of memory is reported
as OOM and the run goes on. Output: a Markdown table on stdout, and the rows as JSON with
--json PATH.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mmcl.parallel import mesh as mesh_lib
from mmcl.eval import topk


def _parse(argv: list[str] | None) -> argparse.Namespace:
  cpu = jax.default_backend() == "cpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--corpus", type=int, nargs="+",
                 default=[100_000, 1_000_000] if cpu else [1_000_000, 10_000_000],
                 help="corpus sizes N")
  p.add_argument("--dim", type=int, default=512, help="embedding dimension D")
  p.add_argument("--queries", type=int, default=256 if cpu else 1024, help="queries Q")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--corpus-chunk", type=int, default=8192)
  p.add_argument("--query-chunk", type=int, default=1024)
  p.add_argument("--shard", default="corpus", choices=topk.SHARD_MODES,
                 help="how the work is split over the local devices")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--check", type=int, default=4,
                 help="queries checked against a float64 argsort (0: no check)")
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  p.add_argument("--peers", action="store_true",
                 help="exact_topk (auto / xla) against faiss.IndexFlatIP on the host CPU")
  p.add_argument("--rounds", type=int, default=5, help="--peers: alternated rounds")
  return p.parse_args(argv)


def _device_line() -> str:
  return mesh_lib.describe_devices()


def _unit_vectors(key: jax.Array, rows: int, dim: int, dtype, sharding) -> jax.Array:
  """[rows, dim] random unit vectors in `dtype`, created already laid out as `sharding`."""
  def make(key):
    x = jax.random.normal(key, (rows, dim), jnp.float32)
    return (x * jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True))).astype(dtype)
  return jax.jit(make, out_shardings=sharding)(key)


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _check(queries, corpus, indices, num_check: int, k: int) -> None:
  """The first `num_check` queries' top-k must equal a float64 argsort (ties to lower index)."""
  q = np.asarray(queries[:num_check], np.float64)
  # Score in slices so that the float64 check itself stays small for a 10M corpus.
  scores = np.concatenate([q @ np.asarray(corpus[i:i + 1_000_000], np.float64).T
                           for i in range(0, corpus.shape[0], 1_000_000)], axis=1)
  ref = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores), axis=1)
  got = np.asarray(indices[:num_check])
  # float32 accumulation may swap items whose float64 scores differ by rounding only.
  ref_scores = np.take_along_axis(scores, ref[:, :k], 1)
  got_scores = np.take_along_axis(scores, got, 1)
  if not np.allclose(got_scores, ref_scores, rtol=0, atol=1e-5):
    raise AssertionError(f"exact_topk disagrees with the float64 argsort: {got} vs {ref[:, :k]}")


def _memory(queries, corpus, n: int, args, mesh, shard: str):
  """XLA's memory analysis of the compiled ranking (per device), or None where unsupported."""
  q_chunk, c_chunk = topk._chunk_sizes(args.queries, n, args.query_chunk, args.corpus_chunk,
                                       mesh.shape["data"], shard)
  spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)  # noqa: E731
  try:
    compiled = topk._exact_topk.lower(
        spec(queries), spec(corpus), jax.ShapeDtypeStruct((args.queries, 0), jnp.int32),
        k=args.k, num_corpus=n, corpus_chunk=c_chunk, query_chunk=q_chunk, mesh=mesh,
        shard=shard).compile()
    return compiled.memory_analysis()
  except Exception:  # noqa: BLE001 (memory analysis is best effort per backend)
    return None


def bench_one(n: int, args, mesh) -> dict:
  dtype = jnp.dtype(args.dtype)
  row = dict(corpus=n, dim=args.dim, queries=args.queries, k=args.k, dtype=args.dtype,
             shard=args.shard, corpus_chunk=args.corpus_chunk, query_chunk=args.query_chunk)
  shards = mesh.shape["data"]
  shard = topk._resolve_shard(args.shard, args.queries, n, mesh, "bench")
  # The corpus is born where exact_topk wants it: split over "data" (when N divides evenly;
  # otherwise exact_topk pads it, at the cost of one copy) or replicated.
  split = shard == "corpus" and n % shards == 0
  layout = NamedSharding(mesh, P("data") if split else P())
  k_c, k_q = jax.random.split(jax.random.key(n))
  try:
    corpus = _unit_vectors(k_c, n, args.dim, dtype, layout)
    queries = _unit_vectors(k_q, args.queries, args.dim, dtype, NamedSharding(mesh, P()))
    jax.block_until_ready((corpus, queries))
    fn = lambda: topk.exact_topk(  # noqa: E731
        queries, corpus, args.k, corpus_chunk=args.corpus_chunk, query_chunk=args.query_chunk,
        mesh=mesh, shard=shard)
    start = time.perf_counter()
    _, indices = jax.block_until_ready(fn())
    row["first_call_s"] = round(time.perf_counter() - start, 2)
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
  except Exception as e:  # noqa: BLE001 (an OOM is a result, anything else is re-raised)
    if not _is_oom(e):
      raise
    row["status"] = "OOM"
    return row
  t = statistics.median(times)
  if args.check:
    _check(queries, corpus, indices, min(args.check, args.queries), args.k)
  row.update(status="ok", ms=round(t * 1e3, 3), queries_per_s=round(args.queries / t, 2),
             items_per_s=args.queries * n / t,
             score_tflops=round(2 * args.queries * n * args.dim / t / 1e12, 4))
  mem = _memory(queries, corpus, n, args, mesh, shard)
  if mem is not None:
    row["device_MiB"] = round((mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20, 1)
    row["temp_MiB"] = round(mem.temp_size_in_bytes / 2**20, 1)
  return row


def _loadavg() -> str:
  return " ".join(open("/proc/loadavg").read().split()[:3])


def peers_one(n: int, args) -> dict:
  """Alternated rounds of exact_topk (auto, xla) and faiss.IndexFlatIP at one corpus size."""
  import faiss  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(n)

  def unit(rows):
    x = rng.standard_normal((rows, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x

  corpus, queries = unit(n), unit(args.queries)
  index = faiss.IndexFlatIP(args.dim)
  index.add(corpus)
  runs = {
      "exact_topk": lambda: np.asarray(topk.exact_topk(queries, corpus, args.k)[1]),
      "exact_topk xla": lambda: np.asarray(topk.exact_topk(queries, corpus, args.k,
                                                           backend="xla")[1]),
      "faiss IndexFlatIP": lambda: index.search(queries, args.k)[1],
  }
  results = {name: fn() for name, fn in runs.items()}  # warm-up (XLA compiles here)
  times = {name: [] for name in runs}
  loads = [_loadavg()]
  for r in range(args.rounds):
    names = list(runs) if r % 2 == 0 else list(runs)[::-1]
    for name in names:
      start = time.perf_counter()
      runs[name]()
      times[name].append(time.perf_counter() - start)
    loads.append(_loadavg())
  ref = results["faiss IndexFlatIP"]
  row = dict(corpus=n, dim=args.dim, queries=args.queries, k=args.k, rounds=args.rounds,
             loadavg=loads)
  for name, ts in times.items():
    t = statistics.median(ts)
    row[name] = dict(median_s=round(t, 4), all_s=[round(x, 4) for x in ts],
                     identical_topk=bool(np.array_equal(results[name], ref)))
  for name in runs:
    row[name]["speed_vs_faiss"] = round(row["faiss IndexFlatIP"]["median_s"]
                                        / row[name]["median_s"], 3)
  return row


def main_peers(args) -> list[dict]:
  import faiss  # pylint: disable=g-import-not-at-top
  print(f"# device: {_device_line()}; jax {jax.__version__}; faiss {faiss.__version__}; "
        f"D={args.dim} float32; Q={args.queries}; k={args.k}; {args.rounds} alternated rounds; "
        f"medians", flush=True)
  header = ("N", "method", "median s", "runs s", "speed vs FAISS", "top-k identical",
            "load avg (before; after each round)")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  rows = []
  for n in args.corpus:
    row = peers_one(n, args)
    rows.append(row)
    for name in ("exact_topk", "exact_topk xla", "faiss IndexFlatIP"):
      r = row[name]
      print(f"| {n} | {name} | {r['median_s']} | {' / '.join(map(str, r['all_s']))} | "
            f"{r['speed_vs_faiss']} | {r['identical_topk']} | {'; '.join(row['loadavg'])} |",
            flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=_device_line(), jax=jax.__version__, faiss=faiss.__version__,
                     rows=rows), f, indent=1)
  return rows


def main(argv: list[str] | None = None) -> list[dict]:
  args = _parse(argv)
  if args.peers:
    return main_peers(args)
  mesh = jax.make_mesh((len(jax.devices()),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  print(f"# device: {_device_line()}; jax {jax.__version__}; D={args.dim} {args.dtype}; "
        f"Q={args.queries}; k={args.k}; shard={args.shard}; chunks {args.query_chunk} queries x "
        f"{args.corpus_chunk} items", flush=True)
  header = ("N", "ms", "queries/s", "items scored/s", "score TFLOP/s", "device MiB (args+temp)",
            "temp MiB", "first call s")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  rows = []
  for n in args.corpus:
    row = bench_one(n, args, mesh)
    rows.append(row)
    items = f"{row['items_per_s']:.3g}" if "items_per_s" in row else "-"
    cells = (n, row.get("ms", row.get("status")), row.get("queries_per_s", "-"), items,
             row.get("score_tflops", "-"), row.get("device_MiB", "n/a"), row.get("temp_MiB", "n/a"),
             row.get("first_call_s", "-"))
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=_device_line(), jax=jax.__version__, rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
