"""`mmcl export --tower FOLDER`: a pretrained MiniLM folder as the same artifact kind as a trained
tower; a fresh process with jax + tokenizers only (no mmcl) reproduces `encode_texts`, and
`mmcl features` embeds with the artifact directory as its tower."""
import json
import subprocess
import sys

import numpy as np

import shared_runs

from mmcl import cli
from mmcl.export import verify_export
from mmcl.pretrained.features import compute_features, read_features
from mmcl.pretrained.text import encode_texts

MAX_LENGTH = 32  # every text fits one length bucket: one compilation per path
TEXTS = ["A man is eating food.", "", "Two dogs play in the snow near a red barn.",
         "jazz " * 100, "Ein Hund läuft über die Wiese.", "x"]

# The serving side, following only manifest.json: tokenizer.json (truncation built in), right-pad
# with pad_id to max_len, call the artifact.
CLIENT = r'''
import json, pathlib, sys
import numpy as np
import jax
from tokenizers import Tokenizer

out, texts_file, result = (pathlib.Path(a) for a in sys.argv[1:4])
manifest = json.loads((out / "manifest.json").read_text())
tower = manifest["towers"]["text"]
pre = tower["preprocessing"]
tok = Tokenizer.from_file(str(out / pre["tokenizer"]))
rows = [e.ids for e in tok.encode_batch(json.loads(texts_file.read_text()))]
assert max(len(r) for r in rows) <= pre["max_len"]
ids = np.asarray([r + [pre["pad_id"]] * (pre["max_len"] - len(r)) for r in rows], np.int32)
fn = jax.export.deserialize(bytearray((out / tower["artifact"]).read_bytes()))
np.save(result, np.asarray(fn.call(ids)))
print(json.dumps({"mmcl_imported": any(m.split(".")[0] == "mmcl" for m in sys.modules)}))
'''


def test_pretrained_export_served_without_mmcl_and_used_by_features(minilm_folder, tmp_path,
                                                                     capsys):
  out = tmp_path / "minilm"
  assert cli.main(["export", "--tower", str(minilm_folder), "--out", str(out), "--max-length",
                   str(MAX_LENGTH), "--platforms", "cpu"]) == 0
  assert "text → text.jax_exported (dim 384)" in capsys.readouterr().out
  manifest = verify_export(out)
  assert (manifest["task"], manifest["step"]) == (None, None)
  assert manifest["source"]["model_type"] == "bert" and manifest["config"]["hidden_size"] == 384
  text = manifest["towers"]["text"]
  assert text["inputs"] == [{"name": "token_ids", "shape": ["b", MAX_LENGTH], "dtype": "int32"}]
  assert text["output"]["l2_normalized"] and text["files"] == ["tokenizer.json"]
  assert set(manifest["files"]) == {"text.jax_exported", "tokenizer.json"}

  texts_file, result = tmp_path / "texts.json", tmp_path / "served.npy"
  texts_file.write_text(json.dumps(TEXTS))
  env = shared_runs.env(tmp_path, devices=1)  # one CPU device, the run's compile options and cache
  proc = subprocess.run([sys.executable, "-c", CLIENT, str(out), str(texts_file), str(result)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"mmcl_imported": False}
  expected = encode_texts(minilm_folder, TEXTS, max_length=MAX_LENGTH)
  np.testing.assert_allclose(np.load(result), expected, atol=1e-5)

  # The artifact directory is also a `mmcl features` tower (sharded over the 8 test devices).
  records = tmp_path / "items.jsonl"
  records.write_text("".join(json.dumps({"id": f"i{i}", "title": t}) + "\n"
                             for i, t in enumerate(TEXTS)))
  compute_features(out, records, "title", tmp_path / "emb", batch_size=8, progress=False)
  features = read_features(tmp_path / "emb", verify_hashes=True)
  assert features.manifest["tower"]["source"] == "export"
  np.testing.assert_allclose(features.vectors, expected, atol=1e-5)

  # --workdir and --tower are exclusive.
  assert cli.main(["export", "--tower", str(minilm_folder), "--workdir", str(tmp_path),
                   "--out", str(tmp_path / "x")]) == 2
  assert "exactly one of --workdir" in capsys.readouterr().err
