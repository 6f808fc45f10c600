"""Fixtures shared by the export tests and the features-from-trained-towers tests."""
import pytest

from mmcl.export import export_workdir
from mmcl.tasks import get_task_class


@pytest.fixture(scope="session")
def workdir(tiny_clip_workdir):
  return tiny_clip_workdir


@pytest.fixture(scope="session")
def exported(workdir, tmp_path_factory):
  """The tiny CLIP workdir exported once for every export and serving test: jax.export and ONNX
  artifacts, the test split's corpora and their exact FAISS indexes."""
  out = tmp_path_factory.mktemp("out") / "serving"
  manifest = export_workdir(workdir, out, corpus=True, fmt="onnx", index="faiss",
                            resolve_task=get_task_class)
  return out, manifest
