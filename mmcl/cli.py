"""The `mmcl` command line.

  mmcl train --config experiments/clip_shapes.py[:arg] --workdir DIR [--set key=value ...]
  mmcl eval  --workdir DIR [--step N] [--watch [--poll S] [--timeout S]] [--set key=value --tag T]
  mmcl export --workdir DIR [--step N] --out DIR [--format onnx] [--corpus [--index faiss[:KIND]]]
              [--overwrite]
  mmcl serve EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--runtime auto|onnx|jax]
             [--max-batch-size 64] [--max-wait-ms 0]
  mmcl export --tower FOLDER --out DIR [--max-length N] [--dtype bfloat16]   (pretrained tower)
  mmcl sweep --config F --workdir DIR --grid key=v1,v2 [--grid key2=...] [--set key=value ...]
             [--seeds 0,1,2] [--parallel K]                       (here, K elements at a time)
  mmcl sweep --launcher slurm ... [--max-parallel K] [SLURM options]  (one job array + a table job)
  mmcl sweep --collect --workdir DIR          (results.csv / results.md from the elements so far)
  mmcl launch --launcher slurm --config F --workdir DIR [--nodes N] [--tasks-per-node T]
              [--gpus-per-node G] [--partition P] [--account A] [--time T] [--sbatch-arg=...]
              [--setup 'module load ...'] [--set key=value ...] [--eval [--eval-gpus G]] [--dry-run]
  mmcl data  build NAME --output DIR [...]   (shapes, products, fashion-search, artists, music)
  mmcl data  build-shapes --output DIR [--num-train N] [--num-test N] [--image-size P]
  mmcl data  convert --format F --input PATH --output DIR [--split-by ...]   (see --help)
  mmcl features --tower FOLDER|WORKDIR[:NAME]|EXPORT[:NAME] --input DATASET|FILE --field NAME
                --output PATH [--split S] [--dtype bfloat16] [--step N]
  mmcl checkpoints WORKDIR                   (every checkpoint step: valid / corrupt / unverified)
  mmcl train --config F --help-config        (every key with its type, default and doc)

Bad input (a config key, a file, a record, a corrupt checkpoint) is one line on stderr and exit code
2; non-finite values (a diverged run, NaN embeddings) exit with 3. `mmcl --debug ...` (or
MMCL_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _configure_logging() -> None:
  logging.basicConfig(level=os.environ.get("MMCL_LOG_LEVEL", "INFO"),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
  for noisy in ("jax._src", "orbax", "grain", "faiss", "aiohttp.access"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notices go through absl


def _load_config(spec: str, overrides: list[str]):
  from mmcl.config import load_config_file
  if spec.endswith(".json"):  # a resolved config: a workdir's config.json, a launch script's copy
    from mmcl.launch.common import load_config_json
    config = load_config_json(spec)
  else:
    config = load_config_file(spec)
  for o in overrides or []:
    config.override(o)
  return config


def cmd_train(args) -> int:
  config = _load_config(args.config, args.set)
  if args.help_config:
    print(config.describe())
    return 0
  from mmcl.tasks import get_task_class
  from mmcl.train.loop import train
  from mmcl.train.preemption import EXIT_CODE, Preempted
  if args.eval and not _one_process(config):
    print("mmcl train: error: --eval evaluates in the training process, which needs a "
          "single-process run; evaluate a multi-process run with its own `mmcl eval --workdir` "
          "(or `mmcl launch ... --eval`)", file=sys.stderr)
    return 2
  try:
    train(config, args.workdir, get_task_class(config.task.name))
  except Preempted as e:
    print(f"mmcl train: {e}", file=sys.stderr)
    return EXIT_CODE
  if args.eval:
    from mmcl.eval.evaluator import run_evaluator
    run_evaluator(args.workdir, resolve_task=get_task_class)
  return 0


def _one_process(config) -> bool:
  """Whether `mmcl train` runs as a single JAX process (no distributed.* settings and no
  multi-task launcher environment)."""
  if (config.distributed.num_processes or 1) > 1:
    return False
  for var in ("SLURM_STEP_NUM_TASKS", "JAX_NUM_PROCESSES", "OMPI_COMM_WORLD_SIZE"):
    value = os.environ.get(var, "")
    if value.isdigit() and int(value) > 1:
      return False
  return True


def cmd_eval(args) -> int:
  from mmcl.eval.evaluator import run_evaluator
  from mmcl.tasks import get_task_class
  if args.set and not args.tag:
    print("mmcl eval: error: --set needs --tag NAME (results then go to WORKDIR/eval-NAME/, apart "
          "from the default protocol's eval/)", file=sys.stderr)
    return 2
  run_evaluator(args.workdir, step=args.step, watch=args.watch, poll_seconds=args.poll,
                timeout_seconds=args.timeout, overrides=args.set or [], tag=args.tag,
                resolve_task=get_task_class)
  return 0


def cmd_export(args) -> int:
  from mmcl.export import ExportError, export_workdir
  from mmcl.pretrained.export import export_pretrained
  from mmcl.tasks import get_task_class
  if (args.workdir is None) == (args.tower is None):
    print("mmcl export: error: pass exactly one of --workdir DIR (a trained checkpoint) and "
          "--tower FOLDER (a pretrained model folder)", file=sys.stderr)
    return 2
  try:
    if args.workdir is not None:
      manifest = export_workdir(args.workdir, args.out, step=args.step, corpus=args.corpus,
                                platforms=tuple(args.platforms), overwrite=args.overwrite,
                                fmt=args.format, index=args.index, resolve_task=get_task_class)
    else:
      if args.index is not None:
        raise ExportError("--index needs a trained workdir's corpus (--workdir ... --corpus)")
      manifest = export_pretrained(args.tower, args.out, max_length=args.max_length,
                                   dtype=args.dtype, platforms=tuple(args.platforms),
                                   overwrite=args.overwrite, fmt=args.format)
  except (FileExistsError, NotImplementedError, ExportError) as e:
    print(f"mmcl export: error: {e}", file=sys.stderr)
    return 2
  towers = ", ".join(f"{name} → {t['artifact']} (dim {t['output']['dim']})"
                     for name, t in manifest["towers"].items())
  what = f"step {manifest['step']}" if manifest["step"] is not None else str(args.tower)
  print(f"{what}: {towers}; manifest {args.out}/manifest.json")
  for name, t in manifest["towers"].items():
    if "onnx" in t:
      check = t["onnx"]["check"]
      print(f"  {name} → {t['onnx']['artifact']}: ONNX Runtime vs JAX at batch "
            f"{check['batch_sizes']}: min cosine {check['min_cosine']:.7f}, max |diff| "
            f"{check['max_abs_diff']:.2e}")
  for name, c in manifest["corpus"].items():
    print(f"  corpus {name}: {c['count']} × {c['dim']} → {args.out}/{c['embeddings']}")
    if "index" in c:
      check = {k: v for k, v in c["index"]["check"].items() if k not in ("reference",)}
      print(f"    faiss {c['index']['kind']} index → {args.out}/{c['index']['file']}: {check}")
  return 0


def cmd_serve(args) -> int:
  from mmcl.serve import ServeConfig, run_server
  run_server(args.export_dir, ServeConfig(
      host=args.host, port=args.port, max_batch_size=args.max_batch_size,
      max_wait_ms=args.max_wait_ms, runtime=args.runtime, max_k=args.max_k,
      max_request_bytes=args.max_request_bytes))
  return 0


def cmd_checkpoints(args) -> int:
  from mmcl.train.checkpoint import list_checkpoints
  rows = list_checkpoints(args.workdir)
  if not rows:
    print(f"no checkpoints in {args.workdir}")
    return 0
  for r in rows:
    why = f"  ({r['reason']})" if r["reason"] else ""
    print(f"{str(r['step']):>8}  {r['status']:<11} {r['path']}{why}")
  return 0


def cmd_sweep(args) -> int:
  from mmcl.launch.commands import sweep_command
  return sweep_command(args)


def cmd_data(args) -> int:
  if args.data_command == "build":
    if args.name == "shapes":  # the built-in set keeps its own options (as `data build-shapes`)
      return cmd_data(build_parser().parse_args(["data", "build-shapes", *args.args]))
    import importlib
    from data_pipelines.recipes import BUILDERS
    kwargs = {}
    if args.name == "artists":  # biographies embedded by the pretrained text tower (--text-encoder)
      from mmcl.pretrained.text import encode_texts
      kwargs["encode_texts"] = encode_texts
    result = importlib.import_module(BUILDERS[args.name]).main(args.args, **kwargs)
    return result if isinstance(result, int) else 0
  if args.data_command == "build-shapes":
    from data_pipelines.image_text import build_shapes_dataset
    info = build_shapes_dataset(args.output, num_train=args.num_train, num_test=args.num_test,
                                image_size=args.image_size, seed=args.seed)
    counts = {k: v["num_examples"] for k, v in info["splits"].items()}
    print(f"shapes dataset in {args.output}: {counts}, vocab {info['vocab_size']} tokens")
    return 0
  if args.data_command == "convert":
    from data_pipelines import convert
    opts = {k: v for k, v in vars(args).items()
            if k not in ("command", "data_command", "fn", "format", "input", "output")}
    meta = convert.convert(args.format, args.input, args.output, **opts)
    counts = {k: v["num_examples"] for k, v in meta["splits"].items()}
    print(f"{args.format} → {args.output}: kind {meta['kind']}, splits {counts}")
    return 0
  raise SystemExit(f"unknown data command {args.data_command!r}")


def cmd_features(args) -> int:
  from mmcl.pretrained.features import compute_features, output_paths
  from mmcl.tasks import get_task_class
  try:
    result = compute_features(
        args.tower, args.input, args.field, args.output, tower_name=args.tower_name,
        step=args.step, split=args.split, batch_size=args.batch_size,
        max_length=args.max_length, dtype=args.dtype, param_sharding=args.param_sharding,
        chunk_size=args.chunk_size, id_field=args.id_field, overwrite=args.overwrite,
        resolve_task=get_task_class)
  except (ValueError, FileExistsError) as e:
    print(f"mmcl features: error: {e}", file=sys.stderr)
    return 2
  m = result.manifest
  done = ("already complete" if result.rows_computed == 0
          else f"{result.rows_computed} rows embedded")
  print(f"features → {output_paths(args.output)['npy']}: {m['count']} × {m['dim']} ({done})")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mmcl", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--debug", action="store_true",
                 help="show the traceback of an error (also MMCL_DEBUG=1)")
  sub = p.add_subparsers(dest="command", required=True)
  from mmcl.launch import commands as launch_commands

  t = sub.add_parser("train", help="train (or resume) a job in a workdir")
  t.add_argument("--config", required=True, help="experiments/<file>.py[:arg]")
  t.add_argument("--workdir", help="output directory; an existing one is resumed")
  t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
  t.add_argument("--help-config", action="store_true", help="list every config key and exit")
  t.add_argument("--eval", action="store_true",
                 help="then evaluate the final checkpoint in this process, as `mmcl eval "
                      "--workdir` does (single-process runs; saves starting a second process)")
  t.set_defaults(fn=cmd_train)

  e = sub.add_parser("eval", help="evaluate checkpoints of a workdir in this (separate) process")
  e.add_argument("--workdir", required=True)
  e.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  e.add_argument("--watch", action="store_true", help="evaluate each new checkpoint once")
  e.add_argument("--poll", type=float, default=10.0, help="seconds between checks in --watch")
  e.add_argument("--timeout", type=float, default=None,
                 help="--watch: stop after this many seconds without a new checkpoint")
  e.add_argument("--set", action="append", metavar="KEY=VALUE",
                 help="change an evaluation setting of the saved config (e.g. "
                      "task.eval_num_negatives=99); needs --tag")
  e.add_argument("--tag", default=None,
                 help="write results to WORKDIR/eval-TAG/ instead of WORKDIR/eval/")
  e.set_defaults(fn=cmd_eval)

  x = sub.add_parser("export", help="write jax.export serving artifacts of a checkpoint's towers "
                                    "(--workdir) or of a pretrained folder's tower (--tower)")
  x.add_argument("--workdir", help="a `mmcl train` workdir")
  x.add_argument("--tower", help="a pretrained folder: Hugging Face BERT family or open_clip ViT")
  x.add_argument("--max-length", type=int, default=256,
                 help="--tower text models: tokens per text (the artifact's sequence length)")
  x.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="--tower: compute dtype")
  x.add_argument("--step", type=int, help="checkpoint step (default: newest)")
  x.add_argument("--out", required=True, help="output directory (artifacts + manifest.json)")
  x.add_argument("--corpus", action="store_true",
                 help="also write the task's corpus embeddings with their ids")
  x.add_argument("--platforms", nargs="+", default=["cpu", "cuda"],
                 help="platforms the artifacts are lowered for")
  x.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  x.add_argument("--format", default="jax", choices=("jax", "onnx"),
                 help="jax: jax.export artifacts (default); onnx: also <tower>.onnx models, each "
                      "checked against JAX with ONNX Runtime at batch 1 and 7")
  x.add_argument("--index", default=None, metavar="faiss[:flat|ivf|hnsw]",
                 help="with --corpus: a FAISS index of each corpus (flat = exact)")
  x.set_defaults(fn=cmd_export)

  v = sub.add_parser("serve", help="answer /embed and /search over HTTP from an `mmcl export` "
                                   "directory")
  v.add_argument("export_dir", help="an `mmcl export` directory (manifest.json)")
  v.add_argument("--host", default="127.0.0.1")
  v.add_argument("--port", type=int, default=8000)
  v.add_argument("--runtime", default="auto", choices=("auto", "jax", "onnx"),
                 help="run the towers' jax.export artifacts or their ONNX models (auto: ONNX "
                      "when the export has them)")
  v.add_argument("--max-batch-size", type=int, default=64,
                 help="inputs of concurrent requests run together, up to this many (1: no "
                      "request batching)")
  v.add_argument("--max-wait-ms", type=float, default=0.0,
                 help="how long the first request of a batch waits for others to join it (0: "
                      "batch only the requests that queued while the previous call ran)")
  v.add_argument("--max-k", type=int, default=1000, help="largest k a /search may ask for")
  v.add_argument("--max-request-bytes", type=int, default=16 << 20,
                 help="largest request body accepted")
  v.set_defaults(fn=cmd_serve)

  k = sub.add_parser("checkpoints", help="list a workdir's checkpoint steps with their integrity "
                                         "(valid / corrupt / unverified / quarantined)")
  k.add_argument("workdir")
  k.set_defaults(fn=cmd_checkpoints)

  s = sub.add_parser("sweep", help="train every combination of a grid (× seeds); writes "
                                    "results.csv/.md with means and standard errors over seeds")
  s.add_argument("--config")
  s.add_argument("--workdir", required=True)
  s.add_argument("--grid", action="append", metavar="KEY=V1,V2")
  s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run")
  s.add_argument("--no-eval", action="store_true", help="skip the evaluator after each run")
  launch_commands.add_sweep_options(s)
  s.set_defaults(fn=cmd_sweep)
  launch_commands.add_launch_parser(sub)

  d = sub.add_parser("data", help="build or convert datasets")
  dsub = d.add_subparsers(dest="data_command", required=True)
  from data_pipelines.recipes import BUILDERS
  bn = dsub.add_parser("build", help="build a recipe's dataset (data_pipelines/recipes/): "
                                     + ", ".join(["shapes", *BUILDERS]),
                       description="`mmcl data build NAME --help` lists NAME's options")
  bn.add_argument("name", choices=["shapes", *BUILDERS])
  bn.add_argument("args", nargs=argparse.REMAINDER, help="the builder's own options")
  b = dsub.add_parser("build-shapes", help="the built-in procedural image–caption set")
  b.add_argument("--output", required=True)
  b.add_argument("--num-train", type=int, default=5000)
  b.add_argument("--num-test", type=int, default=1000)
  b.add_argument("--image-size", type=int, default=32)
  b.add_argument("--seed", type=int, default=0)
  from data_pipelines import convert
  convert.build_parser(dsub.add_parser("convert", help="convert a public format to ArrayRecord"))
  d.set_defaults(fn=cmd_data)

  f = sub.add_parser("features", help="precompute embeddings of a dataset's text or image field")
  f.add_argument("--tower", required=True,
                 help="a pretrained folder (Hugging Face BERT family, open_clip ViT), a `mmcl "
                      "train` workdir or an `mmcl export` directory; WORKDIR:NAME picks a tower")
  f.add_argument("--tower-name", help="tower of a workdir / export (e.g. text, image)")
  f.add_argument("--step", type=int, help="workdir checkpoint step (default: newest)")
  f.add_argument("--input", required=True,
                 help="a converted dataset folder (metadata.json), JSONL ({id, <field>}) or a "
                      "text file (one text per line)")
  f.add_argument("--field", required=True, help="text or image field to embed")
  f.add_argument("--output", required=True, help="output path stem (PATH.npy/.ids.txt/.json)")
  f.add_argument("--split", help="dataset split (default: every split with the field)")
  f.add_argument("--id-field", default=None,
                 help="id field (default by dataset kind, 'id' for JSONL; 'index' = record index)")
  f.add_argument("--batch-size", type=int, default=256)
  f.add_argument("--max-length", type=int, default=256,
                 help="pretrained text towers: tokens per text")
  f.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (the output is float32)")
  f.add_argument("--param-sharding", default="replicate", choices=("replicate", "fsdp"),
                 help="pretrained weights on the mesh (as config mesh.param_sharding)")
  f.add_argument("--chunk-size", type=int, default=8192,
                 help="rows between resumable progress records")
  f.add_argument("--overwrite", action="store_true")
  f.set_defaults(fn=cmd_features)
  return p


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.command == "train" and not args.help_config and not args.workdir:
    raise SystemExit("mmcl train: --workdir is required")
  _configure_logging()
  debug = args.debug or os.environ.get("MMCL_DEBUG", "") not in ("", "0")
  try:
    return args.fn(args)
  except Exception as e:
    code = None if debug else _exit_code(e)
    if code is None:
      raise
    # The message names the file / record / field / key / step; no traceback needed.
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"mmcl {args.command}: error: {message}", file=sys.stderr)
    return code


def _exit_code(e: BaseException) -> int | None:
  """2 for bad input, 3 for non-finite values, None for anything else (a bug: traceback)."""
  from data_pipelines.converters.common import ConversionError
  from data_pipelines.records import CorruptRecordError, MetadataError
  from mmcl.config import ConfigError
  from mmcl.eval.finite import NonFiniteError
  from mmcl.launch.slurm import SubmitError
  from mmcl.train.checkpoint import CorruptCheckpointError, NoUsableCheckpointError
  from mmcl.train.loop import NonFiniteLossError
  if isinstance(e, (NonFiniteLossError, NonFiniteError)):
    return 3
  if isinstance(e, (ConfigError, FileNotFoundError, FileExistsError, CorruptRecordError,
                    MetadataError, ConversionError, CorruptCheckpointError,
                    NoUsableCheckpointError, SubmitError)):
    return 2
  return None


if __name__ == "__main__":
  sys.exit(main())
