"""Interaction-sequence transforms: leave-one-out splits, truncation + left padding, masking.

Conventions (those of SASRec / BERT4Rec / UniSRec):
  * item indices are 1..N, 0 is padding; `mask_id` (= N + 1) marks a masked position;
  * sequences are left-padded: the most recent item sits in the last column, and truncation
    keeps the most recent `max_len` items;
  * leave-one-out: for a user with items x_1..x_n (n >= 3) the test target is x_n with history
    x_1..x_{n-1}, the validation target x_{n-1} with history x_1..x_{n-2}, and training uses
    x_1..x_{n-2}. Users with n < 3 train on all their items and are not evaluated (SASRec's
    `data_partition`).

Randomness (masking, prefix choice) is a pure function of (seed, epoch, record index, position)
through `permutation.uniform`, so batches are identical after a resume and on every host.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from data_pipelines import permutation

SPLITS = ("train", "valid", "test")
_MASK_STREAM = 0x4D61736B
_PREFIX_STREAM = 0x50726566


def train_part(items: np.ndarray) -> np.ndarray:
  """The items a user trains on: items[:-2] when n >= 3, else all. items: [n] int32."""
  return items[:-2] if len(items) >= 3 else items


def eval_example(items: np.ndarray, split: str) -> tuple[np.ndarray, int] | None:
  """(history [m] int32, target) of `split` ('valid' / 'test'); None when n < 3."""
  if split not in ("valid", "test"):
    raise ValueError(f"eval split must be 'valid' or 'test', got {split!r}")
  if len(items) < 3:
    return None
  cut = len(items) - (2 if split == "valid" else 1)
  return items[:cut], int(items[cut])


def pad_left(sequences: Sequence[np.ndarray], max_len: int) -> np.ndarray:
  """Left-pads / truncates (keeping the most recent items) into a matrix.

  Args:
    sequences: B int arrays [n_b].
    max_len: L >= 1.

  Returns:
    [B, L] int32, row b = [0, ..., 0, last min(n_b, L) items of sequence b].
  """
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  out = np.zeros((len(sequences), max_len), np.int32)
  for b, seq in enumerate(sequences):
    tail = np.asarray(seq[-max_len:] if len(seq) else seq, np.int32)
    if len(tail):
      out[b, max_len - len(tail):] = tail
  return out


def next_item_example(items: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """SASRec training pair from the train part t: inputs t[:-1], targets t[1:], both [L] int32
  left-padded (targets 0 where there is no next item)."""
  t = train_part(items)
  return pad_left([t[:-1]], max_len)[0], pad_left([t[1:]], max_len)[0]


def random_prefix(items: np.ndarray, *, seed: int, epoch: int, index: int
                  ) -> tuple[np.ndarray, int] | None:
  """One (history, target) drawn uniformly among the train part's prefixes: target t[p], history
  t[:p] for p in 1..len(t)-1 (UniSRec trains on every prefix; one per user per epoch here).
  None when the train part has fewer than 2 items."""
  t = train_part(items)
  if len(t) < 2:
    return None
  u = permutation.uniform(seed, _PREFIX_STREAM, epoch, index)[0]
  p = 1 + int(u * (len(t) - 1))
  return t[:p], int(t[p])


def mask_items(inputs: np.ndarray, *, prob: float, mask_id: int, seed: int, epoch: int,
               indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """BERT4Rec cloze masking: each non-padding position is replaced by `mask_id` with
  probability `prob`; a row that would get no mask gets its last (most recent) item masked.

  Args:
    inputs: [B, L] int32, 0 = padding.
    prob: masking probability in (0, 1].
    mask_id: the mask token (num_items + 1).
    seed, epoch: randomness key, with each row's record index `indices` [B] int64.

  Returns:
    masked: [B, L] int32; labels: [B, L] int32 = the original item where masked, else 0.
  """
  if not 0.0 < prob <= 1.0:
    raise ValueError(f"mask prob must be in (0, 1], got {prob}")
  b, length = inputs.shape
  u = permutation.uniform(seed, _MASK_STREAM, epoch, np.asarray(indices, np.int64)[:, None],
                          np.arange(length)[None, :])
  real = inputs != 0
  masked_pos = (u < prob) & real
  empty = ~masked_pos.any(axis=1) & real.any(axis=1)
  masked_pos[empty, length - 1] = True  # left padding: the last column is always real
  labels = np.where(masked_pos, inputs, 0).astype(np.int32)
  return np.where(masked_pos, mask_id, inputs).astype(np.int32), labels
