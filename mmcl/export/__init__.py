"""Export to serving: `jax.export` artifacts of a checkpoint's towers, plus corpus embeddings.

  export_workdir(workdir, out, step=None, corpus=False)   `mmcl export --workdir DIR`
  export_pretrained(folder, out, max_length=256)          `mmcl export --tower FOLDER`
  verify_export(out)                                      checks files against the manifest
  export_tower(tower, params)                             one Task.export_towers() entry

See `mmcl.export.exporter` for the output layout and BUILD.md ("Export to serving") for how a
serving stack calls the artifacts.
"""
from mmcl.export.exporter import (FORMAT, MANIFEST, export_pretrained, export_tower,
                                  export_workdir, sha256_file, verify_export)

__all__ = ["FORMAT", "MANIFEST", "export_pretrained", "export_tower", "export_workdir",
           "sha256_file", "verify_export"]
