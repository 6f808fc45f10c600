"""Stateless, vectorised randomness for input pipelines: counter-based hashes and permutations.

A data pipeline that must resume bit-exactly and split work across hosts is easiest to reason
about when every random choice is a pure function of (seed, epoch, index). This module provides
that without per-example `np.random.Generator` objects (≈10 µs each, too slow per batch):

* `hash_u64(seed, *words)` — splitmix64-based mixing of integers/arrays into uniform uint64.
* `permute(positions, num_items, key)` — position → item of a pseudo-random permutation of
  [0, num_items), O(1) per element: a 4-round Feistel network over the next power-of-4 domain
  (a bijection by construction; Luby–Rackoff) with cycle-walking back into [0, num_items).
  Same role as grain's `index_shuffle`, but vectorised over a whole batch of positions.
* `uniform(seed, *words)` — floats in [0, 1) from the same hash.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_FEISTEL_ROUNDS = 4


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser (Steele et al. 2014); x: [...] uint64 → [...] uint64."""
  with np.errstate(over="ignore"):  # uint64 arithmetic is meant to wrap modulo 2**64.
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def hash_u64(seed: int, *words: int | np.ndarray) -> np.ndarray:
  """Mixes a seed and integer words (scalars or broadcastable arrays) into uniform uint64.

  Args:
    seed: any Python int (reduced modulo 2**64).
    *words: non-negative ints or int arrays; broadcast together.

  Returns:
    h: [broadcast shape] uint64, at least 1-D.
  """
  h = _splitmix64(np.atleast_1d(np.asarray(seed % 2**64, dtype=np.uint64)))
  for word in words:
    w = np.atleast_1d(np.asarray(word))
    if w.dtype.kind not in "iu":
      raise TypeError(f"hash_u64: words must be integers, got dtype {w.dtype}")
    if w.dtype.kind == "i" and w.size and w.min() < 0:
      raise ValueError("hash_u64: words must be non-negative")
    h = _splitmix64(h ^ _splitmix64(w.astype(np.uint64)))
  return h


def uniform(seed: int, *words: int | np.ndarray) -> np.ndarray:
  """Uniform floats in [0, 1) keyed by (seed, *words); shape = broadcast of words, float64."""
  return (hash_u64(seed, *words) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def permute(positions: np.ndarray, num_items: int, key: int) -> np.ndarray:
  """Items at `positions` of the pseudo-random permutation of [0, num_items) chosen by `key`.

  `permute(np.arange(n), n, key)` is a permutation of `np.arange(n)`; distinct keys give
  independent-looking permutations. Cost is O(len(positions)), independent of `num_items`.

  Args:
    positions: [b] int, each in [0, num_items).
    num_items: n >= 1.
    key: any int (e.g. `int(hash_u64(seed, epoch)[0])`).

  Returns:
    items: [b] int64.
  """
  positions = np.asarray(positions)
  if positions.ndim != 1 or positions.dtype.kind not in "iu":
    raise ValueError(f"permute: positions must be a 1-D int array, got {positions.dtype} "
                     f"{positions.shape}")
  if num_items < 1:
    raise ValueError(f"permute: num_items must be >= 1, got {num_items}")
  if positions.size and (positions.min() < 0 or positions.max() >= num_items):
    raise ValueError(f"permute: positions must lie in [0, {num_items}), got range "
                     f"[{positions.min()}, {positions.max()}]")
  half = (max(1, (num_items - 1).bit_length()) + 1) // 2
  mask = np.uint64((1 << half) - 1)
  shift = np.uint64(half)
  round_keys = [hash_u64(key, r)[0] for r in range(_FEISTEL_ROUNDS)]

  def feistel(x: np.ndarray) -> np.ndarray:
    for round_key in round_keys:
      left, right = x >> shift, x & mask
      x = (right << shift) | (left ^ (_splitmix64(right ^ round_key) & mask))
    return x

  out = feistel(positions.astype(np.uint64))
  # Cycle-walking: re-apply the bijection to values outside [0, n); the walk ends because the
  # cycle through the (in-range) start point returns into the range.
  todo = out >= np.uint64(num_items)
  while todo.any():
    out[todo] = feistel(out[todo])
    todo = out >= np.uint64(num_items)
  return out.astype(np.int64)
