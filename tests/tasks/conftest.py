"""Planted interaction datasets for the recommendation recipes' tests (written to tmp_path)."""
import numpy as np
import pytest

from data_pipelines.converters import interactions


def write_planted_sequences(path, *, num_users=96, num_items=40, min_len=6, max_len=12, seed=0,
                            with_text=False):
  """Users walk the item cycle 1 → 2 → … → N → 1 from a random start, so the next item is a
  deterministic function of the last one; optional item text names each item's cycle position."""
  rng = np.random.default_rng(seed)
  seqs = []
  for _ in range(num_users):
    start, n = rng.integers(0, num_items), rng.integers(min_len, max_len + 1)
    seqs.append((start + np.arange(n)) % num_items + 1)
  text = [f"item {j} group {j % 5}" for j in range(1, num_items + 1)] if with_text else None
  data = interactions.InteractionData(
      user_ids=[f"u{u}" for u in range(num_users)], sequences=[s.astype(np.int32) for s in seqs],
      item_ids=[f"i{j}" for j in range(1, num_items + 1)], item_text=text)
  interactions.write_interactions(path, data, source={"converter": "planted", "input": str(path)},
                                  num_shards=1, vocab_size=300)
  return path


@pytest.fixture(scope="session")
def planted_seq_dir(tmp_path_factory):
  return write_planted_sequences(tmp_path_factory.mktemp("planted") / "seq")


@pytest.fixture(scope="session")
def write_planted():
  """The `write_planted_sequences` function, for tests that need other sizes or item text."""
  return write_planted_sequences


GROUP_WORDS = ("red", "green", "blue", "gold", "gray")


def write_group_sequences(path, *, num_users=96, num_items=40, length=8, seed=0):
  """Each user stays inside one item group (item j is in group j % 5, named in its text "item j
  <colour>"), so the group of the next item is predictable from content alone, also for items
  never seen in training; the item within the group is random."""
  rng = np.random.default_rng(seed)
  groups = np.arange(1, num_items + 1) % len(GROUP_WORDS)
  seqs = []
  for _ in range(num_users):
    members = np.nonzero(groups == rng.integers(len(GROUP_WORDS)))[0] + 1
    seqs.append(rng.choice(members, size=length, replace=False).astype(np.int32))
  text = [f"item {j} {GROUP_WORDS[j % len(GROUP_WORDS)]}" for j in range(1, num_items + 1)]
  data = interactions.InteractionData(
      user_ids=[f"u{u}" for u in range(num_users)], sequences=seqs,
      item_ids=[f"i{j}" for j in range(1, num_items + 1)], item_text=text)
  interactions.write_interactions(path, data, source={"converter": "planted-groups",
                                                      "input": str(path)},
                                  num_shards=1, vocab_size=300)
  return path


@pytest.fixture(scope="session")
def group_seq_dir(tmp_path_factory):
  return write_group_sequences(tmp_path_factory.mktemp("groups") / "seq")
