"""Input-pipeline throughput on the CPU: examples/s per core for each example kind.

  .venv/bin/python experiments/bench/data.py [--shared ../shared/data] [--work /tmp/mmcl_bench]

Each pipeline's batch function runs in this one thread (no prefetch threads, no workers), so
examples/s is per CPU core. Measured:
  * image_text at 224 px: JPEG decode + random-resized-crop + flip + normalise + token padding
    (fashion-product-images, converted with `--format image-captions`);
  * interactions: SASRec next-item rows and BERT4Rec masked rows (amazon-videogames-sasrec);
  * audio log-mel of [32, 10 s at 16 kHz]: host numpy vs the jitted JAX function (CPU backend);
  * the quickstart pipeline (shapes, 32 px, batch 256): time per batch;
  * with `--sources`: the same fashion pairs streamed from webdataset shards, a tfds ArrayRecord
    build and parquet files (`data.source`), 224 px, decode + random-resized-crop + flip +
    normalise + tokenise (captions tokenised on the fly), beside the ArrayRecord path above.
Prints one JSON line per measurement.

With --worker-count W it instead times whole training iterators in wall-clock examples/s, each
with data.worker_count = 0 and then W (grain worker processes decoding and augmenting): the
ArrayRecord path (`pipelines.build_train_iterator`, as `mmcl train` builds it) and a streamed
webdataset source (`pairs.ImageTextData`, one decode thread per batch, so the workers are the only
parallelism) over the fashion pairs at 224 px, after --warmup batches (worker start-up excluded):

  .venv/bin/python experiments/bench/data.py --worker-count 2 [--timed-batches 30]

With --peers it instead times, side by side, three input pipelines feeding the same training
batches (224 x 224, random-resized-crop 0.08-1 + flip, batch 64) from the two photo sets of
`photo_sets.py` (the shared fashion photos as they are, and re-encoded at 800 x 800, quality 90),
each in its own process and, for the peers, its own virtual environment that this script creates
under --cache (nothing is installed into mmcl's environment):

  .venv/bin/python experiments/bench/data.py --peers [--cache /tmp/mmcl_peers] [--rounds 3]
      [--peer_batches 40] [--pipelines mmcl "mmcl workers=2"]

  mmcl            `pipelines.build_train_iterator` as `mmcl train` builds it (uint8 batches, 2 grain
                  threads each decoding its batch's images in data.decode_threads threads, by
                  default one per core; and with data.worker_count = 2 worker processes, 2
                  decode threads each)
  tf.data         big_vision-style (peers/tfdata_runner.py; tensorflow-cpu), float32 normalised
                  output, and the same with uint8 output
  open_clip       open_clip_train's webdataset loader with 2 DataLoader workers
                  (peers/openclip_runner.py; open_clip_torch + torchvision + webdataset on the CPU
                  torch build)

The runs are alternated (the order rotates every round), warm-up batches are excluded, and each
prints examples/s in total and per busy core (examples per CPU second of its process tree) with
the load average; the summary gives medians over the rounds and the ratios of mmcl to each peer.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from data_pipelines import audio  # noqa: E402
from data_pipelines import convert  # noqa: E402
from data_pipelines import image_text  # noqa: E402
from data_pipelines import pipelines  # noqa: E402
from data_pipelines.sources import pairs as pairs_lib  # noqa: E402
from data_pipelines.sources import write as write_lib  # noqa: E402


def _rate(fn, n_examples: int, repeats: int) -> float:
  fn(0)  # warm-up (opens shard readers, JIT compiles)
  t0 = time.perf_counter()
  for r in range(1, repeats + 1):
    fn(r)
  return n_examples * repeats / (time.perf_counter() - t0)


_PEER_VENVS = {
    "tfdata": ["tensorflow-cpu>=2.16"],
    # open_clip_train's webdataset code needs the 0.2 series (its training requirements pin it).
    "openclip": ["torch==2.13.0", "torchvision==0.28.0", "open_clip_torch>=3.0",
                 "webdataset>=0.2.5,<=0.2.86", "pandas", "braceexpand"],
}


def _peer_python(cache: pathlib.Path, name: str) -> str:
  """The python of the peer's virtual environment, created (with its packages) when missing."""
  import subprocess  # pylint: disable=g-import-not-at-top
  venv = cache / f"venv-{name}"
  stamp = venv / "mmcl_bench_packages.json"
  if not (stamp.is_file() and json.loads(stamp.read_text()) == _PEER_VENVS[name]):
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *_PEER_VENVS[name]], check=True)
    stamp.write_text(json.dumps(_PEER_VENVS[name]))
  return str(venv / "bin" / "python")


