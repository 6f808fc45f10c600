"""GCL task: fusion, weights, the reference metrics, the loss wiring, a planted weighting effect
and a tiny end-to-end train + evaluate."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data_pipelines.recipes import products
from mmcl.config import load_config_file
from mmcl.eval import metrics as metrics_lib
from mmcl.losses import infonce
from mmcl.parallel import mesh as mesh_lib
from mmcl.tasks import get_task_class
from mmcl.tasks.gcl.evaluate import (SplitTable, gcl_metrics, relevance_grades,
                                     sample_eval_queries)
from mmcl.tasks.gcl.loss import score_weights
from mmcl.tasks.gcl.model import fuse_fields

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "gcl.py"


def test_fuse_fields_renormalises_over_present_fields():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(3, 4, 5)).astype(np.float32)
  present = np.asarray([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0]], bool)
  w = np.asarray([0.5, 0.3, 0.2], np.float32)
  fused, valid = fuse_fields(jnp.asarray(e), jnp.asarray(present), jnp.asarray(w))
  unit = e / np.linalg.norm(e, axis=-1, keepdims=True)
  for b in range(3):
    ww = w * present[:, b]
    ref = (ww[:, None] * unit[:, b]).sum(0) / ww.sum()
    np.testing.assert_allclose(fused[b], ref / np.linalg.norm(ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(valid, [True, True, True, False])
  np.testing.assert_array_equal(fused[3], 0.0)


def test_score_weights():
  batch = {"query": jnp.zeros((4, 2), jnp.int32),
           "score_linear": jnp.asarray([1.0, 0.5, 0.25, 0.25]),
           "score_reciprocal": jnp.asarray([1.0, 0.5, 0.2, 0.1])}
  np.testing.assert_allclose(score_weights(batch, "score_linear"), [2.0, 1.0, 0.5, 0.5])
  np.testing.assert_allclose(score_weights(batch, "score_reciprocal", normalize=False),
                             [1.0, 0.5, 0.2, 0.1])
  np.testing.assert_allclose(score_weights(batch, "no_score"), 1.0)
  with pytest.raises(ValueError, match="task.score_to_weight"):
    score_weights(batch, "linear")


def test_relevance_grades_and_query_sampling():
  np.testing.assert_array_equal(relevance_grades(np.asarray([0.01, 0.505, 1.0, 0.5])),
                                [1, 50, 100, 50])
  np.testing.assert_array_equal(relevance_grades(np.asarray([0.3, 0.3])), [1, 1])
  rel_sum = np.asarray([1.0, 100.0, 3.0, 50.0, 2.0])
  chosen = sample_eval_queries(rel_sum, 3, seed=1)
  assert len(set(chosen.tolist())) == 3 and np.all(np.diff(rel_sum[chosen]) <= 0)
  assert len(sample_eval_queries(rel_sum, 10, seed=1)) == 5


def _reference_metrics(run, qrels, p_values=(0.7, 0.8, 0.9)):
  """The GCL eval script's formulas, loop by loop over dicts (ERR/RBP as evals/eval_gs_v1.py;
  NDCG@10 as trec_eval ndcg_cut with linear gain; MAP/MRR binary at 1000)."""
  out = {k: [] for k in ("ndcg", "map", "mrr", "err", *[f"rbp{p}" for p in p_values])}
  for q, judged in qrels.items():
    docs = run[q]
    max_rel = max(judged.values())
    rels = [judged.get(d, 0) for d in docs]
    dcg = sum(r / math.log2(i + 2) for i, r in enumerate(rels[:10]))
    ideal = sorted(judged.values(), reverse=True)[:10]
    out["ndcg"].append(dcg / sum(r / math.log2(i + 2) for i, r in enumerate(ideal)))
    hits, ap = 0, 0.0
    for i, r in enumerate(rels[:1000]):
      if r > 0:
        hits += 1
        ap += hits / (i + 1)
    out["map"].append(ap / sum(1 for v in judged.values() if v > 0))
    first = next((i for i, r in enumerate(rels[:1000]) if r > 0), None)
    out["mrr"].append(0.0 if first is None else 1.0 / (first + 1))
    err, p_stop = 0.0, 1.0
    for rank, r in enumerate(rels, start=1):
      prob = (2**r - 1) / 2**max_rel
      err += p_stop * prob / rank
      p_stop *= 1 - prob
    out["err"].append(err)
    for p in p_values:
      out[f"rbp{p}"].append((1 - p) * sum(r / max_rel * p**(i) for i, r in enumerate(rels)))
  return {k: float(np.mean(v)) for k, v in out.items()}


def test_gcl_metrics_match_the_reference_formulas():
  rng = np.random.default_rng(0)
  num_q, num_docs, k = 12, 60, 40
  ranked = np.stack([rng.permutation(num_docs)[:k] for _ in range(num_q)])
  ranked[0, -5:] = -1  # a short run
  judged = []
  for _ in range(num_q):
    docs = rng.choice(num_docs, size=rng.integers(1, 15), replace=False)
    judged.append({int(d): int(rng.integers(1, 101)) for d in docs})
  qrels = metrics_lib.Qrels.from_dict(judged)
  got = {k: metrics_lib.mean_over_judged(v) for k, v in gcl_metrics(ranked, qrels).items()}
  run = {q: [int(d) for d in ranked[q] if d >= 0] for q in range(num_q)}
  ref = _reference_metrics(run, dict(enumerate(judged)))
  assert set(got) == {"ndcg@10", "map@1000", "mrr@1000", "err", "rbp.7", "rbp.8", "rbp.9"}
  for mine, theirs in (("ndcg@10", "ndcg"), ("map@1000", "map"), ("mrr@1000", "mrr"),
                       ("err", "err"), ("rbp.7", "rbp0.7"), ("rbp.8", "rbp0.8"),
                       ("rbp.9", "rbp0.9")):
    assert got[mine] == pytest.approx(ref[theirs], rel=1e-9, abs=1e-12), mine


def test_weighting_ranks_the_higher_graded_document_first():
  """Planted: each query has a strong (w=1) and a weak (w=0.1) relevant document. Free embeddings
  trained with the weighted loss put the strong one first; the unweighted loss cannot tell them
  apart (ERR / NDCG@10 of graded judgments then favour the weighted model)."""
  num_q, dim = 16, 8
  q_ids = np.repeat(np.arange(num_q), 2)
  d_ids = np.arange(2 * num_q)
  scores = np.tile([1.0, 0.1], num_q).astype(np.float32)
  groups = jnp.asarray(np.stack([q_ids, 1000 + d_ids], 1), jnp.int32)

  def train(weighted: bool) -> tuple[np.ndarray, np.ndarray]:
    key = jax.random.PRNGKey(0)
    params = {"q": 0.1 * jax.random.normal(key, (num_q, dim)),
              "d": 0.1 * jax.random.normal(jax.random.fold_in(key, 1), (2 * num_q, dim))}
    w = jnp.asarray(scores if weighted else np.ones_like(scores))

    def loss_fn(p):
      norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
      return infonce(norm(p["q"][q_ids]), norm(p["d"][d_ids]), logit_scale=10.0, weights=w,
                     group_ids=groups)

    opt = optax.adam(0.05)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
      value, grads = jax.value_and_grad(loss_fn)(p)
      updates, s = opt.update(grads, s)
      return optax.apply_updates(p, updates), s, value

    for _ in range(150):
      params, state, _ = step(params, state)
    qe = params["q"] / np.linalg.norm(params["q"], axis=-1, keepdims=True)
    de = params["d"] / np.linalg.norm(params["d"], axis=-1, keepdims=True)
    return np.asarray(qe), np.asarray(de)

  judged = [{2 * q: 100, 2 * q + 1: 1} for q in range(num_q)]
  qrels = metrics_lib.Qrels.from_dict(judged)
  results = {}
  for weighted in (True, False):
    qe, de = train(weighted)
    ranked = np.argsort(-(qe @ de.T), axis=1, kind="stable")
    results[weighted] = {k: metrics_lib.mean_over_judged(v)
                         for k, v in gcl_metrics(ranked, qrels).items()}
    strong_first = np.mean(ranked[:, 0] == 2 * np.arange(num_q))
    if weighted:
      assert strong_first == 1.0
  assert results[True]["err"] > results[False]["err"] + 0.15
  assert results[True]["ndcg@10"] > results[False]["ndcg@10"] + 0.05


@pytest.fixture(scope="module")
def tiny_products(tmp_path_factory):
  out = tmp_path_factory.mktemp("gcl_products")
  products.build_products_dataset(out, num_docs=80, num_queries=50, eval_queries=8,
                                  max_position=20, num_shards=2, image_size=16, seed=0)
  return out


def _tiny_config(data_dir, *variants):
  c = load_config_file(f"{CONFIG}:" + ",".join(("tiny",) + variants))
  c.data.dir = str(data_dir)
  c.data.image_size = 16
  c.data.global_batch_size = 16
  c.model.image.patch_size = 8
  return c


def test_loss_is_the_weighted_gcl_loss_with_duplicates_masked(tiny_products):
  from mmcl.tasks.gcl.task import GCLTask
  c = _tiny_config(tiny_products)
  mesh = mesh_lib.make_mesh(-1, 1)
  task = GCLTask(c, mesh)
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  batch = next(task.train_iterator(0, 1))
  g = mesh_lib.host_batch_to_global(mesh, batch)
  loss, _ = jax.jit(lambda p, b: task.loss(p, b, jax.random.PRNGKey(1), train=False))(params, g)
  # Reference: dense numpy GCL loss from the task's own embeddings (each tower one program).
  q = np.asarray(jax.jit(task.towers.embed_queries)(params, jnp.asarray(batch["query"])),
                 np.float64)
  d = np.asarray(jax.jit(lambda p, b: task.towers.embed_documents(p, b)[0])(
      params, {k: jnp.asarray(v) for k, v in batch.items()}), np.float64)
  s = float(np.exp(params["log_logit_scale"]))
  logits = s * q @ d.T
  qg, dg = batch["query_gid"], batch["doc_gid"]
  dup = (qg[:, None] == qg[None, :]) | (dg[:, None] == dg[None, :])
  allowed = ~dup | np.eye(len(qg), dtype=bool)
  lse = lambda z, m, ax: np.log(np.sum(np.where(m, np.exp(z), 0.0), axis=ax))
  per_pair = 0.5 * (lse(logits, allowed, 1) + lse(logits, allowed, 0)) - np.diag(logits)
  w = batch["score_linear"] / batch["score_linear"].mean()
  np.testing.assert_allclose(float(loss), np.sum(w * per_pair) / np.sum(w), rtol=2e-5)
  assert dup.sum() > len(qg)  # the batch really has duplicates to mask


def test_config_errors_name_the_key(tiny_products):
  from mmcl.config import ConfigError
  from mmcl.tasks.gcl.task import GCLTask
  c = _tiny_config(tiny_products)
  c.model.doc_field_weights = (1.0, 1.0)
  with pytest.raises(ConfigError, match="model.doc_field_weights"):
    GCLTask(c, mesh_lib.make_mesh(-1, 1))


def test_tiny_train_and_evaluate(tiny_products, tmp_path):
  from mmcl.eval.evaluator import run_evaluator
  from mmcl.tasks.gcl.task import GCLTask
  from mmcl.train.loop import train
  c = _tiny_config(tiny_products)
  c.train.total_steps = 12
  c.train.checkpoint_every = 12
  c.train.log_every = 3
  c.optim.lr = 3e-3
  c.task.eval_splits = ("zero_shot",)
  train(c, tmp_path, GCLTask)
  losses = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [m["loss"] for m in losses if "loss" in m]
  assert losses[-1] < losses[0]
  metrics = run_evaluator(str(tmp_path), resolve_task=get_task_class)
  for split in c.task.eval_splits:
    for name in ("ndcg@10", "map@100", "mrr@100", "err", "rbp.7", "rbp.8", "rbp.9"):
      assert 0.0 <= metrics[f"{split}/{name}"] <= 1.0
    assert metrics[f"{split}/num_queries"] == 8
    run = (tmp_path / "eval" / "12" / f"{split}.run").read_text().splitlines()
    assert len(run) == 8 * min(100, int(metrics[f"{split}/num_documents"]))


def _chance_metrics(task, split: str, trials: int = 200) -> dict[str, float]:
  """The split's metrics (as `evaluate_split` computes them) for uniformly random rankings."""
  t = task.config.task
  source, _ = products.open_split(task.data.data_dir, split)
  table = SplitTable(source)
  rel_sum = np.bincount(table.pairs[:, 0], weights=table.rel, minlength=len(table.query_ids))
  chosen = sample_eval_queries(rel_sum, t.eval_queries, t.eval_seed)
  qrels = table.qrels(chosen, t.eval_top_k)
  rng = np.random.default_rng(0)
  n_docs = len(table.doc_ids)
  sums: dict[str, float] = {}
  for _ in range(trials):
    ranked = np.stack([rng.permutation(n_docs) for _ in chosen])[:, :t.eval_top_k]
    for name, v in gcl_metrics(ranked, qrels, cutoff=t.eval_top_k).items():
      sums[name] = sums.get(name, 0.0) + metrics_lib.mean_over_judged(v) / trials
  source.close()
  return sums


