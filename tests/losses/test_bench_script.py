"""experiments/bench/loss.py runs on CPU and reports consistent numbers."""
import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench" / "loss.py"


def test_bench_reports_useful_flops_from_its_own_timings():
  if not SCRIPT.is_file():
    pytest.skip(f"{SCRIPT} not found")
  spec = importlib.util.spec_from_file_location("bench_loss", SCRIPT)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rows = bench.main(["--batch", "48", "--dim", "8", "--loss", "infonce", "--impl", "tiled",
                     "--block-size", "16", "--repeats", "1", "--warmup", "0",
                     "--matmul-size", "64"])
  assert [(r["loss"], r["impl"], r["batch"]) for r in rows] == [("infonce", "tiled", 48)]
  for row in rows:
    assert row["status"] == "ok"
    expected = 6 * 48**2 * 8 / (row["ms"] * 1e-3) / 1e12  # 6·B²·D per forward+backward
    assert row["useful_tflops"] == pytest.approx(expected, rel=0.02, abs=1e-5)
    assert row["compiled_peak_bytes"] >= 2 * 48 * 8 * 4  # at least the two [48, 8] arguments
