"""`mmcl serve`: an HTTP retrieval service over an `mmcl export` directory.

  mmcl serve EXPORT_DIR [--host 127.0.0.1] [--port 8000] [--runtime auto|onnx|jax]
                        [--max-batch-size 64] [--max-wait-ms 0]

  model.py     the export's towers (ONNX Runtime or jax) with their preprocessing, its corpora
  batching.py  concurrent requests batched into one model call
  app.py       the aiohttp routes /healthz, /metadata, /embed, /search

It reads only the export directory (manifest, artifacts, tokenizer, corpus and index files): no
training code, no checkpoint.
"""
from mmcl.serve.app import ServeConfig, build_app, run_server
from mmcl.serve.model import RequestError, ServedExport, load_export

__all__ = ["RequestError", "ServeConfig", "ServedExport", "build_app", "load_export",
           "run_server"]
