"""An `mmcl export` directory as callable towers and searchable corpora, read from its files only.

Nothing here imports training code or reads a checkpoint: the manifest says how raw inputs become
a tower's input (`preprocessing`), which artifact computes the embedding (`<tower>.onnx` run by
ONNX Runtime, or `<tower>.jax_exported` run by jax) and which index holds each corpus.

Raw inputs by the tower's `preprocessing["input"]`:
  "image"      a base64 string of an encoded image (PNG, JPEG, ...) of the manifest's height and
               width; RGB; passed as uint8 pixels when the tower normalises them itself
               (`normalized_in_model`), else normalised with the manifest's scale / shift.
  "token_ids"  a string, tokenized with the export's tokenizer.json, truncated and padded as the
               manifest says.
  "item_history"  a list of item ids (strings of the export's item_ids.txt), oldest first; the
               most recent max_len are kept, left-padded with index 0.
  "item_id"    one item id (a string of item_ids.txt).
  "waveform"   a base64 string of an audio file (WAV, FLAC, OGG, MP3: what soundfile reads); mixed
               to mono, resampled to the manifest's sample_rate, its first `samples` samples
               (zero-padded).
  any other    the tower's input itself as a nested list of numbers of the manifest's shape
               (without the batch axis).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import io
import json
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

from mmcl.export import index as index_lib

MAX_TEXT_CHARS = 10_000


class RequestError(ValueError):
  """A bad request: `field` names the request field, `status` is the HTTP status (4xx)."""

  def __init__(self, field: str, message: str, status: int = 400):
    super().__init__(f"field {field!r}: {message}")
    self.field = field
    self.status = status


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def read_manifest(export_dir: pathlib.Path, *, verify: bool = True) -> dict[str, Any]:
  """manifest.json of an export directory, every file checked against its size and sha256."""
  path = export_dir / "manifest.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: not a (complete) `mmcl export` directory")
  manifest = json.loads(path.read_text(encoding="utf-8"))
  if not str(manifest.get("format", "")).startswith("mmcl.export/"):
    raise ValueError(f"{path}: format {manifest.get('format')!r} is not an mmcl export")
  if verify:
    for rel, entry in manifest["files"].items():
      file = export_dir / rel
      if not file.is_file():
        raise FileNotFoundError(f"{file} (listed in {path}) not found")
      if file.stat().st_size != entry["bytes"] or _sha256(file) != entry["sha256"]:
        raise ValueError(f"{file}: size or sha256 differs from {path}")
  return manifest


# --- preprocessing: one raw value → one row of the tower's input -------------------------------
def _base64_bytes(value: Any, field: str, kind: str) -> bytes:
  """A request field holding base64 bytes (an encoded image or audio file) → the bytes."""
  if not isinstance(value, str):
    raise RequestError(field, f"expected {kind} as a string, got {type(value).__name__}")
  try:
    return base64.b64decode(value, validate=True)
  except (binascii.Error, ValueError) as e:
    raise RequestError(field, f"not valid base64 ({e})") from None


class ImageInput:
  """base64 image bytes → [H, W, C]: the uint8 pixels when the tower normalises them itself
  (`normalized_in_model`), else float32 `x = float32(pixel) * scale[c] - shift[c]`."""

  def __init__(self, pre: dict, shape: list):
    self.height, self.width, self.channels = (int(pre["height"]), int(pre["width"]),
                                              int(pre["channels"]))
    self.scale = np.asarray(pre["scale"], np.float32)
    self.shift = np.asarray(pre["shift"], np.float32)
    self.in_model = bool(pre.get("normalized_in_model", False))
    self.kind = "base64-encoded image bytes (PNG, JPEG, ...) of " \
                f"{self.height}x{self.width} pixels"

  def __call__(self, value: Any, field: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
    data = _base64_bytes(value, field, self.kind)
    try:
      with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        pixels = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as e:
      raise RequestError(field, f"undecodable image ({len(data)} bytes, {type(e).__name__})",
                         422) from None
    if pixels.shape != (self.height, self.width, self.channels):
      raise RequestError(field, f"image is {pixels.shape[1]}x{pixels.shape[0]} pixels; this tower "
                                f"takes {self.width}x{self.height} (no resize or crop is done)",
                         422)
    if self.in_model:
      return np.ascontiguousarray(pixels, np.uint8)
    return pixels.astype(np.float32) * self.scale - self.shift


class TokenIdsInput:
  """text → [max_len] int32 ids: tokenizer.json, truncation keeping eos last, right padding."""

  def __init__(self, pre: dict, shape: list, export_dir: pathlib.Path):
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    self.tokenizer = Tokenizer.from_file(str(export_dir / pre["tokenizer"]))
    self.max_len = int(pre["max_len"])
    self.pad_id = int(pre["pad_id"])
    self.eos_id = pre.get("eos_id")
    self.kind = "text"

  def __call__(self, value: Any, field: str) -> np.ndarray:
    if not isinstance(value, str):
      raise RequestError(field, f"expected a text string, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
      raise RequestError(field, f"text of {len(value)} characters; at most {MAX_TEXT_CHARS}", 413)
    ids = self.tokenizer.encode(value).ids
    if len(ids) > self.max_len:
      ids = ids[:self.max_len - 1] + [int(self.eos_id)] if self.eos_id is not None \
          else ids[:self.max_len]
    row = np.full((self.max_len,), self.pad_id, np.int32)
    row[:len(ids)] = ids
    return row


class ItemIdsInput:
  """item ids (strings) → indices 1..N of the export's item_ids.txt: one id ("item_id") → [1], a
  history ("item_history") → [max_len], the most recent last, left-padded with 0."""

  MAX_HISTORY = 10_000

  def __init__(self, pre: dict, shape: list, export_dir: pathlib.Path):
    lines = (export_dir / pre["item_ids"]).read_text(encoding="utf-8").splitlines()
    self.index = {item: j + 1 for j, item in enumerate(lines)}
    self.history = pre["input"] == "item_history"
    self.max_len = int(pre.get("max_len", 1))
    self.kind = "a list of item ids (strings), oldest first" if self.history else \
        "an item id (string)"

  def _lookup(self, item: Any, field: str) -> int:
    if not isinstance(item, str):
      raise RequestError(field, f"expected an item id string, got {type(item).__name__}")
    if item not in self.index:
      raise RequestError(field, f"unknown item id {item[:80]!r} ({len(self.index)} items known)")
    return self.index[item]

  def __call__(self, value: Any, field: str) -> np.ndarray:
    if not self.history:
      return np.asarray([self._lookup(value, field)], np.int32)
    if not isinstance(value, list) or not value:
      raise RequestError(field, f"expected {self.kind}, non-empty")
    if len(value) > self.MAX_HISTORY:
      raise RequestError(field, f"history of {len(value)} items; at most {self.MAX_HISTORY}", 413)
    recent = [self._lookup(v, f"{field}[{i}]") for i, v in enumerate(value)][-self.max_len:]
    row = np.zeros((self.max_len,), np.int32)
    row[self.max_len - len(recent):] = recent
    return row


class WaveformInput:
  """base64 audio bytes → [samples] float32 mono at the manifest's sample rate."""

  MAX_SECONDS = 600

  def __init__(self, pre: dict, shape: list):
    self.sample_rate = int(pre["sample_rate"])
    self.samples = int(pre["samples"])
    self.kind = f"base64-encoded audio bytes (resampled to {self.sample_rate} Hz, mono)"

  def __call__(self, value: Any, field: str) -> np.ndarray:
    import soundfile  # pylint: disable=g-import-not-at-top
    data = _base64_bytes(value, field, self.kind)
    try:
      with soundfile.SoundFile(io.BytesIO(data)) as f:
        if f.frames > self.MAX_SECONDS * f.samplerate:
          raise RequestError(field, f"audio of {f.frames / f.samplerate:.0f} s; at most "
                                    f"{self.MAX_SECONDS} s", 413)
        audio, rate = f.read(dtype="float32", always_2d=True), f.samplerate
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
      raise RequestError(field, f"undecodable audio ({len(data)} bytes, {type(e).__name__})",
                         422) from None
    audio = audio.mean(axis=1)
    if rate != self.sample_rate:
      from scipy import signal  # pylint: disable=g-import-not-at-top
      g = np.gcd(rate, self.sample_rate)
      audio = signal.resample_poly(audio, self.sample_rate // g, rate // g).astype(np.float32)
    out = np.zeros((self.samples,), np.float32)
    out[:min(len(audio), self.samples)] = audio[:self.samples]
    return out


class ArrayInput:
  """The tower's input row itself: a nested list of numbers of the manifest's shape."""

  def __init__(self, pre: dict, shape: list, dtype: str):
    self.shape = tuple(int(d) for d in shape[1:])
    self.dtype = np.dtype(dtype)
    self.kind = f"a {list(self.shape)} array of {self.dtype} (nested lists)"

  def __call__(self, value: Any, field: str) -> np.ndarray:
    try:
      x = np.asarray(value)
    except (ValueError, TypeError) as e:
      raise RequestError(field, f"expected {self.kind}: {e}") from None
    if x.shape != self.shape or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
      raise RequestError(field, f"expected {self.kind}, got shape {list(x.shape)} of {x.dtype}")
    if np.issubdtype(self.dtype, np.integer) and not np.issubdtype(x.dtype, np.integer):
      raise RequestError(field, f"expected integers ({self.kind}), got {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
      raise RequestError(field, "non-finite values (NaN or inf)")
    return x.astype(self.dtype)


# Preprocessors of input kinds beyond the built-in ones register here (input kind → factory).
PREPROCESSORS: dict[str, Callable[..., Any]] = {}


def make_preprocessor(entry: dict, export_dir: pathlib.Path):
  pre = entry["preprocessing"]
  (inp,) = entry["inputs"]
  kind = pre.get("input")
  if kind in PREPROCESSORS:
    return PREPROCESSORS[kind](pre, inp["shape"], export_dir)
  if kind == "image" and "scale" in pre:
    return ImageInput(pre, inp["shape"])
  if kind == "token_ids" and "tokenizer" in pre:
    return TokenIdsInput(pre, inp["shape"], export_dir)
  if kind == "waveform" and "sample_rate" in pre:
    return WaveformInput(pre, inp["shape"])
  if kind in ("item_history", "item_id") and "item_ids" in pre:
    return ItemIdsInput(pre, inp["shape"], export_dir)
  return ArrayInput(pre, inp["shape"], inp["dtype"])


# --- runtimes -----------------------------------------------------------------------------------
def _onnx_runner(path: pathlib.Path, input_name: str) -> Callable[[np.ndarray], np.ndarray]:
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  options = ort.SessionOptions()
  options.log_severity_level = 3
  # Idle intra-op threads sleep instead of spinning: the cores stay free for request handling
  # and the other towers' calls.
  options.add_session_config_entry("session.intra_op.allow_spinning", "0")
  session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
  return lambda x: session.run(None, {input_name: x})[0]


def _jax_runner(path: pathlib.Path) -> Callable[[np.ndarray], np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  exported = jax.export.deserialize(bytearray(path.read_bytes()))
  call = jax.jit(exported.call)

  def run(x: np.ndarray) -> np.ndarray:
    # Batches are padded to a power of two: one compilation per bucket, not per batch size.
    n = x.shape[0]
    bucket = 1 << max(0, (n - 1).bit_length())
    if bucket != n:
      x = np.concatenate([x, np.repeat(x[-1:], bucket - n, axis=0)])
    return np.asarray(call(x))[:n]
  return run


@dataclasses.dataclass
class Tower:
  name: str
  dim: int
  preprocess: Any
  run: Callable[[np.ndarray], np.ndarray]
  runtime: str
  input_dtype: np.dtype


@dataclasses.dataclass
class Corpus:
  name: str
  tower: str
  query_tower: str
  ids: list[str]
  index: Any
  index_kind: str
  count: int
  dim: int

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries [Q, D] float32 → (scores [Q, k], rows [Q, k]) in the evaluator's order."""
    return index_lib.search_topk(self.index, queries, k)


def _corpus(export_dir: pathlib.Path, name: str, entry: dict) -> Corpus:
  ids = (export_dir / entry["ids"]).read_text(encoding="utf-8").splitlines()
  if "index" in entry:
    index = index_lib.read_index(export_dir / entry["index"]["file"])
    kind = entry["index"]["kind"]
    index_lib.apply_search_params(index, kind, entry["index"]["params"])
  else:  # no index file: exact search over the embeddings
    emb = np.load(export_dir / entry["embeddings"], mmap_mode="r")
    index, _ = index_lib.build_index(np.asarray(emb, np.float32), "flat")
    kind = "flat"
  if index.ntotal != len(ids):
    raise ValueError(f"{export_dir / entry['ids']}: {len(ids)} ids for an index of "
                     f"{index.ntotal} rows")
  return Corpus(name, entry["tower"], entry.get("query_tower") or entry["tower"], ids, index,
                kind, int(entry["count"]), int(entry["dim"]))


@dataclasses.dataclass
class ServedExport:
  export_dir: pathlib.Path
  manifest: dict
  towers: dict[str, Tower]
  corpora: dict[str, Corpus]


def load_export(export_dir: str | pathlib.Path, runtime: str = "auto", *,
                verify: bool = True) -> ServedExport:
  """Loads the towers (runtime "onnx", "jax" or "auto": ONNX where the export has it) and the
  corpora of an export directory."""
  export_dir = pathlib.Path(export_dir)
  manifest = read_manifest(export_dir, verify=verify)
  if runtime not in ("auto", "onnx", "jax"):
    raise ValueError(f"runtime {runtime!r}: expected auto, onnx or jax")
  towers = {}
  for name, entry in manifest["towers"].items():
    use_onnx = "onnx" in entry if runtime == "auto" else runtime == "onnx"
    if use_onnx:
      if "onnx" not in entry:
        raise FileNotFoundError(f"{export_dir}: tower {name!r} has no ONNX model (export with "
                                "`mmcl export --format onnx`)")
      run = _onnx_runner(export_dir / entry["onnx"]["artifact"], entry["onnx"]["input"])
    else:
      run = _jax_runner(export_dir / entry["artifact"])
    (inp,) = entry["inputs"]
    towers[name] = Tower(name, int(entry["output"]["dim"]), make_preprocessor(entry, export_dir),
                         run, "onnxruntime" if use_onnx else "jax", np.dtype(inp["dtype"]))
  corpora = {name: _corpus(export_dir, name, entry)
             for name, entry in manifest.get("corpus", {}).items()}
  for c in corpora.values():
    if c.query_tower not in towers:
      raise ValueError(f"{export_dir}/manifest.json: corpus {c.name!r} names query tower "
                       f"{c.query_tower!r}, not among {sorted(towers)}")
  return ServedExport(export_dir, manifest, towers, corpora)
