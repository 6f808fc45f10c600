"""Every recipe exports: each task's towers, written by `export_task` from freshly initialised tiny
parameters, are reloaded by one fresh process with plain jax and numpy (no mmcl) that follows
only the manifests (item ids through item_ids.txt, ...), and reproduce the task's own embeddings.
One client process serves all recipes, so the JAX start-up is paid once."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import shared_runs

from mmcl.config import load_config_file
from mmcl.export import export_task, verify_export
from mmcl.tasks import get_task_class
from mmcl.train import loop as loop_lib
from mmcl.train.task import Task

REPO = pathlib.Path(__file__).resolve().parents[2]

# The serving side: each recipe folder holds export/ and raw.json ({tower: [raw input, ...]}).
CLIENT = r'''
import json, pathlib, sys
import numpy as np
import jax

def rows(pre, shape, dtype, export_dir, raw):
  kind = pre["input"]
  if kind in ("item_history", "item_id"):
    lines = (export_dir / pre["item_ids"]).read_text().splitlines()
    index = {item: j + 1 for j, item in enumerate(lines)}
    if kind == "item_id":
      return np.asarray([[index[r]] for r in raw], np.int32)
    out = np.zeros((len(raw), pre["max_len"]), np.int32)
    for i, history in enumerate(raw):
      recent = [index[h] for h in history][-pre["max_len"]:]
      out[i, pre["max_len"] - len(recent):] = recent
    return out
  return np.asarray(raw, dtype)  # the input array itself

root = pathlib.Path(sys.argv[1])
for case in sorted(p for p in root.iterdir() if (p / "raw.json").is_file()):
  export_dir = case / "export"
  manifest = json.loads((export_dir / "manifest.json").read_text())
  raw = json.loads((case / "raw.json").read_text())
  for name, tower in manifest["towers"].items():
    (inp,) = tower["inputs"]
    x = rows(tower["preprocessing"], inp["shape"], inp["dtype"], export_dir, raw[name])
    fn = jax.export.deserialize(bytearray((export_dir / tower["artifact"]).read_bytes()))
    np.save(case / f"served_{name}.npy", np.asarray(fn.call(x)))
print(json.dumps({"mmcl_imported": any(m.split(".")[0] == "mmcl" for m in sys.modules)}))
'''


def _task(config_spec: str, **overrides):
  c = load_config_file(str(REPO / "experiments" / config_spec))
  for key, value in overrides.items():
    c.set(key, value)
  mesh, task = loop_lib.setup(c, get_task_class(c.task.name))
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  return task, params


def _sasrec_like(task, params):
  """Raw inputs and the task's own embeddings of SASRec-style towers (user, item)."""
  from mmcl.eval import seqrec
  user_items, _ = seqrec.load_interactions(task.config.data.dir)
  _, history, _ = seqrec.eval_cases(user_items, "test", task.config.data.max_len)
  src_ids = [f"i{j}" for j in range(1, task.num_items + 1)]  # the planted data's item ids
  raw = {"user": [[src_ids[j - 1] for j in row if j] for row in history[:9]],
         "item": [src_ids[j - 1] for j in range(1, 10)]}
  table = np.asarray(jax.jit(task.item_table)(params))
  expected = {"user": task.user_embeddings(params, history[:9]), "item": table[1:10]}
  return raw, expected


def _sasrec(planted_seq_dir, **_):
  task, params = _task("sasrec.py:tiny", **{"data.dir": str(planted_seq_dir)})
  return (task, params) + _sasrec_like(task, params)


def _demure(text_seq_dir, **_):
  task, params = _task("demure.py:tiny", **{"data.dir": str(text_seq_dir)})
  return (task, params) + _sasrec_like(task, params)


def _mmsrec(group_seq_dir, **_):
  from mmcl.eval import seqrec
  task, params = _task("mmsrec.py:tiny", **{"data.dir": str(group_seq_dir)})
  user_items, _ = seqrec.load_interactions(task.config.data.dir)
  _, history, _ = seqrec.eval_cases(user_items, "test", task.config.data.max_len)
  items = np.arange(1, 10)
  content = np.concatenate([f[items] for f in task.net.features], axis=1)  # ID-free item input
  raw = {"user": [[f"i{j}" for j in row if j] for row in history[:9]], "item": content.tolist()}
  expected = {"user": np.asarray(jax.jit(task.net.query)(params, history[:9])),
              "item": np.asarray(jax.jit(task.net.item_tower)(params, items))}
  return task, params, raw, expected


def _gcl(products_dir, **_):
  task, params = _task("gcl.py:tiny", **{"data.dir": str(products_dir), "data.image_size": 16,
                                          "data.global_batch_size": 16,
                                          "model.image.patch_size": 8})
  batch, queries = task.export_inputs(task.config.task.eval_splits[0], rows=9)
  raw = {"query": queries["query"].tolist()}
  # Jitted: one compilation each instead of every tower op dispatched (and compiled) eagerly.
  embed_documents = jax.jit(task.towers.embed_documents)
  expected = {"query": np.asarray(jax.jit(task.towers.embed_queries)(params, queries["query"]))}
  for field in task.doc_fields:
    raw[f"doc_{field}"] = batch[field].tolist()
    # The task's fusion with only this field present is the field's own unit embedding.
    alone = {**batch, **{f"has_{f}": np.full(9, f == field) for f in task.doc_fields}}
    expected[f"doc_{field}"] = np.asarray(embed_documents(params, alone)[0])
  fused, _ = embed_documents(params, {k: v for k, v in batch.items()})
  expected["fused"] = np.asarray(fused)
  expected["present"] = {f: batch[f"has_{f}"] for f in task.doc_fields}
  return task, params, raw, expected


