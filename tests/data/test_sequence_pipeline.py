"""Sequence transforms (leave-one-out, padding, masking) and the interactions grain pipeline:
order contract across hosts, exact resume, evaluation targets."""
import numpy as np
import pytest

from data_pipelines import convert as convert_lib
from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines import sequences


def test_leave_one_out_and_padding():
  items = np.asarray([5, 6, 7, 8, 9], np.int32)
  np.testing.assert_array_equal(sequences.train_part(items), [5, 6, 7])
  hist, tgt = sequences.eval_example(items, "valid")
  np.testing.assert_array_equal(hist, [5, 6, 7]) and tgt == 8
  assert tgt == 8
  hist, tgt = sequences.eval_example(items, "test")
  np.testing.assert_array_equal(hist, [5, 6, 7, 8])
  assert tgt == 9
  assert sequences.eval_example(items[:2], "test") is None
  np.testing.assert_array_equal(sequences.train_part(items[:2]), [5, 6])
  np.testing.assert_array_equal(sequences.pad_left([items, items[:2], items[:0]], 3),
                                [[7, 8, 9], [0, 5, 6], [0, 0, 0]])
  inp, tgt = sequences.next_item_example(items, 4)
  np.testing.assert_array_equal(inp, [0, 0, 5, 6])
  np.testing.assert_array_equal(tgt, [0, 0, 6, 7])


def test_mask_items_invariants():
  inputs = sequences.pad_left([np.arange(1, 30), np.arange(1, 3), np.zeros(0, np.int32)], 20)
  masked, labels = sequences.mask_items(inputs, prob=0.3, mask_id=99, seed=1, epoch=0,
                                        indices=np.asarray([0, 1, 2]))
  is_mask = masked == 99
  np.testing.assert_array_equal(labels != 0, is_mask)
  np.testing.assert_array_equal(labels[is_mask], inputs[is_mask])
  np.testing.assert_array_equal(masked[~is_mask], inputs[~is_mask])
  assert not is_mask[inputs == 0].any()
  assert is_mask[0].sum() >= 1 and is_mask[1].sum() >= 1 and not is_mask[2].any()
  again, _ = sequences.mask_items(inputs, prob=0.3, mask_id=99, seed=1, epoch=0,
                                  indices=np.asarray([0, 1, 2]))
  np.testing.assert_array_equal(masked, again)
  big = sequences.pad_left([np.arange(1, 2001)], 2000)
  m, _ = sequences.mask_items(big, prob=0.3, mask_id=-1, seed=2, epoch=0, indices=np.asarray([7]))
  assert 0.26 < (m == -1).mean() < 0.34


@pytest.fixture(scope="module")
def seq_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("seq")
  rng = np.random.default_rng(0)
  lines = [f"{u} {' '.join(map(str, rng.integers(1, 40, size=int(rng.integers(2, 15)))))}"
           for u in range(1, 38)]
  (d / "S.txt").write_text("\n".join(lines) + "\n")
  convert_lib.convert("s3rec", d / "S.txt", d / "ds", num_shards=3)
  return d / "ds"


def _users(seq_dir):
  src = records.ArrayRecordSource(seq_dir, "sequences")
  return [r["items"] for r in src.read_many(list(range(len(src))))]


@pytest.mark.parametrize("mode", ["next_item", "prefix", "masked"])
def test_resume_is_exact_and_hosts_partition(seq_dir, mode):
  cfg = {"dir": str(seq_dir), "global_batch_size": 8, "seed": 3, "max_len": 6,
         "sequence_mode": mode, "num_epochs": 3}
  it = pipelines.build_train_iterator(cfg)
  full = list(it)
  assert len(full) == 3 * (37 // 8)
  it = pipelines.build_train_iterator(cfg)
  for _ in range(5):
    next(it)
  state = it.get_state()
  resumed = pipelines.build_train_iterator(cfg)
  resumed.set_state(state)
  rest = list(resumed)
  assert len(rest) == len(full) - 5
  for a, b in zip(full[5:], rest):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  halves = [list(pipelines.build_train_iterator(cfg, process_index=p, process_count=2))
            for p in range(2)]
  for t, batch in enumerate(full):
    for k in batch:
      np.testing.assert_array_equal(np.concatenate([halves[0][t][k], halves[1][t][k]]), batch[k])
  epoch0 = np.concatenate([b["index"] for b in full[:4]])
  assert len(set(epoch0.tolist())) == 32  # no repeats within an epoch


def test_training_rows_never_leak_eval_targets(seq_dir):
  users = _users(seq_dir)
  cfg = {"dir": str(seq_dir), "global_batch_size": 8, "seed": 0, "max_len": 20,
         "sequence_mode": "prefix", "num_epochs": 2}
  for batch in pipelines.build_train_iterator(cfg):
    for h, t, w, i in zip(batch["history"], batch["target"], batch["weight"], batch["index"]):
      items = users[i]
      part = sequences.train_part(items)
      if w:
        p = int((h != 0).sum())
        np.testing.assert_array_equal(h[-p:], part[:p])
        assert t == part[p]
      else:
        assert len(part) < 2


@pytest.mark.parametrize("split", ["valid", "test"])
def test_eval_pass_targets(seq_dir, split):
  users = _users(seq_dir)
  cfg = {"dir": str(seq_dir), "global_batch_size": 8, "max_len": 50}
  batches = list(pipelines.build_eval_iterator(cfg, batch_size=10, mode=split))
  assert len(batches) == 4
  valid = np.concatenate([b["valid"] for b in batches])
  target = np.concatenate([b["target"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  assert valid.sum() == sum(len(u) >= 3 for u in users)
  for v, t, i in zip(valid, target, index):
    if i < 0:
      assert not v
      continue
    assert v == (len(users[i]) >= 3)
    if v:
      assert t == users[i][-1 if split == "test" else -2]


def test_item_table(seq_dir):
  table = pipelines.load_item_table(seq_dir, max_text_len=4, max_attributes=3)
  assert table["attributes"].shape == (40, 3) and table["item_ids"][5] == "5"
  assert (table["attributes"] == -1).all()  # no attributes file was given


def test_put_on_mesh_shards_batch_over_data_axis(seq_dir):
  import jax
  from mmcl.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(data=jax.device_count())
  cfg = {"dir": str(seq_dir), "global_batch_size": 8, "max_len": 6}
  batch = pipelines.build_train_dataset(cfg)[0][0]
  arrays = mesh_lib.put_on_mesh(batch, mesh)
  assert arrays["inputs"].shape == (8, 6)
  assert len(arrays["inputs"].sharding.device_set) == jax.device_count()
  np.testing.assert_array_equal(np.asarray(arrays["inputs"]), batch["inputs"])
