"""Tests for mmcl.train.metric_log: JSONL round trip, TensorBoard, resume de-duplication, ETA."""
import io
import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from mmcl.train.metric_log import MetricLogger, read_metrics


class FakeClock:
  """A monotonic clock the test advances by hand."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


class TtyStream(io.StringIO):
  def isatty(self):
    return True


def _logger(workdir, total_steps=100, **kw):
  kw.setdefault("use_tensorboard", False)
  kw.setdefault("stream", io.StringIO())
  return MetricLogger(workdir, total_steps=total_steps, **kw)


def test_jsonl_round_trip(tmp_path):
  with _logger(tmp_path) as log:
    log.write(1, {"loss": 2.5, "f32": np.float32(0.25), "jax": jnp.asarray(1.5, jnp.bfloat16),
                  "count": np.int64(7), "arr1": np.array([3.0])})
    log.write(2, {"loss": float("nan"), "grad_norm": np.float32(np.inf), "lr": -np.inf})
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2]
  r1, r2 = rows
  assert (r1["loss"], r1["f32"], r1["jax"], r1["arr1"]) == (2.5, 0.25, 1.5, 3.0)
  assert r1["count"] == 7 and isinstance(r1["count"], int)
  assert r2["loss"] is None and r2["grad_norm"] is None and r2["lr"] is None  # non-finite → null
  assert 0 < r1["time"] <= r2["time"]
  # The file is strict JSON: no NaN/Infinity tokens anywhere.
  text = (tmp_path / "metrics.jsonl").read_text()
  def reject(token):
    raise AssertionError(f"non-standard JSON token {token}")
  records = [json.loads(line, parse_constant=reject) for line in text.splitlines()]
  assert records[0]["event"] == "start" and records[0]["total_steps"] == 100
  assert records[2]["loss"] is None
  assert read_metrics(tmp_path / "missing") == []


def test_bad_metrics_raise_clear_errors(tmp_path):
  log = _logger(tmp_path)
  with pytest.raises(TypeError, match="metric 'emb' must be a single number.*shape \\(3,\\)"):
    log.write(1, {"emb": np.zeros(3)})
  with pytest.raises(TypeError, match="metric 'name' must be a single number"):
    log.write(1, {"name": "abc"})
  with pytest.raises(ValueError, match="metric name 'step' is not allowed"):
    log.write(1, {"step": 3})
  with pytest.raises(ValueError, match="step must be ≥ 0"):
    log.write(-1, {"loss": 1.0})
  log.close()
  with pytest.raises(RuntimeError, match="after close"):
    log.write(2, {"loss": 1.0})
  assert read_metrics(tmp_path) == []  # nothing half-written


def _events(path):
  """The Event protos of one event file (TFRecord framing parsed by hand, no TensorFlow)."""
  from tensorboardX.proto import event_pb2
  data, pos = path.read_bytes(), 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    yield event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    pos += 12 + length + 4


def _read_tb_scalars_file(path):
  scalars = {}
  for event in _events(path):
    for v in event.summary.value:
      scalars.setdefault(v.tag, {})[event.step] = v.simple_value
  return scalars


def _read_tb_scalars(tb_dir):
  """{tag: {step: value}} from the single event file in `tb_dir`."""
  files = sorted(tb_dir.glob("events.out.tfevents.*"))
  assert len(files) == 1, files
  return _read_tb_scalars_file(files[0])


def test_tensorboard_event_file_has_the_scalars(tmp_path):
  with _logger(tmp_path, use_tensorboard=True) as log:
    log.write(10, {"loss": 3.0, "val/loss": np.float32(2.0)})
    log.write(20, {"loss": 1.5, "nan_metric": float("nan")})
  scalars = _read_tb_scalars(tmp_path / "tb")
  assert scalars["loss"] == {10: 3.0, 20: 1.5}
  assert scalars["val/loss"] == {10: 2.0}
  assert math.isnan(scalars["nan_metric"][20])  # TensorBoard gets the real value, not null


def test_only_the_main_process_writes(tmp_path):
  stream = io.StringIO()
  with _logger(tmp_path / "w", is_main_process=False, use_tensorboard=True, stream=stream) as log:
    log.write(1, {"loss": 1.0})
    with pytest.raises(TypeError):  # inputs are still checked, so every process fails alike
      log.write(2, {"loss": np.zeros(2)})
  assert not (tmp_path / "w").exists() and stream.getvalue() == ""


def test_resume_deduplicates_steps(tmp_path):
  # Run 1 logs steps 1..10 (validation merged into step 5, its checkpoint), then is killed
  # mid-line at step 11.
  with _logger(tmp_path) as log:
    for s in range(1, 11):
      log.write(s, {"loss": 100.0 + s})
      if s == 5:
        log.write(s, {"val/loss": 50.0})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 11, "lo')
  # Run 2 resumes from the step-5 checkpoint and is killed again after step 7.
  with _logger(tmp_path) as log:
    for s in range(6, 8):
      log.write(s, {"loss": 200.0 + s})
  # Run 3 resumes from a step-6 checkpoint and finishes.
  with _logger(tmp_path, total_steps=12) as log:
    for s in range(7, 13):
      log.write(s, {"loss": 300.0 + s})
  with pytest.warns(UserWarning, match="truncated line"):
    rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 13))  # each step once, in order
  losses = {r["step"]: r["loss"] for r in rows}
  assert losses == {**{s: 100.0 + s for s in range(1, 6)}, 6: 206.0,
                    **{s: 300.0 + s for s in range(7, 13)}}
  assert rows[4]["val/loss"] == 50.0  # same-session writes for one step merge
  assert all("val/loss" not in r for r in rows if r["step"] != 5)
  # Appending never truncated: all sessions are still in the file.
  text = (tmp_path / "metrics.jsonl").read_text()
  assert text.count('"event": "start"') == 3 and '"loss": 110.0' in text


def test_malformed_line_in_the_middle_is_an_error(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON object"):
    read_metrics(tmp_path)


def _run(tmp_path, step_times, *, total_steps=1000, every=10, stream=None):
  """Writes every `every` steps with the given per-step durations; returns the ETAs and stream."""
  clock = FakeClock()
  stream = stream if stream is not None else io.StringIO()
  etas = []
  with _logger(tmp_path, total_steps=total_steps, clock=clock, stream=stream) as log:
    assert log.eta_seconds() is None
    for i, step in enumerate(range(every, total_steps + 1, every)):
      clock.now += every * step_times[i]
      log.write(step, {"loss": 1.0 / step, "examples_per_s": 320.0})
      etas.append(log.eta_seconds())
  return etas, stream


def test_eta_is_monotone_and_matches_the_step_time(tmp_path):
  etas, stream = _run(tmp_path / "steady", np.full(100, 0.1))
  assert etas[0] is None  # one timing point: no rate yet
  assert all(a > b for a, b in zip(etas[1:], etas[2:])), "ETA must decrease as the run advances"
  np.testing.assert_allclose(etas[1:], [(1000 - s) * 0.1 for s in range(20, 1001, 10)], atol=1e-6)
  assert etas[-1] == 0.0
  # Jittery steps (±20%): the moving average keeps the ETA close to the truth.
  jitter = 0.1 * (1 + 0.2 * np.random.default_rng(0).uniform(-1, 1, 100))
  etas_j, _ = _run(tmp_path / "jitter", jitter)
  truth = np.array([(1000 - s) * 0.1 for s in range(10, 1001, 10)])
  np.testing.assert_allclose(etas_j[1:20], truth[1:20], rtol=0.25)  # few samples yet
  np.testing.assert_allclose(etas_j[20:], truth[20:], rtol=0.1, atol=1e-9)  # window full
  # After a slowdown to 0.3 s/step, the estimate follows within the averaging window.
  etas_s, _ = _run(tmp_path / "slow", np.r_[np.full(50, 0.1), np.full(50, 0.3)])
  np.testing.assert_allclose(etas_s[75], (1000 - 760) * 0.3, rtol=0.01)
  # Non-TTY progress: a sign-of-life line, then one line per 5% of the run, no carriage returns.
  lines = stream.getvalue().splitlines()
  assert "\r" not in stream.getvalue()
  assert len(lines) == 21
  assert lines[0].startswith("step 10/1000 (1.0%)") and "ETA --" in lines[0]
  assert lines[1] == "step 50/1000 (5.0%) | loss 0.0200 | 320.0 ex/s | ETA 0:01:35"
  assert lines[-1] == "step 1000/1000 (100.0%) | loss 0.0010 | 320.0 ex/s | ETA 0:00:00"


def test_tty_progress_is_redrawn_in_place_and_throttled(tmp_path):
  clock = FakeClock()
  stream = TtyStream()
  with _logger(tmp_path, total_steps=50, clock=clock, stream=stream) as log:
    for step in range(1, 51):
      clock.now += 0.1  # 10 writes per second: at most every 5th may redraw
      log.write(step, {"loss": 2.0})
  out = stream.getvalue()
  draws = out.count("\r")
  assert 10 <= draws <= 11, draws
  assert out.endswith("step 50/50 (100.0%) | loss 2.0000 | ETA 0:00:00\n")


def test_resume_purges_tensorboard_steps_of_the_killed_run(tmp_path):
  from tensorboardX.proto import event_pb2
  with _logger(tmp_path, use_tensorboard=True) as log:
    for s in range(1, 11):
      log.write(s, {"loss": float(s)})
  with _logger(tmp_path, use_tensorboard=True) as log:
    log.write(6, {"loss": 60.0})
  files = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard's read order
  assert len(files) == 2  # the quick restart did not overwrite the first file
  assert _read_tb_scalars_file(files[0])["loss"] == {s: float(s) for s in range(1, 11)}
  starts = [e.step for e in _events(files[-1])
            if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
  # TensorBoard drops the earlier file's events at steps ≥ 6 when it reads this marker.
  assert starts == [6]
