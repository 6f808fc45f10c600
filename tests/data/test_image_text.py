"""The image–text grain pipelines: order contract, multi-host slicing, exact resume, eval."""
import os

import grain
import numpy as np
import pytest
from etils import epath

from data_pipelines import image_text
from data_pipelines import records
from data_pipelines import shapes
from data_pipelines import tokenizer as tl

B = 16  # global batch; 96 train records → 6 batches per epoch.
L = 40


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _train(data_dir, **kw):
  args = dict(global_batch_size=B, seed=5, max_text_len=L, num_threads=0,
              prefetch_buffer_size=0)
  args.update(kw)
  return image_text.train_iterator(data_dir, **args)


def test_build_outputs(small_shapes_dir, small_params):
  meta = image_text.load_metadata(small_shapes_dir)
  assert {k: v["num_examples"] for k, v in meta["splits"].items()} == {"train": 96, "test": 23}
  assert [len(v["shards"]) for v in meta["splits"].values()] == [3, 3]
  assert meta["source"]["seed"] == small_params["seed"]
  assert meta["vocab_size"] == image_text.load_tokenizer(small_shapes_dir).vocab_size
  assert image_text.split_size(small_shapes_dir, "test") == 23
  names = {f["name"]: f for f in meta["schema"]}
  assert names["image"]["shape"] == [32, 32, 3] and names["image"]["dtype"] == "uint8"
  # Records hold the generator's example and the caption's token ids.
  src = records.ArrayRecordSource(small_shapes_dir, "test")
  tok = image_text.load_tokenizer(small_shapes_dir)
  for i in (0, 22):
    rec, ex = src[i], shapes.generate_example(small_params["seed"], "test", i)
    np.testing.assert_array_equal(rec["image"], ex["image"])
    assert rec["caption"] == ex["caption"]
    np.testing.assert_array_equal(rec["object_color"], ex["object_color"])
    np.testing.assert_array_equal(rec["caption_ids"], tok.encode_unpadded([ex["caption"]])[0])


def test_build_is_deterministic(tmp_path, small_params):
  a = image_text.build_shapes_dataset(tmp_path / "a", **small_params)
  b = image_text.build_shapes_dataset(tmp_path / "b", **small_params)
  assert a["splits"] == b["splits"] and a["tokenizer_sha256"] == b["tokenizer_sha256"]


def test_batch_contents_match_records(small_shapes_dir, small_params):
  batch = next(_train(small_shapes_dir))
  assert batch["image"].shape == (B, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["text"].shape == (B, L) and batch["text"].dtype == np.int32
  assert batch["index"].shape == (B,) and batch["index"].dtype == np.int64
  tok = image_text.load_tokenizer(small_shapes_dir)
  for row in (0, B - 1):
    ex = shapes.generate_example(small_params["seed"], "train", int(batch["index"][row]))
    np.testing.assert_array_equal(batch["image"][row], ex["image"])
    np.testing.assert_array_equal(batch["text"][row], tok.encode([ex["caption"]], L)[0])
  np.testing.assert_array_equal(
      batch["index"], image_text.global_batch_indices(96, B, 5, 0))


def test_same_seed_same_batches_other_seed_other_order(small_shapes_dir):
  _assert_batches_equal(_take(_train(small_shapes_dir), 3), _take(_train(small_shapes_dir), 3))
  a = next(_train(small_shapes_dir))["index"]
  b = next(_train(small_shapes_dir, seed=6))["index"]
  assert not np.array_equal(a, b)


def test_epochs_are_distinct_permutations(small_shapes_dir):
  it = _train(small_shapes_dir, num_epochs=3)
  batches = list(it)
  assert len(batches) == 3 * (96 // B)
  epochs = [np.concatenate([b["index"] for b in batches[e * 6:(e + 1) * 6]]) for e in range(3)]
  for e in epochs:
    assert sorted(e) == list(range(96))  # 96 % 16 == 0: every record once per epoch
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_remainder_of_epoch_is_dropped():
  n, b = 100, 16  # 6 batches per epoch, 4 records dropped (different ones each epoch)
  idx = [image_text.global_batch_indices(n, b, 0, t) for t in range(12)]
  first, second = np.concatenate(idx[:6]), np.concatenate(idx[6:])
  assert len(set(first)) == 96 and len(set(second)) == 96
  assert set(range(n)) - set(first) != set(range(n)) - set(second)


def test_two_hosts_concatenate_to_the_global_batch(small_shapes_dir):
  single = _take(_train(small_shapes_dir, augment=True), 8)  # crosses an epoch boundary
  hosts = [_take(_train(small_shapes_dir, augment=True, process_index=p, process_count=2), 8)
           for p in range(2)]
  for t in range(8):
    for k in single[t]:
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][t][k], hosts[1][t][k]]), single[t][k], err_msg=f"{t} {k}")
    assert hosts[0][t]["image"].shape[0] == B // 2


