"""Fixtures shared by the export tests and the features-from-trained-towers tests."""
import json

import pytest

import shared_runs
from mmcl.export import export_workdir
from mmcl.tasks import get_task_class


@pytest.fixture(scope="session")
def workdir(tiny_clip_workdir):
  return tiny_clip_workdir


@pytest.fixture(scope="session")
def exported(workdir, tmp_path_factory):
  """The tiny CLIP workdir exported once for every export and serving test: jax.export and ONNX
  artifacts, the test split's corpora and their exact FAISS indexes. Exported once per test
  session: the first pytest-xdist worker to need it writes it under a file lock, the others read
  it (every worker's `workdir` holds the same parameters, bit for bit: one seed, one program)."""
  root = shared_runs.shared_root(tmp_path_factory)
  out = root / "export" / "serving"
  with shared_runs.locked(root / ".export.lock"):
    if not (out / "manifest.json").is_file():
      export_workdir(workdir, out, corpus=True, fmt="onnx", index="faiss",
                     resolve_task=get_task_class)
  return out, json.loads((out / "manifest.json").read_text())
