"""Fixtures for the model tests.

`make_params` builds a parameter tree with the exact structure, shapes and dtypes `model.init`
would return, filled from numpy instead: compiling the random initialisers costs seconds of CPU per
model on the 2-core test machines, while none of the invariance tests depend on the init
distribution. `init` itself is exercised by the determinism tests. Forward passes run unjitted: the
tests share op shapes, so eager dispatch reuses compiled ops and costs less than a jit per model.
"""
import jax
import numpy as np
import pytest


def _fill(path, leaf, rng):
  name = getattr(path[-1], "key", "")
  values = 0.1 * rng.standard_normal(leaf.shape)
  if name == "scale":  # LayerNorm gains around 1, as after init.
    values = values + 1.0
  return np.asarray(values, dtype=leaf.dtype)


@pytest.fixture
def make_params():
  """make_params(model, *inputs, seed=0, **kwargs) → variables shaped like model.init's."""
  def make(model, *inputs, seed=0, **kwargs):
    abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs, **kwargs)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(lambda p, leaf: _fill(p, leaf, rng), abstract)
  return make

