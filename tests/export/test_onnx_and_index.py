"""`mmcl export --format onnx` and `--index faiss[:KIND]`: ONNX Runtime reproduces mmcl's
embeddings from raw pixels and captions at batch 1 and 7 with a symbolic batch, and the exact FAISS
index returns the evaluator's top-k (the export fixture is in tests/export/conftest.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from data_pipelines import image_text as data_lib
from mmcl import cli
from mmcl.eval import image_text as eval_lib
from mmcl.export import index as index_lib
from mmcl.export import onnx_artifacts
from mmcl.train.task import TowerExport


@pytest.fixture(scope="module")
def raw_test_split(shapes_dir):
  source = data_lib.open_source(shapes_dir, "test")
  rows = source.read_many(list(range(len(source))))
  return np.stack([r["image"] for r in rows]), [r["caption"] for r in rows]


@pytest.fixture(scope="module")
def corpus(exported):
  out, manifest = exported
  return {name: np.load(out / c["embeddings"]) for name, c in manifest["corpus"].items()}


def _cosines(a, b):
  return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_onnx_runtime_reproduces_mmcl_embeddings_at_batch_1_and_7(exported, raw_test_split,
                                                                   corpus):
  out, manifest = exported
  pixels, captions = raw_test_split
  image_pre = manifest["towers"]["image"]["preprocessing"]
  assert image_pre["normalized_in_model"] and image_pre["dtype"] == "uint8"
  images = np.asarray(pixels, np.uint8)  # the tower normalises them (scale / shift) itself
  text_pre = manifest["towers"]["text"]["preprocessing"]
  tok = Tokenizer.from_file(str(out / text_pre["tokenizer"]))
  ids = np.full((len(captions), text_pre["max_len"]), text_pre["pad_id"], np.int32)
  for i, enc in enumerate(tok.encode_batch(captions)):
    seq = enc.ids[:text_pre["max_len"] - 1] + [text_pre["eos_id"]] \
        if len(enc.ids) > text_pre["max_len"] else enc.ids
    ids[i, :len(seq)] = seq
  for tower, x, name in (("image", images, "images"), ("text", ids, "captions")):
    entry = manifest["towers"][tower]["onnx"]
    model = onnx.load(out / entry["artifact"])
    (inp,) = model.graph.input
    assert inp.name == entry["input"] == manifest["towers"][tower]["inputs"][0]["name"]
    assert inp.type.tensor_type.shape.dim[0].dim_param == "b"  # symbolic batch
    session = ort.InferenceSession(str(out / entry["artifact"]),
                                   providers=["CPUExecutionProvider"])
    for batch in (1, 7):
      rows = slice(3, 3 + batch)
      (got,) = session.run(None, {inp.name: x[rows]})
      want = corpus[name][rows]  # the evaluator's own pass over the split
      assert got.shape == (batch, 32)
      assert _cosines(got, want).min() >= 0.9999
      assert np.abs(got - want).max() < 1e-5, (tower, batch)
    check = entry["check"]
    assert check["batch_sizes"] == [1, 7] and check["min_cosine"] >= 0.9999
    assert 0 <= check["max_abs_diff"] < 1e-5
  # Not a degenerate model: different captions embed differently.
  assert np.abs(corpus["captions"][0] - corpus["captions"][1]).max() > 1e-3


def test_unconvertible_tower_names_the_operation():
  def min_pool(params, x):  # lax.reduce_window with min: no ONNX conversion in jax2onnx
    pooled = jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, 2), (1, 2), "VALID")
    return pooled * params["w"]
  tower = TowerExport(fn=min_pool, input_spec=jax.ShapeDtypeStruct((1, 8), jnp.float32),
                      preprocessing={"input": "x"})
  with pytest.raises(onnx_artifacts.OnnxConversionError,
                     match="tower 'pool' cannot be converted to ONNX: .*'reduce_window_min'"):
    onnx_artifacts.onnx_entry("pool", tower, {"w": np.float32(2.0)}, "x")


def test_exact_index_returns_the_evaluators_topk(exported, corpus):
  out, manifest = exported
  img, txt = corpus["images"], corpus["captions"]
  rankings = eval_lib.image_text_rankings(img, txt, 10)
  for name, queries, direction in (("images", txt, "t2i"), ("captions", img, "i2t")):
    entry = manifest["corpus"][name]
    assert entry["index"]["kind"] == "flat" and entry["index"]["metric"] == "inner_product"
    index = index_lib.read_index(out / entry["index"]["file"])
    scores, rows = index_lib.search_topk(index, queries, 10)
    want = rankings[direction]
    np.testing.assert_array_equal(rows, want.indices)
    np.testing.assert_allclose(scores, want.scores, atol=1e-5)
    check = entry["index"]["check"]
    assert (check["queries"], check["k"]) == (128, 10)
    assert check["identical_ids_fraction"] == 1.0 and check["max_score_diff"] < 1e-5
  assert manifest["corpus"]["images"]["query_tower"] == "text"
  assert manifest["corpus"]["captions"]["query_tower"] == "image"


def test_tied_scores_rank_the_lower_row_first():
  faiss = pytest.importorskip("faiss")
  rng = np.random.default_rng(0)
  base = rng.standard_normal((5, 8)).astype(np.float32)
  base /= np.linalg.norm(base, axis=1, keepdims=True)
  corpus = np.concatenate([base, base[[2]] * (1 + 1e-7), base, base[[2]]]).astype(np.float32)
  index = faiss.IndexFlatIP(8)
  index.add(corpus)
  scores, rows = index_lib.search_topk(index, base[[2]], 5)
  # Rows 2, 5, 8 and 11 hold (nearly) the same vector: the evaluator's order is by row index.
  assert rows[0, :4].tolist() == [2, 5, 8, 11]
  np.testing.assert_allclose(scores[0, :4], 1.0, atol=1e-6)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_report_recall_against_exact(corpus, kind):
  emb, queries = corpus["images"], corpus["captions"]
  index, params = index_lib.build_index(emb, kind, seed=0)
  check = index_lib.check_index(index, kind, emb, queries)
  exact_rows = index_lib.exact_topk(queries, emb, 10)[1]
  rows = index_lib.search_topk(index, queries, 10)[1]
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact_rows)])
  assert check["recall@10"] == pytest.approx(recall)
  # 128 rows: HNSW's graph and IVF's probed cells (all 3 of them) find nearly everything.
  assert check["recall@10"] >= 0.95
  if kind == "ivf":
    assert params == {"nlist": 3, "nprobe": 3}


def test_cli_rejects_bad_format_and_index_options(workdir, tmp_path, capsys):
  out = str(tmp_path / "x")
  assert cli.main(["export", "--workdir", str(workdir), "--out", out, "--index", "faiss"]) == 2
  assert "--index builds an index of the exported corpus: pass --corpus" in capsys.readouterr().err
  assert cli.main(["export", "--workdir", str(workdir), "--out", out, "--corpus", "--index",
                   "faiss:lsh"]) == 2
  assert "expected faiss or faiss:KIND with KIND one of flat, ivf, hnsw" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
