"""TREC run/qrels files: round trips, and our metrics against ranx computed from the files."""
import numpy as np
import pytest

from mmcl.eval import metrics as m
from mmcl.eval import trec
from mmcl.eval.topk import exact_topk


def _graded_problem(seed=0, num_queries=30, corpus_size=200, k=20):
  """Random embeddings, their exact top-k, and random graded judgments (every query judged)."""
  rng = np.random.default_rng(seed)
  queries = rng.normal(size=(num_queries, 8)).astype(np.float32)
  corpus = rng.normal(size=(corpus_size, 8)).astype(np.float32)
  scores, ranked = (np.asarray(x) for x in exact_topk(queries, corpus, k, corpus_chunk=64))
  judgments = []
  for q in range(num_queries):
    # Judge some retrieved items and some unretrieved ones, grades 0..3, at least one relevant.
    items = np.unique(np.concatenate([rng.choice(ranked[q], 4, replace=False),
                                      rng.choice(corpus_size, 4, replace=False)]))
    grades = rng.integers(0, 4, items.size)
    grades[rng.integers(items.size)] = rng.integers(1, 4)
    judgments.append(dict(zip(items.tolist(), grades.tolist())))
  return scores, ranked, m.Qrels.from_dict(judgments)


def test_round_trip(tmp_path):
  scores, ranked, qrels = _graded_problem()
  ranked = ranked.copy()
  ranked[3, 15:] = -1  # a short list
  query_ids = [f"q{i}" for i in range(ranked.shape[0])]
  doc_ids = [f"doc-{j}" for j in range(200)]
  run_path, qrels_path = trec.write_run_and_qrels(tmp_path, "i2t", ranked, scores, qrels,
                                                  query_ids=query_ids, doc_ids=doc_ids)
  first = run_path.read_text().splitlines()[0].split()
  assert first[:2] == ["q0", "Q0"] and first[3] == "1" and first[5] == "mmcl"
  assert float(first[4]) == scores[0, 0]  # float32 scores survive %.9g exactly
  run = trec.read_run(run_path)
  assert len(run["q3"]) == 15
  np.testing.assert_array_equal(trec.ranked_from_trec(run, query_ids, doc_ids, k=20), ranked)
  back = trec.qrels_from_trec(trec.read_qrels(qrels_path), query_ids, doc_ids)
  assert back.to_dict() == qrels.to_dict()


def test_rank_scores_preserve_order_under_ties(tmp_path):
  ranked = np.array([[4, 2, 7], [1, 0, 3]])
  tied = np.zeros((2, 3), np.float32)
  path = trec.write_run(tmp_path / "r.run", ranked, None)
  assert path.read_text().splitlines()[0] == "0 Q0 4 1 3 mmcl"
  ids = [str(i) for i in range(8)]
  np.testing.assert_array_equal(trec.ranked_from_trec(trec.read_run(path), ["0", "1"], ids),
                                ranked)
  # With tied model scores, the file keeps our order only by line order.
  trec.write_run(tmp_path / "t.run", ranked, tied)
  lines = (tmp_path / "t.run").read_text().splitlines()
  assert [line.split()[2] for line in lines[:3]] == ["4", "2", "7"]


def test_malformed_files_name_the_line(tmp_path):
  bad = tmp_path / "bad.run"
  bad.write_text("q1 Q0 d1 1 0.5 tag\nq1 Q0 d2 2 0.4\n")
  with pytest.raises(ValueError, match=r"bad.run:2: expected 6 fields"):
    trec.read_run(bad)
  bad.write_text("q1 0 d1 x\n")
  with pytest.raises(ValueError, match=r"bad.run:1: relevance must be an integer"):
    trec.read_qrels(bad)
  with pytest.raises(ValueError, match="whitespace-free"):
    trec.format_run(np.array([[0]]), doc_ids=["a b"])
  with pytest.raises(ValueError, match="integer grades"):
    trec.format_qrels(m.Qrels.from_dict([{0: 0.5}]))


