"""The trainer's config keys, each declared (and documented) here.

Task modules add their own `task.*`, `model.*` and `data.*` keys (see `mmcl.tasks`); an experiment
file starts from `mmcl.tasks.make_config(name)`, which is this base plus the task's keys.
"""

from __future__ import annotations

from typing import Any

from mmcl.config import Config


def base_config() -> Config:
  """Returns a Config holding every trainer key with its default."""
  c = Config("mmcl training job")
  c.define("seed", 0, "PRNG seed for parameter init, dropout and the data order")

  t = c.section("task", "the method: how a batch becomes embeddings and a loss")
  t.define("name", "clip", "the method: a name registered in mmcl.tasks (e.g. clip) or "
           "'package.module:Class', a Task subclass in a package of your own")

  c.section("model", "the task's towers (keys declared by the task)")
  d = c.section("data", "the task's data (keys declared by the task; these are common)")
  d.define("dir", "data/shapes", "dataset directory (ArrayRecord shards + metadata.json)")
  d.define("global_batch_size", 256, "examples per optimizer step over all devices and hosts",
           bounds=(1, None))
  d.define("num_epochs", None, "epochs to stream; None = repeat forever", type=(int, type(None)),
           bounds=(1, None))
  d.define("worker_count", 0, "grain worker processes per host decoding the training batches, "
           "for ArrayRecord datasets and streamed sources alike (0 = in-process threads); each "
           "worker hands its batches over through its own ring of persistent shared-memory "
           "slots (data_pipelines.shm_batches), so 2 workers are at least as fast as the threads "
           "even on a 2-core host (BENCHMARKS.md); the batches do not depend on it",
           bounds=(0, None))
  d.define("skip_bad_records", False, "skip (and count) undecodable records instead of failing")

  tr = c.section("train", "the training loop")
  tr.define("total_steps", 1000, "optimizer steps to run", bounds=(1, None))
  tr.define("grad_accum_steps", 1,
            "split each global batch into this many micro-batches and sum their gradients "
            "(each micro-batch sees only its own in-batch negatives)", bounds=(1, None))
  tr.define("grad_cache", False,
            "with grad_accum_steps > 1: gradient caching (Gao et al. 2021) — embed every micro-batch "
            "without gradients, take the loss over the whole global batch, then backpropagate each "
            "micro-batch with its embedding gradients: the full batch's in-batch negatives and "
            "gradients at the memory of one micro-batch (needs Task.embed/loss_from_embeddings)")
  tr.define("compute_dtype", "float32", "dtype of activations and matmuls in the towers",
            choices=("float32", "bfloat16"))
  tr.define("log_every", 10, "steps between metric log lines (JSONL, TensorBoard, progress bar)",
            bounds=(1, None))
  tr.define("checkpoint_every", 100, "steps between checkpoints (the final step is always saved)",
            bounds=(1, None))
  tr.define("keep_checkpoints", 3, "keep the newest N checkpoints", bounds=(1, None))
  tr.define("keep_best", 1, "also keep the best N checkpoints by train.best_metric (0 = off)",
            bounds=(0, None))
  tr.define("best_metric", "val/loss", "metric (computed at each checkpoint) ranking checkpoints")
  tr.define("best_mode", "min", "whether a smaller or larger best_metric is better",
            choices=("min", "max"))
  tr.define("val_batches", 4, "held-out batches evaluated at each checkpoint for best_metric "
            "(0 = none, then only the newest checkpoints are kept)", bounds=(0, None))
  tr.define("async_checkpointing", True, "write checkpoints in the background")
  tr.define("progress_bar", True, "print a progress line with ETA to stderr")
  tr.define("stop_after_steps", None, "stop early after this many steps of this invocation "
            "(for tests of resume; the schedule still uses total_steps)", type=(int, type(None)),
            bounds=(1, None))
  tr.define("init_from", None, "fork: WORKDIR or WORKDIR:STEP of another run whose checkpoint "
            "(params, optimizer state, step, data iterator) this run starts from when its own "
            "workdir has none yet (warm-ups, ablations sharing a prefix); STEP defaults to that "
            "run's newest", type=(str, type(None)))

  o = c.section("optim", "optimizer and learning-rate schedule (optax)")
  o.define("name", "adamw", "optimizer", choices=("adamw", "adam", "sgd", "lamb"))
  o.define("lr", 1e-3, "peak learning rate", bounds=(0.0, None))
  o.define("weight_decay", 0.1, "decoupled weight decay (adamw/lamb); not applied to biases, norms, "
           "embeddings' scale parameters", bounds=(0.0, None))
  o.define("b1", 0.9, "Adam beta1 / SGD momentum", bounds=(0.0, 1.0))
  o.define("b2", 0.98, "Adam beta2", bounds=(0.0, 1.0))
  o.define("eps", 1e-6, "Adam epsilon", bounds=(0.0, None))
  o.define("schedule", "cosine", "learning-rate schedule after warm-up",
           choices=("cosine", "linear", "constant"))
  o.define("warmup_steps", 100, "linear warm-up steps from 0 to lr", bounds=(0, None))
  o.define("end_lr_ratio", 0.0, "final lr as a fraction of lr (cosine/linear)", bounds=(0.0, None))
  o.define("grad_clip_norm", 1.0, "clip gradients to this global norm (None = off)",
           type=(float, type(None)), bounds=(0.0, None))

  m = c.section("mesh", "device mesh and parameter sharding")
  m.define("data", -1, "size of the data axis (-1 = all devices / mesh.model)")
  m.define("model", 1, "size of the model axis", bounds=(1, None))
  m.define("param_sharding", "replicate", "how parameters and optimizer state are sharded",
           choices=("replicate", "fsdp"))

  dist = c.section("distributed", "multi-process start-up (jax.distributed.initialize)")
  dist.define("coordinator_address", None, "host:port of process 0; None = single process or the "
              "cluster's environment", type=(str, type(None)))
  dist.define("num_processes", None, "number of processes", type=(int, type(None)))
  dist.define("process_id", None, "this process's index", type=(int, type(None)))
  return c


def data_view(config: Config, **overrides: Any) -> dict[str, Any]:
  """The data section plus the global seed as the plain mapping `data_pipelines` reads."""
  view = {k.split(".", 1)[1]: v for k, v in config.data.items()}
  view["seed"] = config.seed
  view.update(overrides)
  return view


def task_config(task_class: Any, saved: dict[str, Any] | None = None) -> Config:
  """The trainer's keys plus those `task_class` (a `mmcl.train.task.Task` subclass) declares, at
  their defaults, then the values of `saved` (a `Config.to_dict()`, e.g. workdir/config.json)."""
  c = base_config()
  if saved is not None:
    c.task.name = saved.get("task", {}).get("name", c.task.name)
  task_class.declare_config(c)
  if saved is not None:
    c.update_from_dict(saved)
  return c
