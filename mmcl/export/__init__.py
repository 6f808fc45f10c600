"""Export to serving: `jax.export` artifacts of a checkpoint's towers, plus corpus embeddings.

  export_workdir(workdir, out, step=None, corpus=False)   `mmcl export --workdir DIR`
  verify_export(out)                                      checks files against the manifest
  export_tower(tower, params)                             one Task.export_towers() entry

See `mmcl.export.exporter` for the output layout and BUILD.md ("Export to serving") for how a
serving stack calls the artifacts. A pretrained folder's tower is exported by
`mmcl.pretrained.export.export_pretrained` (`mmcl export --tower FOLDER`).
"""
from mmcl.export.exporter import (FORMAT, MANIFEST, export_tower, export_workdir, sha256_file,
                                  verify_export)

__all__ = ["FORMAT", "MANIFEST", "export_tower", "export_workdir", "sha256_file", "verify_export"]
