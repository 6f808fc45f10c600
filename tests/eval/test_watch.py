"""The watch loop with fake checkpoint listings and a fake clock."""
import json

import pytest

from mmcl.eval.watch import SkipStep, WatchState, load_state, watch


class FakeTrainer:
  """Checkpoints that appear as fake time passes: {time: step}."""

  def __init__(self, schedule):
    self.schedule = schedule
    self.now = 0.0
    self.evaluated = []

  def clock(self):
    return self.now

  def sleep(self, seconds):
    assert seconds > 0
    self.now += seconds

  def list_finished_steps(self):
    return [step for t, step in self.schedule.items() if t <= self.now]

  def evaluate(self, step):
    self.evaluated.append(step)
    return {"recall@1": {100: 0.2, 200: 0.5, 300: 0.4, 400: 0.45}[step], "step_seen": step,
            "label": "not recorded"}


def test_evaluates_each_step_once_in_order_and_stops_after_final(tmp_path):
  trainer = FakeTrainer({0: 200, 0.5: 100, 25: 300, 61: 400})
  state = watch(trainer.list_finished_steps, trainer.evaluate, state_path=tmp_path / "s.json",
                poll_seconds=10, stop_after_step=400, best_metric="recall@1",
                clock=trainer.clock, sleep=trainer.sleep)
  # At t = 0 only step 200 is finished; 100 is found at the next poll (t = 10), after 200, and
  # still evaluated, once.
  assert trainer.evaluated == [200, 100, 300, 400]
  assert sorted(state.done) == [100, 200, 300, 400]
  assert state.best == {"step": 200, "metric": "recall@1", "value": 0.5}
  saved = json.loads((tmp_path / "s.json").read_text())
  assert saved["done"]["300"] == {"recall@1": 0.4, "step_seen": 300.0}
  assert trainer.now == 70  # polls every 10 s until step 400 appears at 61


def test_restart_skips_finished_steps_and_keeps_best(tmp_path):
  state_path = tmp_path / "state.json"
  trainer = FakeTrainer({0: 100, 1: 200})
  watch(trainer.list_finished_steps, trainer.evaluate, state_path=state_path, poll_seconds=1,
        stop_after_step=200, best_metric="recall@1", clock=trainer.clock, sleep=trainer.sleep)
  assert trainer.evaluated == [100, 200]

  restarted = FakeTrainer({0: 100, 1: 200, 2: 300, 3: 400})
  state = watch(restarted.list_finished_steps, restarted.evaluate, state_path=state_path,
                poll_seconds=1, stop_after_step=400, best_metric="recall@1",
                clock=restarted.clock, sleep=restarted.sleep)
  assert restarted.evaluated == [300, 400]
  assert state.best["step"] == 200 and state.history[100]["recall@1"] == 0.2
  assert list(state.history) == [100, 200, 300, 400]

  # Everything up to the final step is done: a third run returns without evaluating.
  again = FakeTrainer({0: 100, 1: 200, 2: 300, 3: 400})
  watch(again.list_finished_steps, again.evaluate, state_path=state_path, poll_seconds=1,
        stop_after_step=400, clock=again.clock, sleep=again.sleep)
  assert again.evaluated == []


def test_timeout_counts_from_last_new_step(tmp_path):
  trainer = FakeTrainer({0: 100, 50: 200, 500: 300})
  state = watch(trainer.list_finished_steps, trainer.evaluate, state_path=tmp_path / "s.json",
                poll_seconds=20, timeout_seconds=100, best_metric="recall@1", best_mode="min",
                clock=trainer.clock, sleep=trainer.sleep)
  assert trainer.evaluated == [100, 200]
  assert trainer.now == 160  # step 200 found at t = 60, then 100 s without news
  assert state.best["step"] == 100  # min mode


def test_after_step_runs_before_the_step_is_recorded_and_errors_propagate(tmp_path):
  state_path = tmp_path / "s.json"
  trainer = FakeTrainer({0: 100, 0.1: 200})
  seen = []

  def after_step(step, metrics, state):
    # The step is in the in-memory state (for reports) but not yet in the file: a crash here
    # leaves it unrecorded, so a restart redoes it rather than skipping its report.
    on_disk = sorted(load_state(state_path).done)
    seen.append((step, metrics["recall@1"], sorted(state.done), on_disk))
    assert isinstance(state, WatchState)

  def flaky(step):
    if step == 200:
      raise RuntimeError("checkpoint 200 vanished")
    return trainer.evaluate(step)

  with pytest.raises(RuntimeError, match="vanished"):
    watch(trainer.list_finished_steps, flaky, state_path=state_path, poll_seconds=1,
          clock=trainer.clock, sleep=trainer.sleep, after_step=after_step)
  assert seen == [(100, 0.2, [100], [])]
  assert sorted(load_state(state_path).done) == [100]


def test_failing_after_step_leaves_the_step_unrecorded(tmp_path):
  state_path = tmp_path / "s.json"
  trainer = FakeTrainer({0: 100, 0.1: 200})

  def after_step(step, metrics, state):
    if step == 200:
      raise OSError("disk full while writing the report")

  with pytest.raises(OSError, match="disk full"):
    watch(trainer.list_finished_steps, trainer.evaluate, state_path=state_path, poll_seconds=1,
          clock=trainer.clock, sleep=trainer.sleep, after_step=after_step)
  assert sorted(load_state(state_path).done) == [100]
  # The restart redoes 200 (and only 200).
  trainer.evaluated.clear()
  watch(trainer.list_finished_steps, trainer.evaluate, state_path=state_path, poll_seconds=1,
        clock=trainer.clock, sleep=trainer.sleep, stop_after_step=200)
  assert trainer.evaluated == [200]


def test_bad_arguments_and_state(tmp_path):
  trainer = FakeTrainer({0: 100})
  with pytest.raises(KeyError, match="'ndcg@10' not among"):
    watch(trainer.list_finished_steps, trainer.evaluate, state_path=tmp_path / "a.json",
          poll_seconds=1, stop_after_step=100, best_metric="ndcg@10", clock=trainer.clock,
          sleep=trainer.sleep)
  with pytest.raises(ValueError, match="best_mode"):
    watch(trainer.list_finished_steps, trainer.evaluate, state_path=tmp_path / "b.json",
          poll_seconds=1, best_mode="best")
  (tmp_path / "c.json").write_text("{\"something\": 1}")
  with pytest.raises(ValueError, match="c.json: not a valid watcher state"):
    load_state(tmp_path / "c.json")


def test_skipped_step_is_left_out_and_not_retried(tmp_path):
  # Step 200 is listed but its checkpoint vanished before evaluation (trainer retention).
  trainer = FakeTrainer({0: 100, 1: 200, 2: 300})
  calls = []

  def evaluate(step):
    calls.append(step)
    if step == 200:
      raise SkipStep("gone")
    return {"recall@1": 0.1 * step / 100}

  state = watch(trainer.list_finished_steps, evaluate, state_path=tmp_path / "s.json",
                poll_seconds=1, stop_after_step=300, best_metric="recall@1",
                clock=trainer.clock, sleep=trainer.sleep)
  assert calls == [100, 200, 300]
  assert sorted(state.done) == [100, 300]
  assert state.best["step"] == 300
