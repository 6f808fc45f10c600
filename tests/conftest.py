"""Test setup: every test runs on the CPU with 8 simulated devices, so sharding is exercised."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
  os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
  """Path to ../shared/data; skips the test with a reason when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared datasets not found at {SHARED_DATA}")
  return SHARED_DATA


REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A small procedural image–caption dataset (512 train / 128 test pairs, 32 px), built once."""
  from data_pipelines.image_text import build_shapes_dataset
  out = tmp_path_factory.mktemp("shapes")
  build_shapes_dataset(out, num_train=512, num_test=128, image_size=32, seed=0, num_shards=2)
  return out
