"""Helpers of the data tests that compare iterators batch by batch."""
import numpy as np


def take(it, n):
  """The next `n` batches of iterator `it`."""
  return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
  """Two lists of batches ({name: array}) hold the same names and identical arrays."""
  assert len(xs) == len(ys)
  for t, (x, y) in enumerate(zip(xs, ys)):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=f"batch {t} {k}")
