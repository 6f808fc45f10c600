"""Caption tokenizer: a byte-pair-encoding model trained with HuggingFace `tokenizers`.

Trained on a dataset's training captions when the dataset is built and saved beside it as
`tokenizer.json`, so a dataset directory is self-contained.

Model: BPE (Sennrich et al. 2016) over lowercased text; words are split on whitespace with a
SentencePiece-style "▁" word-start marker and punctuation is isolated, so `decode(encode(t))`
gives back the lowercased `t` exactly. The initial alphabet holds all ASCII letters, digits and
punctuation, so any ASCII query encodes without `[UNK]`. BPE, not WordPiece: the `tokenizers`
WordPiece trainer assigns different vocabularies to identical inputs from run to run (hash-map
order decides ties), while its BPE trainer is deterministic — and a rebuilt dataset must be
byte-identical.

Special ids (fixed):
  0 `[PAD]` padding (so `ids != 0` is the attention mask),
  1 `[UNK]` unknown character,
  2 `[BOS]` first token of every sequence,
  3 `[EOS]` last token of every sequence (kept even after truncation), so a text tower can pool
    the EOS position: `eos_position = (ids != 0).sum(-1) - 1`.
"""

from __future__ import annotations

import os
import pathlib
import string
import uuid
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
INITIAL_ALPHABET = tuple(string.ascii_lowercase + string.digits + string.punctuation)


def pad_or_truncate(sequences: Sequence[Sequence[int] | np.ndarray], max_len: int, *,
                    pad_id: int = 0, last_id: int | str | None = EOS_ID) -> np.ndarray:
  """Packs token-id sequences (each `[BOS] ... [EOS]`) into a right-padded matrix.

  A sequence longer than `max_len` keeps its first `max_len - 1` ids and then `last_id`, so the
  last non-pad token of every row is always the end token.

  Args:
    sequences: N sequences of ids, each starting with BOS and ending with EOS.
    max_len: L >= 2 (>= 1 when `last_id` is None).
    pad_id: the id of the padding.
    last_id: the id that ends a truncated row (default this module's EOS); "keep": the row's own
      last id (a tokenizer whose closing special token is not EOS_ID, e.g. BERT's [SEP]); None: a
      plain cut after `max_len` ids.

  Returns:
    ids: [N, L] int32.
  """
  if max_len < (1 if last_id is None else 2):
    raise ValueError(f"max_len must be >= 2 (room for [BOS] and [EOS]), got {max_len}")
  out = np.full((len(sequences), max_len), pad_id, np.int32)
  for row, seq in enumerate(sequences):
    n = len(seq)
    if n <= max_len:
      out[row, :n] = seq
    elif last_id is None:
      out[row] = seq[:max_len]
    else:
      out[row, :max_len - 1] = seq[:max_len - 1]
      out[row, max_len - 1] = seq[-1] if last_id == "keep" else last_id
  return out


class TextTokenizer:
  """Thin, picklable wrapper around a trained `tokenizers.Tokenizer`."""

  def __init__(self, tokenizer: Tokenizer):
    for expected_id, token in enumerate(SPECIAL_TOKENS):
      found = tokenizer.token_to_id(token)
      if found != expected_id:
        raise ValueError(f"tokenizer: special token {token} must have id {expected_id}, "
                         f"found {found}")
    self._tokenizer = tokenizer

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int = 1024) -> "TextTokenizer":
    """Trains a BPE tokenizer on `texts`; deterministic for a given text sequence."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(prepend_scheme="always"),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=list(INITIAL_ALPHABET), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", BOS_ID), ("[EOS]", EOS_ID)])
    return cls(tok)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "TextTokenizer":
    """Loads a `tokenizer.json` written by `save`."""
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer file {path} not found")
    try:
      return cls(Tokenizer.from_file(str(path)))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON.
      raise ValueError(f"tokenizer file {path} could not be parsed: {e}") from e

  def save(self, path: str | os.PathLike) -> None:
    """Writes `tokenizer.json` atomically (temporary file, then rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
      tmp.write_text(self.to_json(), encoding="utf-8")
      os.replace(tmp, path)
    finally:
      tmp.unlink(missing_ok=True)

  def to_json(self) -> str:
    return self._tokenizer.to_str()

  @property
  def vocab_size(self) -> int:
    """Number of ids (including the 4 special ids); ids lie in [0, vocab_size)."""
    return self._tokenizer.get_vocab_size()

  def encode_unpadded(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids `[BOS] ... [EOS]` of each text, unpadded and untruncated."""
    if isinstance(texts, str):
      raise TypeError("encode expects a sequence of strings, got a single str")
    return [enc.ids for enc in self._tokenizer.encode_batch_fast(list(texts))]

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Encodes texts into padded id rows.

    Args:
      texts: N strings.
      max_len: L, row length (longer texts are truncated, keeping EOS last).

    Returns:
      ids: [N, L] int32; row = [BOS, tokens..., EOS, 0, ...].
    """
    return pad_or_truncate(self.encode_unpadded(texts), max_len)

  def decode(self, ids: np.ndarray | Sequence[int]) -> str:
    """Text of one id row; special ids and padding are dropped."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def __getstate__(self) -> dict:
    return {"json": self.to_json()}

  def __setstate__(self, state: dict) -> None:
    self._tokenizer = Tokenizer.from_str(state["json"])

  def __repr__(self) -> str:
    return f"TextTokenizer(vocab_size={self.vocab_size})"