def _run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict:
  import subprocess  # pylint: disable=g-import-not-at-top
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def peers(args) -> None:
  import statistics  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  import photo_sets  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[2]
  here = pathlib.Path(__file__).resolve().parent / "peers"
  cache = pathlib.Path(args.cache)
  sets = photo_sets.build(pathlib.Path(args.shared) / "fashion-product-images", cache)
  wanted = args.pipelines or ["mmcl", "mmcl workers=2", "tf.data", "tf.data uint8", "open_clip"]
  tf_py = _peer_python(cache, "tfdata") if any(n.startswith("tf.data") for n in wanted) else ""
  oc_py = _peer_python(cache, "openclip") if "open_clip" in wanted else ""
  env = dict(os.environ, PYTHONPATH=str(repo))
  common = ["--batches", str(args.peer_batches), "--warmup", "3"]
  runners = {
      "mmcl": lambda d: [sys.executable, str(here / "mmcl_runner.py"), str(d / "mmcl"), *common],
      "mmcl workers=2": lambda d: [sys.executable, str(here / "mmcl_runner.py"), str(d / "mmcl"),
                                   *common, "--worker_count", "2"],
      "tf.data": lambda d: [tf_py, str(here / "tfdata_runner.py"), str(d), *common],
      "tf.data uint8": lambda d: [tf_py, str(here / "tfdata_runner.py"), str(d), *common,
                                  "--uint8"],
      "open_clip": lambda d: [oc_py, str(here / "openclip_runner.py"), str(d), *common,
                              "--workers", "2"],
  }
  unknown = sorted(set(wanted) - set(runners))
  if unknown:
    raise SystemExit(f"--pipelines: unknown {unknown}; known: {list(runners)}")
  names = [n for n in runners if n in wanted]
  results = {(s, n): [] for s in sets for n in names}
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    print(json.dumps({"round": r, "order": order, "loadavg_before": _loadavg()}), flush=True)
    for set_name, root in sets.items():
      for name in order:
        row = _run_json(runners[name](root), env)
        row.update(set=set_name, pipeline=name, round=r)
        results[(set_name, name)].append(row)
        print(json.dumps(row), flush=True)
  for set_name in sets:
    med = {n: statistics.median(x["examples_per_s"] for x in results[(set_name, n)])
           for n in names}
    per_core = {n: statistics.median(x["examples_per_s_per_busy_core"]
                                     for x in results[(set_name, n)]) for n in names}
    summary = {"summary": set_name, "median_examples_per_s": med,
               "median_examples_per_s_per_busy_core": per_core}
    for key, peer in (("mmcl_vs_tfdata", "tf.data"), ("mmcl_vs_tfdata_uint8", "tf.data uint8"),
                      ("mmcl_vs_open_clip", "open_clip")):
      if "mmcl" in med and peer in med:
        summary[key] = round(med["mmcl"] / med[peer], 3)
    if "mmcl" in med and "mmcl workers=2" in med:
      pairs = list(zip(results[(set_name, "mmcl workers=2")], results[(set_name, "mmcl")]))
      summary["mmcl_workers_vs_threads"] = round(med["mmcl workers=2"] / med["mmcl"], 3)
      summary["mmcl_workers_vs_threads_per_round"] = [
          round(w["examples_per_s"] / t["examples_per_s"], 3) for w, t in pairs]
    summary["loadavg"] = _loadavg()
    print(json.dumps(summary), flush=True)
  _machine()


def _loadavg() -> list[str]:
  return open("/proc/loadavg").read().split()[:3]


