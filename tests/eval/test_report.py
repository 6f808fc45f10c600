"""metrics.json, plots and report.md."""
import json
import math

import numpy as np
from PIL import Image

from mmcl.eval import report


METRICS = {"i2t/recall@1": 0.25, "i2t/recall@5": 0.5, "i2t/recall@10": 0.75, "i2t/mrr": 0.4,
           "t2i/recall@1": 0.2, "t2i/recall@5": 0.45, "t2i/recall@10": 0.7,
           "t2i/median_rank": 6.0, "t2i/num_queries": 100, "t2i/ndcg@10": float("nan"),
           "note": "not a number"}


def test_write_metrics_is_json_with_nan_as_null(tmp_path):
  path = report.write_metrics(tmp_path / "eval" / "100", METRICS)
  data = json.loads(path.read_text())
  assert data["i2t/recall@5"] == 0.5 and data["t2i/num_queries"] == 100
  assert data["t2i/ndcg@10"] is None
  assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp left over


def test_load_history_reads_every_step(tmp_path):
  for step, value in ((200, 0.3), (100, 0.1), (1000, 0.6)):
    report.write_metrics(tmp_path / str(step), {"i2t/recall@1": value, "x": float("nan")})
  (tmp_path / "500").mkdir()  # an evaluation still running: no metrics.json yet
  (tmp_path / "plots").mkdir()
  history = report.load_history(tmp_path)
  assert list(history) == [100, 200, 1000]
  assert history[200]["i2t/recall@1"] == 0.3 and math.isnan(history[200]["x"])


def test_at_k_curves_group_by_prefix():
  curves = report.at_k_curves(METRICS)
  assert curves["recall"]["i2t"] == ([1, 5, 10], [0.25, 0.5, 0.75])
  assert curves["recall"]["t2i"] == ([1, 5, 10], [0.2, 0.45, 0.7])
  assert list(curves["ndcg"]) == ["t2i"]


def test_metrics_table():
  table = report.metrics_table(METRICS)
  lines = table.strip().splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header[1:4] == ["ndcg@10", "recall@1", "recall@5"]
  i2t = [c.strip() for c in lines[2].strip("|").split("|")]
  assert i2t[0] == "i2t" and "0.2500" in i2t and "0.4000" in i2t
  t2i = [c.strip() for c in lines[3].strip("|").split("|")]
  assert t2i[header.index("num_queries")] == "100" and t2i[header.index("ndcg@10")] == "n/a"
  assert "note" not in table


def test_write_report_with_plots(tmp_path):
  history = {100: {"i2t/recall@1": 0.1, "t2i/recall@1": 0.05},
             200: {"i2t/recall@1": 0.2, "t2i/recall@1": 0.15}}
  eval_dir = tmp_path / "eval" / "300"
  path = report.write_report(eval_dir, METRICS, step=300, history=history,
                             best={"step": 300, "metric": "i2t/recall@1", "value": 0.25})
  text = path.read_text()
  assert text.startswith("# Retrieval evaluation: step 300")
  assert f"![metric at k]({report.AT_K_PLOT})" in text
  assert f"![metrics over steps]({report.OVER_STEPS_PLOT})" in text
  assert "3 evaluated" in text and "at step 300" in text
  for name in (report.AT_K_PLOT, report.OVER_STEPS_PLOT):
    with Image.open(eval_dir / name) as image:
      assert image.format == "PNG" and image.size[0] > 200
      # A real plot, not a blank canvas.
      assert np.asarray(image.convert("L")).std() > 5
  assert json.loads((eval_dir / "metrics.json").read_text())["i2t/recall@1"] == 0.25


def test_report_without_at_k_metrics_skips_that_plot(tmp_path):
  path = report.write_report(tmp_path, {"loss": 1.5}, step=1)
  assert "metric at k" not in path.read_text()
  assert not (tmp_path / report.AT_K_PLOT).exists()
  assert (tmp_path / report.OVER_STEPS_PLOT).exists()
