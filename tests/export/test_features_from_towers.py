"""`mmcl features` with trained towers: a `mmcl train` workdir's towers and their `mmcl export`
artifacts embed a converted dataset's image and text fields exactly as the task does (the
workdir and export fixtures are in tests/export/conftest.py)."""
import numpy as np
import pytest

from mmcl.pretrained.features import compute_features, read_features
from mmcl.tasks import get_task_class


@pytest.fixture(scope="module")
def reference(exported):
  """The task's own embeddings of the test split in record order: the evaluator's pass that
  `mmcl export --corpus` wrote (test_export.py checks them against the served artifacts)."""
  out, manifest = exported
  assert (out / "corpus" / "images.ids.txt").read_text().split() == [str(i) for i in range(128)]
  return {"image": np.load(out / manifest["corpus"]["images"]["embeddings"]),
          "text": np.load(out / manifest["corpus"]["captions"]["embeddings"])}


def test_workdir_towers_embed_image_and_text_fields(workdir, shapes_dir, reference, tmp_path):
  kw = dict(split="test", batch_size=48, chunk_size=64, progress=False,
            resolve_task=get_task_class)
  image = compute_features(f"{workdir}:image", shapes_dir, "image", tmp_path / "img", **kw)
  text = compute_features(workdir, shapes_dir, "caption", tmp_path / "txt", tower_name="text",
                          **kw)
  for name, result, out in (("image", image, "img"), ("text", text, "txt")):
    features = read_features(tmp_path / out, verify_hashes=True)
    # No id field in the shapes schema: ids are the record indices (as `export --corpus`).
    assert features.ids == [str(i) for i in range(128)]
    assert result.manifest["tower"]["source"] == "workdir"
    assert (result.manifest["tower"]["tower"], result.manifest["tower"]["step"]) == (name, 3)
    assert result.manifest["kind"] == name and result.manifest["id_field"] == "index"
    np.testing.assert_allclose(features.vectors, reference[name], atol=2e-6)
  assert text.manifest["max_length"] == 40
  # A text tower cannot embed an image field, and a workdir needs its tower named.
  with pytest.raises(ValueError, match="holds images but .* is a text tower"):
    compute_features(f"{workdir}:text", shapes_dir, "image", tmp_path / "x", **kw)
  with pytest.raises(ValueError, match=r"towers \['image', 'text'\]: choose one"):
    compute_features(workdir, shapes_dir, "image", tmp_path / "x", **kw)


def test_export_artifacts_embed_like_the_workdir(exported, shapes_dir, reference, tmp_path):
  out = exported[0]
  kw = dict(split="test", batch_size=40, chunk_size=200, progress=False)
  for name, field in (("image", "image"), ("text", "caption")):
    result = compute_features(f"{out}:{name}", shapes_dir, field, tmp_path / name, **kw)
    assert result.manifest["tower"]["source"] == "export"
    np.testing.assert_allclose(read_features(tmp_path / name).vectors, reference[name],
                               atol=2e-6)
  with pytest.raises(ValueError, match="cannot change"):
    compute_features(f"{out}:image", shapes_dir, "image", tmp_path / "bf", dtype="bfloat16", **kw)