def main() -> None:
  repo = pathlib.Path(__file__).resolve().parents[2]
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shared", default=str(repo.parent / "shared" / "data"))
  p.add_argument("--work", default="/tmp/mmcl_bench")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=8)
  p.add_argument("--sources", action="store_true",
                 help="also measure the webdataset, tfds and parquet sources (image_text only)")
  p.add_argument("--only-image-text", action="store_true",
                 help="skip the interactions, audio and shapes measurements")
  p.add_argument("--peers", action="store_true", help="mmcl vs tf.data vs open_clip (see above)")
  p.add_argument("--worker-count", type=int, default=0,
                 help="time iterators with data.worker_count 0 and this (see above)")
  p.add_argument("--timed-batches", type=int, default=30, help="--worker-count: batches timed")
  p.add_argument("--warmup", type=int, default=4, help="--worker-count: batches not timed")
  p.add_argument("--cache", default="/tmp/mmcl_peers",
                 help="--peers: photo sets, TFRecords, shards and peer environments")
  p.add_argument("--rounds", type=int, default=3, help="--peers: alternated rounds")
  p.add_argument("--peer_batches", type=int, default=40, help="--peers: timed batches per run")
  p.add_argument("--pipelines", nargs="+", default=None,
                 help="--peers: run only these (mmcl, 'mmcl workers=2', tf.data, "
                      "'tf.data uint8', open_clip; default all)")
  args = p.parse_args()
  if args.peers:
    peers(args)
    return
  shared, work = pathlib.Path(args.shared), pathlib.Path(args.work)
  results = []

  def report(**kw):
    results.append(kw)
    print(json.dumps(kw), flush=True)

  fashion = shared / "fashion-product-images"
  if args.worker_count:
    _worker_counts(fashion, work, args, report)
    return _machine()
  if fashion.is_dir():
    convert.convert("image-captions", fashion / "styles.csv", work / "fashion",
                    image_root=str(fashion / "images"), caption_column="productDisplayName",
                    id_column="id", split_by="holdout:0.1")
    cfg = {"dir": str(work / "fashion"), "global_batch_size": args.batch, "seed": 0,
           "image_size": 224, "max_text_len": 32}
    ds, _ = pipelines.build_train_dataset(cfg)
    report(kind="image_text", what="decode+rrc+flip+normalize+tokens @224px, 1 thread",
           examples_per_s_per_core=round(_rate(lambda t: ds[t], args.batch, args.repeats), 1))
    if args.sources:
      _streamed_sources(fashion, work, ds, args.batch, args.repeats, report)
  if args.only_image_text:
    return _machine()
  video = shared / "amazon-videogames-sasrec" / "Video.txt"
  if video.is_file():
    convert.convert("sasrec", video, work / "video")
    for mode in ("next_item", "masked"):
      cfg = {"dir": str(work / "video"), "global_batch_size": 256, "seed": 0, "max_len": 50,
             "sequence_mode": mode}
      ds, _ = pipelines.build_train_dataset(cfg)
      report(kind="interactions", what=f"{mode} rows, L=50, 1 thread",
             examples_per_s_per_core=round(_rate(lambda t: ds[t], 256, args.repeats), 1))
  lm = audio.LogMel()
  wave = np.random.default_rng(0).normal(size=(32, 160000)).astype(np.float32)
  host = _rate(lambda t: lm.numpy(wave), 32, 3)
  dev = _rate(lambda t: np.asarray(lm.jax(wave)), 32, 3)
  report(kind="audio_clip", what="log-mel [32, 10 s @16 kHz] -> [32, 998, 64]",
         host_numpy_clips_per_s=round(host, 1), jax_jit_cpu_clips_per_s=round(dev, 1))
  shapes = work / "shapes"
  image_text.build_shapes_dataset(shapes)
  src = image_text.open_source(shapes, "train")
  ds = image_text.train_dataset(src, global_batch_size=256, seed=0, max_text_len=40,
                                augment=True)
  rate = _rate(lambda t: ds[t], 256, args.repeats)
  report(kind="image_text (quickstart shapes 32 px)", what="batch 256, augment, 1 thread",
         examples_per_s_per_core=round(rate, 1), ms_per_batch=round(256 / rate * 1e3, 2))
  _machine()


def _machine() -> None:
  cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
              if l.startswith("model name")), "?")
  print(json.dumps({"cpu": cpu, "cores": os.cpu_count(),
                    "loadavg": open("/proc/loadavg").read().split()[:3]}))


def _paired_cpu_rates(fn_a, fn_b, n_examples: int, repeats: int) -> tuple[float, float]:
  """Examples per CPU-second of this thread of two batch functions, timed alternately batch by
  batch so that a loaded machine's drift (memory bandwidth, other processes) hits both alike."""
  fn_a(0)
  fn_b(0)
  spent = [0.0, 0.0]
  for r in range(1, repeats + 1):
    for k, fn in enumerate((fn_a, fn_b)):
      t0 = time.thread_time()
      fn(r)
      spent[k] += time.thread_time() - t0
  return n_examples * repeats / spent[0], n_examples * repeats / spent[1]