def test_host_decodes_only_its_rows(small_shapes_dir, monkeypatch):
  requested = []
  real = records.ArrayRecordSource.read_many

  def spy(self, indices):
    requested.extend(indices)
    return real(self, indices)

  monkeypatch.setattr(records.ArrayRecordSource, "read_many", spy)
  batch = next(_train(small_shapes_dir, process_index=1, process_count=4))
  assert sorted(requested) == sorted(batch["index"].tolist())
  assert len(requested) == B // 4


@pytest.mark.parametrize("stop", [2, 6, 9])  # mid-epoch, at the epoch boundary, next epoch
def test_exact_resume_from_state(small_shapes_dir, stop):
  reference = _take(_train(small_shapes_dir, augment=True, num_threads=2,
                           prefetch_buffer_size=3), 14)
  it = _train(small_shapes_dir, augment=True, num_threads=2, prefetch_buffer_size=3)
  _take(it, stop)
  state = it.get_state()
  fresh = _train(small_shapes_dir, augment=True, num_threads=2, prefetch_buffer_size=3)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 14 - stop), reference[stop:])


def test_state_round_trips_through_grain_checkpoint_handler(small_shapes_dir, tmp_path):
  it = _train(small_shapes_dir)
  _take(it, 4)
  ckpt = epath.Path(tmp_path)
  grain.checkpoint.CheckpointHandler().save(ckpt, item=it)
  expected = _take(it, 3)
  restored = grain.checkpoint.CheckpointHandler().restore(ckpt, item=_train(small_shapes_dir))
  _assert_batches_equal(_take(restored, 3), expected)