def test_metrics_match_trec_eval_from_trec_files(tmp_path):
  pytrec_eval = pytest.importorskip("pytrec_eval")
  scores, ranked, qrels = _graded_problem(seed=1)
  run_path, qrels_path = trec.write_run_and_qrels(tmp_path, "run", ranked, scores, qrels)
  # trec_eval's NDCG uses linear gain rel; judging with grades 2^rel - 1 makes its NDCG our
  # exponential-gain NDCG (the binary metrics only see grade > 0, which the map preserves).
  exp_gain = m.Qrels(qrels.indptr, qrels.items, np.exp2(qrels.rels) - 1)
  _, exp_gain_path = trec.write_run_and_qrels(tmp_path, "exp_gain", ranked, scores, exp_gain)
  with open(run_path) as f:
    run = pytrec_eval.parse_run(f)
  cutoffs = "1,5,10,20"
  measures = {f"{name}.{cutoffs}" for name in ("recall", "P", "success", "map_cut", "ndcg_cut")}
  measures.add("recip_rank")
  per_query = {}
  for path in (qrels_path, exp_gain_path):
    with open(path) as f:
      evaluator = pytrec_eval.RelevanceEvaluator(pytrec_eval.parse_qrel(f), measures)
    per_query[path.stem] = evaluator.evaluate(run)

  def trec_mean(stem, measure):
    values = [per_query[stem][str(q)][measure] for q in range(ranked.shape[0])]
    return float(np.mean(values))

  names = ("recall", "precision", "hit_rate", "map", "ndcg")
  got = m.evaluate(ranked, qrels, [f"{n}@{k}" for n in names for k in (1, 5, 10, 20)] + ["mrr@20"])
  for k in (1, 5, 10, 20):
    assert got[f"recall@{k}"] == pytest.approx(trec_mean("run", f"recall_{k}"), abs=1e-6)
    assert got[f"precision@{k}"] == pytest.approx(trec_mean("run", f"P_{k}"), abs=1e-6)
    assert got[f"hit_rate@{k}"] == pytest.approx(trec_mean("run", f"success_{k}"), abs=1e-6)
    assert got[f"map@{k}"] == pytest.approx(trec_mean("run", f"map_cut_{k}"), abs=1e-6)
    assert got[f"ndcg@{k}"] == pytest.approx(trec_mean("exp_gain", f"ndcg_cut_{k}"), abs=1e-6)
  # recip_rank has no cutoff; the runs hold 20 items.
  assert got["mrr@20"] == pytest.approx(trec_mean("run", "recip_rank"), abs=1e-6)
  # Graded judgments must change NDCG here, or the test proves little.
  assert got["ndcg@10"] != pytest.approx(trec_mean("run", "ndcg_cut_10"), abs=1e-6)


@pytest.mark.filterwarnings("ignore::Warning")  # numba type-safety chatter inside ranx
def test_metrics_match_ranx_from_trec_files(tmp_path):
  # ranx covers what trec_eval lacks: RBP, and exponential-gain NDCG (its `ndcg_burges`) directly.
  ranx = pytest.importorskip("ranx")
  scores, ranked, qrels = _graded_problem(seed=2)
  run_path, qrels_path = trec.write_run_and_qrels(tmp_path, "run", ranked, scores, qrels)
  # ranx's RBP weighs a hit by its grade, ours by 1: compare RBP on binary judgments.
  binary = m.Qrels(qrels.indptr, qrels.items, (qrels.rels > 0).astype(float))
  _, binary_path = trec.write_run_and_qrels(tmp_path, "binary", ranked, scores, binary)
  ranx_run = ranx.Run.from_file(str(run_path), kind="trec")
  expected = ranx.evaluate(ranx.Qrels.from_file(str(qrels_path), kind="trec"), ranx_run,
                           ["ndcg_burges@10", "mrr@5"])
  got = m.evaluate(ranked, qrels, ["ndcg@10", "mrr@5"])
  assert got["ndcg@10"] == pytest.approx(expected["ndcg_burges@10"], abs=1e-6)
  assert got["mrr@5"] == pytest.approx(expected["mrr@5"], abs=1e-6)
  expected_rbp = ranx.evaluate(ranx.Qrels.from_file(str(binary_path), kind="trec"), ranx_run,
                               "rbp.8")
  assert m.evaluate(ranked, binary, ["rbp.8"])["rbp.8"] == pytest.approx(expected_rbp, abs=1e-6)