def _artists(artists_dir, **_):
  from data_pipelines.recipes import artists
  from mmcl.tasks.artist_retrieval import evaluate as artist_eval
  from mmcl.tasks.artist_retrieval.model import artist_rows
  task, params = _task("artist_retrieval.py:tiny", **{"data.dir": str(artists_dir)})
  cat = artists.read_split(artists_dir, "catalogue")
  raw, expected = {}, {}
  proj = task.net.embed_catalogue(params, cat)  # the evaluator's projections of the catalogue
  for m in task.modalities:
    rows = np.flatnonzero(cat[f"has_{m}"])[:9]
    raw[m], expected[m] = cat[m][rows].tolist(), proj[m][rows]
  # The evaluator's artist embedding: the mean of the available projections, re-normalised;
  # rows 0..11 include artists with missing modalities.
  avail = {m: cat[f"has_{m}"] for m in task.modalities}
  fused = artist_eval.l2_normalize(sum(proj[m] * avail[m][:, None] for m in task.modalities))
  assert not all(np.all(avail[m][:12]) for m in task.modalities)
  raw["artist"] = artist_rows(cat, task.modalities)[:12].tolist()
  expected["artist"] = fused[:12]
  return task, params, raw, expected


def _loev(variant):
  def build(**_):
    task, params = _task(f"loev.py:{variant}")
    t = np.arange(task.out_samples) / task.config.data.sample_rate
    audio = np.stack([0.3 * np.sin(2 * np.pi * f * t) * np.exp(-d * t)
                      for f, d in zip((220, 330, 440, 550, 660, 880, 990), (0, 1, 2, 3, 4, 5, 6))]
                     ).astype(np.float32)
    reps = task.net.embed(params, audio, batch_size=8)  # the evaluator's representations
    expected = {"whole": reps["whole"]}
    for name in task.head_names():
      expected[name] = reps[f"sub/{name}"]
      if f"head/{name}" in reps:
        expected[f"head_{name}"] = reps[f"head/{name}"]
    return task, params, {k: audio.tolist() for k in expected}, expected
  return build


RECIPES = {"sasrec": _sasrec, "demure": _demure, "mmsrec": _mmsrec, "gcl": _gcl,
           "artists": _artists, "loev": _loev("tiny"), "loev++": _loev("tiny_plusplus")}


@pytest.fixture(scope="module")
def served(request, tmp_path_factory):
  root = tmp_path_factory.mktemp("recipes")
  data = tmp_path_factory.mktemp("recipe_data")
  fixtures = {name: request.getfixturevalue(name) for name in ("planted_seq_dir",
                                                               "group_seq_dir")}
  from data_pipelines.recipes import products
  fixtures["products_dir"] = data / "products"
  products.build_products_dataset(fixtures["products_dir"], num_docs=80, num_queries=50,
                                  eval_queries=8, max_position=20, num_shards=1, image_size=16,
                                  seed=0)
  from data_pipelines.recipes import artists
  facts = artists.write_planted_sources(data / "artist_sources")
  fixtures["artists_dir"] = data / "artists"
  artists.build_artist_dataset(facts["sas"], facts["hetrec"], fixtures["artists_dir"], cf_dim=8,
                               tag_dim=8, text_encoder="tfidf", text_dim=16, drop_fraction=0.2,
                               test_fraction=0.1, val_fraction=0.1, seed=0)
  write_planted = request.getfixturevalue("write_planted")
  fixtures["text_seq_dir"] = write_planted(data / "text_seq", with_text=True)
  cases = {}
  for name, build in RECIPES.items():
    task, params, raw, expected = build(**fixtures)
    (root / name).mkdir()
    manifest = export_task(task, params, root / name / "export", platforms=("cpu",),
                           corpus=type(task).export_corpus is not Task.export_corpus)
    (root / name / "raw.json").write_text(json.dumps(raw))
    cases[name] = (manifest, expected)
  env = shared_runs.env(root, devices=1)  # one CPU device, the run's compile options and cache
  proc = subprocess.run([sys.executable, "-c", CLIENT, str(root)], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"mmcl_imported": False}
  return root, cases


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_export_reloaded_without_mmcl_reproduces_the_tasks_embeddings(served, recipe):
  root, cases = served
  manifest, expected = cases[recipe]
  assert verify_export(root / recipe / "export") == manifest
  fused, present = expected.pop("fused", None), expected.pop("present", None)
  if fused is not None:  # GCL: the multi-field document, fused as the manifest says
    fusion = manifest["towers"]["doc_title"]["preprocessing"]["fusion"]
    parts = [np.load(root / recipe / f"served_{t}.npy") for t in fusion["fields"]]
    w = np.asarray(fusion["weights"])[:, None] * np.stack(
        [present[t.removeprefix("doc_")] for t in fusion["fields"]]).astype(np.float64)
    e = np.sum(w[..., None] * np.stack(parts), axis=0) / w.sum(0)[:, None]
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(e, fused, atol=2e-5)
  assert set(manifest["towers"]) == set(expected)
  for name, want in expected.items():
    got = np.load(root / recipe / f"served_{name}.npy")
    assert got.shape == want.shape and manifest["towers"][name]["output"]["dim"] == want.shape[1]
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"{recipe} {name}")
    assert np.ptp(want, axis=0).max() > 1e-4, (recipe, name)  # inputs differ, embeddings too
  for name, corpus in manifest["corpus"].items():
    emb = np.load(root / recipe / "export" / corpus["embeddings"])
    assert emb.shape == (corpus["count"], corpus["dim"]) and np.all(np.isfinite(emb))
    assert corpus["query_tower"] in manifest["towers"]
