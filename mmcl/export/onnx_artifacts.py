"""ONNX artifacts of exported towers (`mmcl export --format onnx`), checked against JAX.

A tower's forward pass with the weights embedded is converted by jax2onnx (which walks the
jaxpr and emits one ONNX node group per JAX primitive) into an ONNX model whose batch dimension
is symbolic ("b"), so ONNX Runtime, Triton or any ONNX consumer runs it without JAX:

  import onnxruntime as ort
  session = ort.InferenceSession("text.onnx", providers=["CPUExecutionProvider"])
  (embeddings,) = session.run(None, {"token_ids": ids})      # ids: [b, L] int32

Every converted model is run by ONNX Runtime on the CPU at batch 1 and 7 and compared row by row
with the JAX tower on the same inputs; the smallest cosine and the largest absolute difference
are recorded in the manifest, and a model below `MIN_COSINE` is an error, never an artifact.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mmcl.export.exporter import ExportError
from mmcl.train.task import TowerExport

ONNX_SUFFIX = ".onnx"
OPSET = 21
MIN_COSINE = 0.9999
CHECK_BATCH_SIZES = (1, 7)
OUTPUT_NAME = "embeddings"


class OnnxConversionError(ExportError):
  """A tower could not be converted to ONNX, or its ONNX model disagrees with JAX."""


def _require():
  try:
    import jax2onnx  # pylint: disable=g-import-not-at-top
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise OnnxConversionError(
        f"--format onnx needs jax2onnx and onnxruntime ({e}); install them with "
        "pip install 'mmcl[onnx]'") from e
  return jax2onnx, onnxruntime


def example_inputs(tower: TowerExport, n: int, seed: int = 0) -> np.ndarray:
  """[n, ...] inputs for checks: rows of `tower.example` (cycled), else random normal floats.

  Integer inputs without an example are drawn from [0, 2) (ids 0 and 1 exist in every table).
  """
  if tower.example is not None:
    example = np.asarray(tower.example)
    return example[np.arange(n) % example.shape[0]].astype(tower.input_spec.dtype)
  rng = np.random.default_rng(seed)
  shape = (n,) + tuple(tower.input_spec.shape[1:])
  if np.issubdtype(tower.input_spec.dtype, np.integer):
    return rng.integers(0, 2, shape).astype(tower.input_spec.dtype)
  return rng.standard_normal(shape).astype(tower.input_spec.dtype)


def convert_tower(name: str, tower: TowerExport, params: Any, input_name: str) -> bytes:
  """The serialized ONNX model of `tower.fn(params, x)`: input `input_name` [b, ...], output
  "embeddings" [b, D] float32.

  Raises:
    OnnxConversionError naming the JAX operation the converter cannot translate.
  """
  jax2onnx, _ = _require()
  spec = tower.input_spec
  arg = jax.ShapeDtypeStruct(("b",) + tuple(int(d) for d in spec.shape[1:]), spec.dtype)
  # jax2onnx logs every conversion (and plugins it skips) at INFO/WARNING on the root logger,
  # and some of its plugins print while tracing: keep that out of `mmcl export`'s output.
  chatter = io.StringIO()
  logging.disable(logging.WARNING)
  try:
    with contextlib.redirect_stdout(chatter):
      model = jax2onnx.to_onnx(lambda x: tower.fn(params, x), [arg], model_name=name,
                               opset=OPSET, return_mode="proto", input_names=[input_name],
                               output_names=[OUTPUT_NAME])
  except NotImplementedError as e:
    found = re.search(r"primitive '([^']+)'", str(e))
    op = found.group(1) if found else str(e)
    raise OnnxConversionError(
        f"tower {name!r} cannot be converted to ONNX: jax2onnx has no conversion for the JAX "
        f"operation {op!r} ({e})") from e
  except Exception as e:  # a converter plugin failing on this tower
    raise OnnxConversionError(f"tower {name!r} cannot be converted to ONNX: jax2onnx failed "
                              f"({type(e).__name__}: {e})") from e
  finally:
    logging.disable(logging.NOTSET)
  return model.SerializeToString()


def check_against_jax(name: str, model: bytes, tower: TowerExport, params: Any, *,
                      batch_sizes: Sequence[int] = CHECK_BATCH_SIZES) -> dict[str, Any]:
  """Runs `model` with ONNX Runtime (CPU) and the JAX tower on the same inputs.

  Returns:
    {"runtime", "batch_sizes", "min_cosine", "max_abs_diff"} over every row of every batch size.

  Raises:
    OnnxConversionError if a row's cosine is below MIN_COSINE, the output shape differs or is
    not finite.
  """
  _, ort = _require()
  options = ort.SessionOptions()
  options.log_severity_level = 3
  try:
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
  except Exception as e:  # e.g. an ONNX operation without a CPU kernel for its type
    found = (re.search(r"implementation for (\w+)\(\d+\)", str(e))
             or re.search(r"Op \((\w+)\)", str(e)))
    raise OnnxConversionError(
        f"tower {name!r}: ONNX Runtime cannot run the converted model"
        + (f" at the ONNX operation {found.group(1)}" if found else "") + f" ({e})") from e
  (inp,) = session.get_inputs()
  fn = jax.jit(lambda x: tower.fn(params, x))
  min_cos, max_abs = 1.0, 0.0
  for b in batch_sizes:
    x = example_inputs(tower, b, seed=b)
    want = np.asarray(fn(x), np.float32)
    (got,) = session.run(None, {inp.name: x})
    if got.shape != want.shape or not np.all(np.isfinite(got)):
      raise OnnxConversionError(f"tower {name!r}: ONNX Runtime returned {got.shape} "
                                f"(finite: {bool(np.all(np.isfinite(got)))}), JAX {want.shape}")
    denom = np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1)
    cos = np.sum(want * got, axis=1) / np.maximum(denom, 1e-30)
    min_cos = min(min_cos, float(cos.min()))
    max_abs = max(max_abs, float(np.abs(want - got).max()))
  if min_cos < MIN_COSINE:
    raise OnnxConversionError(f"tower {name!r}: the ONNX model disagrees with JAX (min cosine "
                              f"{min_cos:.6f} < {MIN_COSINE}, max |diff| {max_abs:.3g})")
  return {"runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
          "batch_sizes": list(batch_sizes), "min_cosine": min_cos, "max_abs_diff": max_abs}


def onnx_entry(name: str, tower: TowerExport, params: Any, input_name: str
               ) -> tuple[bytes, dict[str, Any]]:
  """(model bytes, its manifest entry) of one tower: converted, then checked against JAX."""
  jax2onnx, _ = _require()
  model = convert_tower(name, tower, params, input_name)
  check = check_against_jax(name, model, tower, params)
  import onnx  # pylint: disable=g-import-not-at-top
  proto = onnx.load_from_string(model)
  (inp,) = proto.graph.input
  dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
  if dims[0] != "b":
    raise OnnxConversionError(f"tower {name!r}: the ONNX input's batch dimension is {dims[0]!r}, "
                              "expected the symbolic 'b'")
  return model, {"artifact": f"{name}{ONNX_SUFFIX}", "opset": OPSET,
                 "converter": f"jax2onnx {getattr(jax2onnx, '__version__', '')}".strip(),
                 "input": inp.name, "output": OUTPUT_NAME, "check": check}
