"""experiments/bench/eval.py runs on CPU, checks its rankings and reports consistent numbers."""
import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench" / "eval.py"


def test_bench_reports_queries_per_second_from_its_own_timings():
  spec = importlib.util.spec_from_file_location("bench_eval", SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  # 8 simulated devices: 4,000 items split evenly, 4,004 padded by exact_topk.
  rows = bench.main(["--corpus", "4000", "4004", "--dim", "16", "--queries", "8", "--k", "5",
                     "--corpus-chunk", "128", "--repeats", "1", "--check", "8"])
  assert [r["corpus"] for r in rows] == [4000, 4004]
  for row in rows:
    assert row["status"] == "ok"
    assert row["queries_per_s"] == pytest.approx(8 / (row["ms"] * 1e-3), rel=0.01)
    assert row["items_per_s"] == pytest.approx(row["queries_per_s"] * row["corpus"], rel=0.01)
  # Per device: its 1/8 of the evenly split corpus plus small temporaries, not the whole corpus
  # (the uneven 4,004 arrives replicated and is padded inside, so it holds more).
  assert rows[0]["device_MiB"] * 2**20 < 4000 * 16 * 4 / 2
