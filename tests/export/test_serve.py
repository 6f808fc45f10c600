"""`mmcl serve EXPORT_DIR`: one server process (started once for this module on a free port, ONNX
Runtime towers, exact FAISS index) answers over real HTTP: /search gives the evaluator's top-k for
the held-out captions, /embed gives mmcl's embeddings from raw text and PNG bytes, concurrent
requests are batched, and bad requests get a 4xx naming the field."""
import base64
import concurrent.futures
import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from data_pipelines import image_text as data_lib
from mmcl.eval import image_text as eval_lib


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
  out, _ = exported
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  log = tmp_path_factory.mktemp("serve") / "stderr.txt"
  with open(log, "w") as stderr:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmcl.cli", "serve", str(out), "--port", "0", "--max-batch-size",
         "32", "--max-wait-ms", "20", "--max-k", "50"],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
  try:
    line = proc.stdout.readline()  # printed once the socket is bound
    assert "mmcl serve: listening on http://127.0.0.1:" in line, log.read_text()[-3000:]
    yield line.split("listening on ")[1].split()[0]
  finally:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, log.read_text()[-3000:]


def _call(url, path, body=None, *, raw: bytes | None = None):
  """(status, JSON body) of a GET (body None) or a POST."""
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  request = urllib.request.Request(url + path, data=data,
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def test_split(shapes_dir):
  source = data_lib.open_source(shapes_dir, "test")
  return source.read_many(list(range(len(source))))


def test_search_returns_the_evaluators_topk_for_held_out_captions(server, exported, test_split):
  out, manifest = exported
  img = np.load(out / manifest["corpus"]["images"]["embeddings"])
  txt = np.load(out / manifest["corpus"]["captions"]["embeddings"])
  want = eval_lib.image_text_rankings(img, txt, 10)["t2i"]  # the evaluator's text→image top-10
  queries = list(range(0, 128, 4))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent: batched server-side
    answers = list(pool.map(lambda i: _call(server, "/search", {
        "corpus": "images", "query": test_split[i]["caption"], "k": 10}), queries))
  for i, (status, answer) in zip(queries, answers):
    assert status == 200, answer
    assert answer["tower"] == "text" and answer["k"] == 10
    assert answer["ids"] == [str(j) for j in want.indices[i]], i
    np.testing.assert_allclose(answer["scores"], want.scores[i], atol=1e-5)
  # Image → caption search through the image tower, from PNG bytes.
  status, answer = _call(server, "/search", {"corpus": "captions", "k": 3,
                                             "query": _png(test_split[5]["image"])})
  i2t = eval_lib.image_text_rankings(img, txt, 3)["i2t"]
  assert status == 200 and answer["ids"] == [str(j) for j in i2t.indices[5]]


def _png(pixels: np.ndarray) -> str:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


def test_embed_reproduces_mmcl_embeddings_and_batches_concurrent_requests(server, exported,
                                                                          test_split):
  out, manifest = exported
  img = np.load(out / manifest["corpus"]["images"]["embeddings"])
  txt = np.load(out / manifest["corpus"]["captions"]["embeddings"])
  _, before = _call(server, "/metadata")
  rows = list(range(40))
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    texts = list(pool.map(lambda i: _call(server, "/embed", {
        "tower": "text", "inputs": [test_split[i]["caption"]]}), rows))
  for i, (status, answer) in zip(rows, texts):
    assert status == 200 and answer["dim"] == 32
    np.testing.assert_allclose(answer["embeddings"][0], txt[i], atol=1e-5)
  status, answer = _call(server, "/embed", {"tower": "image",
                                            "inputs": [_png(test_split[i]["image"]) for i in
                                                       range(7)]})
  assert status == 200
  np.testing.assert_allclose(np.asarray(answer["embeddings"]), img[:7], atol=1e-5)
  _, after = _call(server, "/metadata")
  calls = after["stats"]["text"]["calls"] - before["stats"]["text"]["calls"]
  batched_rows = after["stats"]["text"]["rows"] - before["stats"]["text"]["rows"]
  assert batched_rows == 40 and calls < 40  # 16 concurrent clients: requests shared calls


def test_metadata_and_health(server):
  assert _call(server, "/healthz") == (200, {"status": "ok"})
  status, meta = _call(server, "/metadata")
  assert status == 200 and (meta["task"], meta["step"]) == ("clip", 3)
  assert meta["towers"]["text"]["dim"] == 32 and meta["towers"]["image"]["runtime"] == \
      "onnxruntime"
  assert meta["corpora"]["images"] == {
      "count": 128, "dim": 32, "tower": "image", "query_tower": "text", "index": "flat",
      "index_check": meta["corpora"]["images"]["index_check"]}
  # Loaded from the export folder alone: no jax, no training code in the server process.
  assert meta["process"] == {"runtimes": ["onnxruntime"], "jax_imported": False,
                             "training_code_imported": False}
  assert meta["batching"] == {"max_batch_size": 32, "max_wait_ms": 20.0}


@pytest.mark.parametrize("path,body,status,field", [
    ("/embed", {"tower": "audio", "inputs": ["x"]}, 404, "tower"),
    ("/embed", {"inputs": ["x"]}, 400, "tower"),
    ("/embed", {"tower": "text", "inputs": "a caption"}, 400, "inputs"),
    ("/embed", {"tower": "text", "inputs": ["ok"], "input": 1}, 400, "input"),
    ("/embed", {"tower": "text", "inputs": [7]}, 400, "inputs[0]"),
    ("/embed", {"tower": "text", "inputs": ["x" * 10_001]}, 413, "inputs[0]"),
    ("/embed", {"tower": "text", "inputs": ["x"] * 257}, 413, "inputs"),
    ("/embed", {"tower": "image", "inputs": ["bm90IGFuIGltYWdl"]}, 422, "inputs[0]"),
    ("/embed", {"tower": "image", "inputs": ["%%%"]}, 400, "inputs[0]"),
    ("/search", {"corpus": "images", "query": "a red circle", "k": 0}, 400, "k"),
    ("/search", {"corpus": "images", "query": "a red circle", "k": 51}, 400, "k"),
    ("/search", {"corpus": "images", "query": "a red circle", "k": "5"}, 400, "k"),
    ("/search", {"corpus": "songs", "query": "a red circle"}, 404, "corpus"),
    ("/search", {"corpus": "images"}, 400, "query"),
    ("/search", {"corpus": "images", "query": "x", "tower": "audio"}, 404, "tower"),
    ("/search", [1, 2], 400, "body"),
])
def test_bad_requests_get_4xx_naming_the_field(server, path, body, status, field):
  got_status, answer = _call(server, path, body)
  assert (got_status, answer["field"]) == (status, field), answer
  assert f"field {field!r}" in answer["error"]


def test_server_survives_bad_requests(server, test_split):
  assert _call(server, "/embed", raw=b"{not json")[0] == 400
  assert _call(server, "/embed", {"tower": "image", "inputs": [_png(
      np.zeros((8, 8, 3), np.uint8))]})[1]["error"].startswith("field 'inputs[0]': image is 8x8")
  status, answer = _call(server, "/search", {"corpus": "images", "k": 1,
                                             "query": test_split[0]["caption"]})
  assert status == 200 and len(answer["ids"]) == 1
  assert _call(server, "/healthz") == (200, {"status": "ok"})


def test_audio_and_item_id_inputs_follow_the_manifest(tmp_path):
  """The preprocessing of `mmcl serve` for waveform and item-id towers, in process (no model)."""
  import soundfile
  from mmcl.serve import RequestError
  from mmcl.serve.model import ItemIdsInput, WaveformInput
  wave = WaveformInput({"sample_rate": 8000, "samples": 4000}, ["b", 4000])
  t = np.arange(16000) / 16000
  buf = io.BytesIO()
  soundfile.write(buf, np.stack([np.sin(2 * np.pi * 440 * t)] * 2, 1), 16000, format="WAV",
                  subtype="FLOAT")
  x = wave(base64.b64encode(buf.getvalue()).decode(), "inputs[0]")
  want = np.sin(2 * np.pi * 440 * np.arange(4000) / 8000)  # 16 kHz stereo → 8 kHz mono
  assert x.shape == (4000,) and np.abs(x[100:-100] - want[100:-100]).max() < 1e-2
  with pytest.raises(RequestError, match="field 'q': undecodable audio") as e:
    wave(base64.b64encode(b"RIFF....nonsense").decode(), "q")
  assert e.value.status == 422
  (tmp_path / "item_ids.txt").write_text("a\nb\nc\n")
  history = ItemIdsInput({"input": "item_history", "item_ids": "item_ids.txt", "max_len": 2},
                         ["b", 2], tmp_path)
  np.testing.assert_array_equal(history(["a", "c", "b"], "query"), [3, 2])  # most recent kept
  np.testing.assert_array_equal(history(["b"], "query"), [0, 2])  # left-padded with 0
  with pytest.raises(RequestError, match=r"field 'query\[1\]': unknown item id 'z'"):
    history(["a", "z"], "query")
