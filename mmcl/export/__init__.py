"""Export to serving: `jax.export` artifacts of a checkpoint's towers, plus corpus embeddings.

  export_workdir(workdir, out, step=None, corpus=False, fmt="jax", index=None)
                                                          `mmcl export --workdir DIR`
  export_task(task, params, out, ...)                       the same for parameters in memory
  verify_export(out)                                      checks files against the manifest
  export_tower(tower, params)                             one Task.export_towers() entry

`mmcl.export.onnx_artifacts` converts towers to ONNX (`--format onnx`), `mmcl.export.index` builds
FAISS indexes of corpora (`--index faiss[:flat|ivf|hnsw]`); `mmcl serve` (`mmcl.serve`) answers
queries from an export directory. See `mmcl.export.exporter` for the output layout and BUILD.md
("Export to serving") for how a serving stack calls the artifacts. A pretrained folder's tower is
exported by `mmcl.pretrained.export.export_pretrained` (`mmcl export --tower FOLDER`).
"""
import importlib

__all__ = ["FORMAT", "MANIFEST", "ExportError", "export_task",
           "export_tower", "export_workdir", "sha256_file", "verify_export"]


def __getattr__(name: str):
  # Lazy: `mmcl serve` imports mmcl.export.index (numpy + faiss) without pulling in jax.
  if name in __all__:
    return getattr(importlib.import_module("mmcl.export.exporter"), name)
  raise AttributeError(f"module 'mmcl.export' has no attribute {name!r}")
