"""With data.skip_bad_records, skipped records are counted by split and field where people look:
metrics.jsonl, train_summary.json and the evaluator's metrics and report."""
import json
import shutil

from array_record.python import array_record_module
from reliability_helpers import tiny_config

from data_pipelines import image_text
from data_pipelines import records
from mmcl.eval import evaluator as evaluator_lib
from mmcl.tasks import get_task_class
from mmcl.train import loop as loop_lib
from mmcl.train.metric_log import read_metrics


def _garble(data_dir, split, position):
  """Replaces record `position` of the split's first shard with bytes that are no record."""
  shard = image_text.load_metadata(data_dir)["splits"][split]["shards"][0]["file"]
  path = str(data_dir / shard)
  reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
  raws = list(reader.read_all())
  reader.close()
  raws[position] = b"\xc1 not a record"
  writer = array_record_module.ArrayRecordWriter(path, records.WRITER_OPTIONS)
  for raw in raws:
    writer.write(raw)
  writer.close()


def test_skips_are_counted_in_metrics_summary_and_report(shapes_dir, tmp_path):
  data = tmp_path / "ds"
  shutil.copytree(shapes_dir, data)
  for position in (0, 1, 2, 3):  # early in the first shard: every epoch order reaches them
    _garble(data, "train", position)
  _garble(data, "test", 5)
  workdir = tmp_path / "run"
  c = tiny_config(data, data__skip_bad_records=True, train__total_steps=4,
                  train__checkpoint_every=4, train__log_every=2, data__global_batch_size=128)
  last = loop_lib.train(c, workdir, get_task_class("clip"))
  logged = [r for r in read_metrics(workdir) if "data/skipped" in r]
  assert [r["step"] for r in logged] == [2, 4]
  # 4 steps of 128 = one epoch of the 512 training records: each bad one is met exactly once
  # by the end (prefetch may read ahead into the next epoch, never behind).
  assert logged[-1]["data/skipped/train/<record>"] >= 4
  summary = json.loads((workdir / "train_summary.json").read_text())
  assert summary["data/skipped"] == last["data/skipped"] == sum(
      v for k, v in summary.items() if k.startswith("data/skipped/"))
  assert summary["data/skipped/test/<record>"] >= 1  # the validation batch read the test split
  metrics = evaluator_lib.run_evaluator(str(workdir), resolve_task=get_task_class)
  # The evaluator reads each of the 128 test records once: exactly one was skipped.
  assert metrics["data/skipped"] == 1.0 and metrics["data/skipped/test/<record>"] == 1.0
  assert "data/skipped" in (workdir / "eval/4/report.md").read_text()
  assert json.loads((workdir / "eval/4/metrics.json").read_text())["data/skipped"] == 1.0