def test_augmentation_is_keyed_by_seed_epoch_index(small_shapes_dir):
  plain = _take(_train(small_shapes_dir, num_epochs=2), 12)
  aug = _take(_train(small_shapes_dir, num_epochs=2, augment=True), 12)
  aug2 = _take(_train(small_shapes_dir, num_epochs=2, augment=True), 12)
  _assert_batches_equal(aug, aug2)
  by_epoch = [{}, {}]
  for t, (p, a) in enumerate(zip(plain, aug)):
    np.testing.assert_array_equal(p["index"], a["index"])
    np.testing.assert_array_equal(p["text"], a["text"])
    assert not np.array_equal(p["image"], a["image"])
    for row, i in enumerate(a["index"]):
      by_epoch[t // 6][int(i)] = a["image"][row]
  same = sum(np.array_equal(by_epoch[0][i], by_epoch[1][i]) for i in range(96))
  assert same < 20  # a new draw each epoch


def test_augmentation_is_a_small_shift_and_gain():
  img = np.zeros((1, 32, 32, 3), np.uint8)
  img[0, 10:20, 12:16] = 200
  # pylint: disable-next=protected-access
  out = image_text._augment(img, seed=0, epoch=0, indices=np.array([3]))
  mask = out[0, ..., 0] > 0
  rows, cols = np.nonzero(mask)
  assert rows.max() - rows.min() == 9 and cols.max() - cols.min() == 3  # same shape
  assert abs(rows.min() - 10) <= 2 and abs(cols.min() - 12) <= 2  # shifted at most 2 px
  assert 180 <= out[0, rows[0], cols[0], 0] <= 220  # gain within ±10%


def test_batch_size_errors(small_shapes_dir):
  with pytest.raises(ValueError, match="multiple of process_count=3"):
    _train(small_shapes_dir, process_count=3)
  with pytest.raises(ValueError, match="exceeds the split size 96"):
    _train(small_shapes_dir, global_batch_size=128)
  with pytest.raises(ValueError, match="process_index"):
    _train(small_shapes_dir, process_index=2, process_count=2)


def test_bad_records_in_training_raise_or_are_skipped(shapes_copy, rewrite_record):
  meta = image_text.load_metadata(shapes_copy)
  shard = meta["splits"]["train"]["shards"][0]["file"]  # records 0..31
  for pos in range(32):
    rewrite_record(shapes_copy, shard, pos, b"\xc1garbage")
  with pytest.raises(records.CorruptRecordError, match=shard):
    _take(_train(shapes_copy), 6)
  it = _train(shapes_copy, skip_bad_records=True)
  batches = _take(it, 6)  # one epoch
  indices = np.concatenate([b["index"] for b in batches])
  assert indices.min() >= 32  # bad records replaced by the next good one
  assert all(b["image"].shape == (B, 32, 32, 3) for b in batches)


def test_eval_batches_cover_split_in_order(small_shapes_dir):
  batches = list(image_text.eval_batches(small_shapes_dir, batch_size=10, max_text_len=L))
  assert len(batches) == 3
  index = np.concatenate([b["index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(index[valid], np.arange(23))
  assert valid.sum() == 23 and not valid[23:].any() and (index[23:] == -1).all()
  last = batches[-1]
  assert (last["text"][3:, :2] == [tl.BOS_ID, tl.EOS_ID]).all()
  assert (last["text"][3:, 2:] == 0).all()
  assert (last["image"][3:] == 0).all()
  src = records.ArrayRecordSource(small_shapes_dir, "test")
  assert batches[1]["image"].dtype == np.uint8  # normalised by the image tower, on the device
  np.testing.assert_array_equal(batches[1]["image"][4], src[14]["image"])


def test_eval_two_hosts_concatenate(small_shapes_dir):
  single = list(image_text.eval_batches(small_shapes_dir, batch_size=10, max_text_len=L))
  hosts = [list(image_text.eval_batches(small_shapes_dir, batch_size=10, max_text_len=L,
                                        process_index=p, process_count=2)) for p in range(2)]
  assert len(hosts[0]) == len(hosts[1]) == len(single)
  for t, s in enumerate(single):
    for k in s:
      np.testing.assert_array_equal(np.concatenate([hosts[0][t][k], hosts[1][t][k]]), s[k])


def test_worker_processes_give_the_same_batches_and_resume(small_shapes_dir):
  # (A state taken with worker_count=k restores into an iterator with the same worker_count.)
  reference = _take(_train(small_shapes_dir, augment=True), 5)
  segments = lambda: {n for n in os.listdir("/dev/shm") if not n.startswith("sem.")}  # noqa: E731
  before = segments()
  it = _train(small_shapes_dir, augment=True, worker_count=1)
  try:
    _assert_batches_equal(_take(it, 2), reference[:2])
    state = it.get_state()
    # Both came through the worker's slot ring, whose name left /dev/shm once mapped.
    assert it.counts == {"from_slots": 2, "passed_through": 0}
    assert segments() <= before
  finally:
    it.close()
  fresh = _train(small_shapes_dir, augment=True, worker_count=1)
  try:
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), reference[2:])
    assert fresh.counts["from_slots"] == 3
  finally:
    fresh.close()
  assert segments() <= before