def test_pretrained_locked_text_tower(tiny_products, minilm_folder):
  """MiniLM (locked) + a trainable projection, on 8 devices: batches hold the tower's WordPiece ids
  of the raw texts; training changes only the projection (and the logit scale), frozen parameters
  have no optimizer state; the trained model beats random rankings by a wide margin."""
  from mmcl.models.lock import count_frozen
  from mmcl.tasks.gcl.task import GCLTask
  from mmcl.train.loop import build_state
  from mmcl.train.step import make_train_step
  c = _tiny_config(tiny_products, "minilm", "title_only")
  c.model.pretrained_text.folder = str(minilm_folder)
  c.data.max_text_len = 16
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 0
  c.train.total_steps = 6
  c.task.eval_batch_size = 16
  mesh = mesh_lib.make_mesh(-1, 1)
  assert mesh.devices.size == 8
  task = GCLTask(c, mesh)
  it = task.train_iterator(0, 1)
  batch = next(it)
  source, _ = products.open_split(tiny_products, "train")
  rec = source.read_many([int(batch["index"][0])])[0]
  want = task.text_tokenizer.encode(rec["query"]).ids  # [CLS] ... [SEP]
  assert want[0] == 101 and want[-1] == 102
  np.testing.assert_array_equal(batch["query"][0, :len(want)], want)
  assert np.all(batch["query"][0, len(want):] == task.pad_id)

  state_fn, _, shardings, tx, schedule = build_state(c, task, mesh)
  state = state_fn()
  before = jax.tree.map(np.asarray, state.params)
  step = jax.jit(make_train_step(task.loss, tx, schedule, mesh=mesh),
                 in_shardings=(shardings, mesh_lib.batch_sharding(mesh)), donate_argnums=0)
  losses = []
  for _ in range(c.train.total_steps):
    state, m = step(state, mesh_lib.host_batch_to_global(mesh, batch))
    losses.append(float(m["loss"]))
    batch = next(it)
  assert losses[-1] < losses[0]
  frozen = task.frozen_params_filter
  n_frozen, n_trained = count_frozen(state.params, frozen)
  assert n_trained == 384 * 16 + 1  # the projection head and the logit scale
  state_elements = sum(int(np.size(x)) for x in jax.tree.leaves(state.opt_state))
  assert 2 * n_trained <= state_elements < 2 * n_trained + 16
  paths = ["/".join(str(getattr(k, "key", k)) for k in p)
           for p, _ in jax.tree_util.tree_flatten_with_path(before)[0]]
  for path, old, new in zip(paths, jax.tree.leaves(before), jax.tree.leaves(state.params)):
    if frozen(path):
      np.testing.assert_array_equal(np.asarray(new), old, err_msg=path)
    elif path.startswith("text/head"):
      assert not np.allclose(np.asarray(new), old), path
  loaded = task._pretrained_params  # pylint: disable=protected-access
  np.testing.assert_array_equal(before["text"]["encoder"]["block_5"]["fc2"]["kernel"],
                                loaded["encoder"]["block_5"]["fc2"]["kernel"])

  got = task.evaluate_split(state.params, "in_domain")
  chance = _chance_metrics(task, "in_domain")
  assert got["in_domain/ndcg@10"] > chance["ndcg@10"] + 0.25, (got, chance)
  assert got["in_domain/err"] > chance["err"] + 0.1, (got, chance)


def test_pretrained_text_config_errors_name_the_key(tiny_products, minilm_folder, tmp_path):
  from mmcl.config import ConfigError
  from mmcl.tasks.gcl.task import GCLTask
  c = _tiny_config(tiny_products, "minilm")
  c.model.pretrained_text.folder = str(tmp_path / "absent")
  with pytest.raises(ConfigError, match="model.pretrained_text.folder"):
    GCLTask(c, mesh_lib.make_mesh(-1, 1))
  c.model.pretrained_text.folder = str(minilm_folder)
  c.model.pretrained_text.lock = "top"
  c.model.pretrained_text.unlocked_blocks = 7
  with pytest.raises(ConfigError, match="model.pretrained_text.unlocked_blocks"):
    GCLTask(c, mesh_lib.make_mesh(-1, 1))