def _streamed_sources(fashion: pathlib.Path, work: pathlib.Path, arrayrecord_ds, batch: int,
                      repeats: int, report) -> None:
  """The fashion pairs (original 224 px JPEGs, as stored) written once in each format with its
  own writer, then read through `data.source` pipelines in this one thread, each beside the
  ArrayRecord path (`arrayrecord_ds`), timed alternately with it in CPU time."""
  import csv  # pylint: disable=g-import-not-at-top
  with open(fashion / "styles.csv", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  prs = [(r["id"], (fashion / "images" / r["image"]).read_bytes(), r["productDisplayName"])
         for r in rows]
  out = work / "sources"
  specs = {}
  if not (out / "wds").is_dir():
    write_lib.write_webdataset(prs, out / "wds", per_shard=500)
  specs["webdataset"] = f"webdataset:{out}/wds/*.tar"
  if not (out / "pq").is_dir():
    write_lib.write_parquet(prs, out / "pq", per_file=500, row_group_size=100)
  specs["parquet"] = f"parquet:{out}/pq/*.parquet"
  if not (out / "tfds").is_dir():
    write_lib.write_tfds({"train": prs}, out / "tfds", name="fashion_pairs")
  specs["tfds"] = f"tfds:fashion_pairs:train@{out}/tfds"
  for name, spec in specs.items():
    data = pairs_lib.ImageTextData(spec, seed=0, image_size=224, max_text_len=32,
                                   holdout_fraction=0.1, shuffle_buffer=1000,
                                   cache_dir=str(out / "cache"), decode_threads=1)
    ds = data.train_dataset(global_batch_size=batch)
    if name == "tfds":
      fn = lambda t, ds=ds: ds[t]  # noqa: E731
    else:
      it = iter(ds)
      fn = lambda t, it=it: next(it)  # noqa: E731
    base, rate = _paired_cpu_rates(lambda t: arrayrecord_ds[1000 + t], fn, batch, repeats)
    report(kind=f"image_text source {name}",
           what="read+decode+rrc+flip+normalize+tokenize @224px, 1 thread, per CPU-second",
           examples_per_s_per_core=round(rate, 1),
           arrayrecord_examples_per_s_per_core=round(base, 1),
           ratio_to_arrayrecord=round(rate / base, 3))


def _fashion_pairs_sources(fashion: pathlib.Path, work: pathlib.Path) -> None:
  """The fashion set as an ArrayRecord dataset and as webdataset shards (built once)."""
  convert.convert("image-captions", fashion / "styles.csv", work / "fashion",
                  image_root=str(fashion / "images"), caption_column="productDisplayName",
                  id_column="id", split_by="holdout:0.1")
  if not (work / "sources" / "wds").is_dir():
    import csv  # pylint: disable=g-import-not-at-top
    with open(fashion / "styles.csv", encoding="utf-8") as f:
      rows = list(csv.DictReader(f))
    write_lib.write_webdataset(
        [(r["id"], (fashion / "images" / r["image"]).read_bytes(), r["productDisplayName"])
         for r in rows], work / "sources" / "wds", per_shard=500)


def _wall_rate(it, batch: int, warmup: int, timed: int) -> float:
  for _ in range(warmup):
    next(it)
  t0 = time.perf_counter()
  for _ in range(timed):
    next(it)
  return batch * timed / (time.perf_counter() - t0)


def _worker_counts(fashion: pathlib.Path, work: pathlib.Path, args, report) -> None:
  """Wall-clock examples/s of the ArrayRecord and the webdataset training iterators with
  worker_count 0 and args.worker_count (same batches either way)."""
  _fashion_pairs_sources(fashion, work)

  def measure(it, workers: int, kind: str, what: str) -> None:
    rate = _wall_rate(it, args.batch, args.warmup, args.timed_batches)
    if workers:
      it.close()
    report(kind=kind, worker_count=workers, what=what, examples_per_s=round(rate, 1),
           loadavg=open("/proc/loadavg").read().split()[:3])

  for workers in (0, args.worker_count):
    cfg = {"dir": str(work / "fashion"), "global_batch_size": args.batch, "seed": 0,
           "image_size": 224, "max_text_len": 32, "worker_count": workers, "num_threads": 2,
           "prefetch_buffer_size": 4}
    measure(pipelines.build_train_iterator(cfg), workers, "image_text arrayrecord iterator",
            "decode+rrc+flip+tokens @224px, 2 read threads, wall clock")
    data = pairs_lib.ImageTextData(f"webdataset:{work}/sources/wds/*.tar", seed=0,
                                   image_size=224, max_text_len=32, holdout_fraction=0.1,
                                   shuffle_buffer=1000, cache_dir=str(work / "sources" / "cache"),
                                   decode_threads=1)
    measure(data.train_iterator(global_batch_size=args.batch, worker_count=workers), workers,
            "image_text source webdataset iterator",
            "read+decode+rrc+flip+tokenize @224px, 1 decode thread, wall clock")

if __name__ == "__main__":
  main()
