"""`mmcl export`: artifacts that a fresh process with plain jax (no mmcl) turns back into mmcl's
embeddings, from raw pixels and caption strings, following only the manifest."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import shared_runs

from data_pipelines import image_text as data_lib
from data_pipelines import tokenizer as tokenizer_lib
from mmcl import cli
from mmcl.export import verify_export
from mmcl.train.task import Task

REPO = pathlib.Path(__file__).resolve().parents[2]

# The serving side: what BUILD.md tells a serving stack to do, with jax, numpy and tokenizers only.
CLIENT = r'''
import hashlib, json, pathlib, sys
import numpy as np
import jax
from tokenizers import Tokenizer

out, inputs, results = (pathlib.Path(a) for a in sys.argv[1:4])
manifest = json.loads((out / "manifest.json").read_text())
for rel, entry in manifest["files"].items():
  assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == entry["sha256"], rel
towers = {name: jax.export.deserialize(bytearray((out / t["artifact"]).read_bytes()))
          for name, t in manifest["towers"].items()}

# Image tower: uint8 RGB pixels, normalised inside the tower when the manifest says so.
pre = manifest["towers"]["image"]["preprocessing"]
pixels = np.load(inputs / "pixels.npy")
if pre.get("normalized_in_model"):
  images = pixels.astype(np.uint8)
else:
  images = pixels.astype(np.float32) * np.asarray(pre["scale"], np.float32) \
      - np.asarray(pre["shift"], np.float32)

# Text tower: tokenizer.json + the manifest's padding / truncation rule.
pre = manifest["towers"]["text"]["preprocessing"]
tok = Tokenizer.from_file(str(out / pre["tokenizer"]))
ids = np.full((0, pre["max_len"]), pre["pad_id"], np.int32)
rows = []
for enc in tok.encode_batch(json.loads((inputs / "captions.json").read_text())):
  seq = enc.ids
  if len(seq) > pre["max_len"]:
    seq = seq[:pre["max_len"] - 1] + [pre["eos_id"]]
  rows.append(seq + [pre["pad_id"]] * (pre["max_len"] - len(seq)))
ids = np.asarray(rows, np.int32)

def embed(name, x, batch):
  # Any batch size works (symbolic "b"): serve in uneven batches.
  return np.concatenate([np.asarray(towers[name].call(x[i:i + batch]))
                         for i in range(0, len(x), batch)])

for name, x in (("image", images), ("text", ids)):
  whole, pieces = embed(name, x, len(x)), embed(name, x, 7)
  assert whole.shape == (len(x), manifest["towers"][name]["output"]["dim"])
  assert np.abs(whole - pieces).max() <= 1e-6
  np.save(results / f"{name}.npy", whole)
np.save(results / "ids.npy", ids)
print(json.dumps({"mmcl_imported": any(m.split(".")[0] == "mmcl" for m in sys.modules),
                  "platform": jax.devices()[0].platform}))
'''


def test_manifest_describes_inputs_outputs_files_and_config(exported, shapes_dir):
  out, manifest = exported
  assert manifest == json.loads((out / "manifest.json").read_text())
  assert manifest["format"] == "mmcl.export/1" and manifest["step"] == 3
  assert manifest["task"] == "clip" and manifest["config"]["model"]["embed_dim"] == 32
  image, text = manifest["towers"]["image"], manifest["towers"]["text"]
  assert image["inputs"] == [{"name": "image", "shape": ["b", 32, 32, 3], "dtype": "uint8"}]
  assert text["inputs"] == [{"name": "token_ids", "shape": ["b", 40], "dtype": "int32"}]
  for tower in (image, text):
    assert tower["output"] == {"shape": ["b", 32], "dim": 32, "dtype": "float32",
                               "l2_normalized": True, "similarity": "inner product (= cosine)"}
    assert tower["platforms"] == ["cpu", "cuda"]
  assert image["preprocessing"]["mean"] == [0.5] * 3 and image["files"] == []
  assert text["files"] == ["tokenizer.json"] and text["preprocessing"]["max_len"] == 40
  assert (out / "tokenizer.json").read_bytes() == (shapes_dir / "tokenizer.json").read_bytes()
  assert set(manifest["files"]) == {
      "image.jax_exported", "text.jax_exported", "image.onnx", "text.onnx", "tokenizer.json",
      "corpus/images.npy", "corpus/images.ids.txt", "corpus/images.faiss",
      "corpus/captions.npy", "corpus/captions.ids.txt", "corpus/captions.faiss"}
  assert verify_export(out) == manifest
  # Nothing but the export itself is left behind (the staging directory was renamed).
  assert [p.name for p in out.parent.iterdir()] == ["serving"]


def test_fresh_process_with_plain_jax_reproduces_mmcl_embeddings(exported, shapes_dir, tmp_path):
  out, manifest = exported
  source = data_lib.open_source(shapes_dir, "test")
  rows = source.read_many(list(range(len(source))))
  inputs, results = tmp_path / "inputs", tmp_path / "results"
  inputs.mkdir()
  results.mkdir()
  np.save(inputs / "pixels.npy", np.stack([r["image"] for r in rows]))
  (inputs / "captions.json").write_text(json.dumps([r["caption"] for r in rows]))
  env = shared_runs.env(tmp_path, devices=1)  # one CPU device, the run's compile options and cache
  proc = subprocess.run([sys.executable, "-c", CLIENT, str(out), str(inputs), str(results)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report == {"mmcl_imported": False, "platform": "cpu"}

  # The tokenizer + manifest rule gives exactly the ids mmcl trained and evaluated on.
  expected_ids = tokenizer_lib.pad_or_truncate([r["caption_ids"] for r in rows], 40)
  np.testing.assert_array_equal(np.load(results / "ids.npy"), expected_ids)
  # mmcl's embeddings: the evaluator's sharded pass over the split (8 devices), written by
  # --corpus, in record order.
  ids = (out / "corpus" / "images.ids.txt").read_text().splitlines()
  assert ids == [str(i) for i in range(len(rows))]
  for name, corpus in (("image", "images"), ("text", "captions")):
    served = np.load(results / f"{name}.npy")
    mmcl_emb = np.load(out / manifest["corpus"][corpus]["embeddings"])
    assert served.shape == mmcl_emb.shape == (128, 32)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    assert np.abs(served - mmcl_emb).max() <= 1e-6, name
  # Not a degenerate model: different captions embed differently.
  assert np.abs(np.load(results / "text.npy")[0] - np.load(results / "text.npy")[1]).max() > 1e-3


def test_tampered_file_fails_verification(exported, tmp_path):
  import shutil
  out = tmp_path / "copy"
  shutil.copytree(exported[0], out)
  with open(out / "tokenizer.json", "ab") as f:
    f.write(b" ")
  with pytest.raises(ValueError, match="tokenizer.json: size or sha256 differs"):
    verify_export(out)
  (out / "manifest.json").unlink()
  with pytest.raises(FileNotFoundError, match="not a \\(complete\\) `mmcl export` directory"):
    verify_export(out)


def test_cli_export_and_its_errors(workdir, tmp_path, capsys):
  out = tmp_path / "cli"
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(out), "--step", "3",
                   "--platforms", "cpu"]) == 0
  manifest = verify_export(out)
  assert manifest["towers"]["text"]["platforms"] == ["cpu"] and manifest["corpus"] == {}
  assert "image → image.jax_exported (dim 32)" in capsys.readouterr().out
  # An existing output is kept unless --overwrite; a missing step names the finished ones.
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(out)]) == 2
  assert "exists; pass overwrite=True" in capsys.readouterr().err
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "x"),
                   "--step", "7"]) == 2
  err = capsys.readouterr().err
  assert "checkpoint step 7 not in" in err and "(finished steps: [3])" in err
  assert not (tmp_path / "x").exists()


def test_task_without_export_hook_says_so():
  class NoExport(Task):
    declare_config = classmethod(lambda cls, c: None)
    train_iterator = init_params = loss = evaluate = lambda self, *a, **k: None

  task = NoExport.__new__(NoExport)
  with pytest.raises(NotImplementedError, match="NoExport does not implement "
                                                "Task.export_towers"):
    task.export_towers({})
  with pytest.raises(NotImplementedError, match="export --corpus"):
    task.export_corpus({})
