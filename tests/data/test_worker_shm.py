"""Worker batches through persistent shared-memory slots (data_pipelines.shm_batches)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import shm_batches

def _shm_names(semaphores: bool = True) -> set[str]:
  """Entries of /dev/shm: shared-memory segments and (multiprocessing's queues, while they
  live) named semaphores `sem.*`."""
  return {n for n in os.listdir("/dev/shm") if semaphores or not n.startswith("sem.")}


def _batch(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
          "text": rng.integers(0, 99, (4, 5), dtype=np.int32),
          "index": np.arange(4, dtype=np.int64) + 10 * seed, "name": f"b{seed}"}


def _assert_same(x: dict, y: dict) -> None:
  assert x.keys() == y.keys()
  for k in x:
    np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert np.asarray(x[k]).dtype == np.asarray(y[k]).dtype


@pytest.fixture
def ring():
  """A worker-side slot writer with 2 slots, in this process; its segment is removed after."""
  before = _shm_names()
  to_slots = shm_batches._ToSlots(slots=2)  # pylint: disable=protected-access
  yield to_slots
  if to_slots._ring is not None:  # pylint: disable=protected-access
    to_slots._ring.unlink_if_unread()  # pylint: disable=protected-access
  assert _shm_names() <= before


def test_slots_round_trip_free_in_order_and_fall_back_when_full(ring):
  rings = {}
  r0, r1 = ring(_batch(0)), ring(_batch(1))
  assert isinstance(r0, shm_batches.SlotRecord) and (r0.slot, r0.seq, r1.slot, r1.seq) == (0, 0,
                                                                                         1, 1)
  assert r0.rest == {"name": "b0"}
  # Both slots hold unread batches: the third batch goes grain's own way, unchanged.
  third = _batch(2)
  assert ring(third) is third
  # The ring's name left /dev/shm as soon as the reader mapped it.
  got0 = shm_batches.read_record(r0, rings)
  assert r0.segment not in _shm_names()
  _assert_same(got0, _batch(0))
  r2 = ring(_batch(3))  # slot 0 is free again
  assert (r2.slot, r2.seq) == (0, 2)
  _assert_same(got0, _batch(0))  # the copy handed out is not the slot
  _assert_same(shm_batches.read_record(r1, rings), _batch(1))
  _assert_same(shm_batches.read_record(r2, rings), _batch(3))
  # A batch larger than the first one does not fit a slot.
  big = {"image": np.zeros((9, 8, 8, 3), np.uint8)}
  assert ring(big) is big
  for r in rings.values():
    r.close()


def test_a_slot_rewritten_before_it_is_read_raises(ring):
  rings = {}
  r0 = ring(_batch(0))
  # Mark batch 1 read (out of protocol: batch 0 never was), so slot 0 is reused for batch 2.
  r1 = ring(_batch(1))
  rings[r0.segment] = shm_batches._Attached(r0.segment, r0.owner)  # pylint: disable=protected-access
  rings[r0.segment].header[1] = r1.seq
  r2 = ring(_batch(2))
  assert r2.slot == r0.slot
  with pytest.raises(shm_batches.SlotOverwrittenError,
                     match=r"slot 0: expected batch 0 before reading it, found 2"):
    shm_batches.read_record(r0, rings)
  ring._ring.header[4 + r2.slot] = -1  # pylint: disable=protected-access
  with pytest.raises(shm_batches.SlotOverwrittenError, match="found a write in progress"):
    shm_batches.read_record(r2, rings)
  for r in rings.values():
    r.close()


def test_a_worker_exiting_before_its_ring_is_read_removes_it(tmp_path):
  before = _shm_names()
  script = ("import numpy as np; from data_pipelines import shm_batches; "
            "r = shm_batches._ToSlots(slots=2)({'x': np.ones(3)}); print(r.segment)")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
  name = out.stdout.split()[-1]
  assert name.startswith("psm_") and name not in _shm_names()
  assert _shm_names() <= before
