"""Helpers of the fault-injection tests."""
import pathlib

from mmcl.config import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(shapes_dir, **overrides):
  """experiments/clip_shapes.py:tiny on `shapes_dir` (synchronous saves) with `a__b=value`."""
  c = load_config_file(str(REPO / "experiments/clip_shapes.py") + ":tiny")
  c.data.dir = str(shapes_dir)
  c.train.async_checkpointing = False
  for k, v in overrides.items():
    c.set(k.replace("__", "."), v)
  return c
