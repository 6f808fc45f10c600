"""The BPE caption tokenizer: special ids, round trip, padding/truncation, determinism."""
import pickle

import numpy as np
import pytest

from data_pipelines import shapes
from data_pipelines import tokenizer as tl

CAPTIONS = [shapes.generate_example(0, "train", i)["caption"] for i in range(300)]


@pytest.fixture(scope="module")
def tok():
  return tl.TextTokenizer.train(CAPTIONS)


def test_round_trip_and_special_ids(tok):
  ids = tok.encode(CAPTIONS[:50], max_len=48)
  assert ids.dtype == np.int32 and ids.shape == (50, 48)
  for row, caption in zip(ids, CAPTIONS[:50]):
    n = int((row != tl.PAD_ID).sum())
    assert row[0] == tl.BOS_ID and row[n - 1] == tl.EOS_ID
    assert (row[n:] == tl.PAD_ID).all() and (row[:n] != tl.PAD_ID).all()
    assert tl.UNK_ID not in row
    assert tok.decode(row) == caption  # exact: captions are lowercase already
  assert tok.decode(tok.encode(["A Big ORANGE Ball, Left!"], 32)[0]) == "a big orange ball, left!"


def test_whole_words_become_single_tokens(tok):
  # Every word of the closed caption vocabulary was merged into one token.
  row = tok.encode(["a large red circle at the top left."], 16)[0]
  assert int((row != 0).sum()) == 2 + 8 + 1  # BOS, 8 words, ".", EOS


def test_truncation_keeps_eos():
  out = tl.pad_or_truncate([[2, 10, 11, 12, 13, 3], [2, 9, 3]], max_len=4)
  np.testing.assert_array_equal(out, [[2, 10, 11, 3], [2, 9, 3, 0]])
  with pytest.raises(ValueError, match="max_len"):
    tl.pad_or_truncate([[2, 3]], max_len=1)


def test_training_is_deterministic_and_save_load_pickle(tok, tmp_path):
  again = tl.TextTokenizer.train(CAPTIONS)
  assert again.to_json() == tok.to_json()
  tok.save(tmp_path / "tokenizer.json")
  loaded = tl.TextTokenizer.load(tmp_path / "tokenizer.json")
  unpickled = pickle.loads(pickle.dumps(tok))
  expected = tok.encode(CAPTIONS[:20], 40)
  np.testing.assert_array_equal(loaded.encode(CAPTIONS[:20], 40), expected)
  np.testing.assert_array_equal(unpickled.encode(CAPTIONS[:20], 40), expected)
  assert loaded.vocab_size == tok.vocab_size > 40
  assert not list(tmp_path.glob(".*tmp*"))


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.json"):
    tl.TextTokenizer.load(tmp_path / "nope.json")
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    tl.TextTokenizer.load(tmp_path / "bad.json")
  with pytest.raises(TypeError, match="single str"):
    tl.TextTokenizer.train(CAPTIONS[:10]).encode("a caption", 8)


def test_pad_or_truncate_pad_and_end_options():
  seqs = [[2, 10, 11, 12, 13, 7], [2, 9, 7]]
  np.testing.assert_array_equal(tl.pad_or_truncate(seqs, 4, pad_id=-1, last_id="keep"),
                                [[2, 10, 11, 7], [2, 9, 7, -1]])
  np.testing.assert_array_equal(tl.pad_or_truncate(seqs, 4, last_id=None), [[2, 10, 11, 12],
                                                                           [2, 9, 7, 0]])
  np.testing.assert_array_equal(tl.pad_or_truncate(seqs, 4, last_id=99)[0], [2, 10, 11, 99])
  assert tl.pad_or_truncate([[5, 6]], 1, last_id=None).tolist() == [[5]]
