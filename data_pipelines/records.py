"""ArrayRecord storage for example datasets: a versioned record schema, atomic writers, and a
random-access source for `grain.MapDataset.source(...)`.

Why `array_record` directly and not a tfds builder: tfds can *read* ArrayRecord without TensorFlow,
but its writers encode numpy image features through TensorFlow, which this project does not
install. Writing the files ourselves keeps the format simple, and tfds' ArrayRecord reader is not
needed either: `ArrayRecordSource` below does random access, decoding and error reporting.

On-disk layout of a dataset directory::

  metadata.json                            written last: its presence means "complete"
  tokenizer.json                           (image–text datasets) the caption tokenizer
  {split}.array_record-{s:05d}-of-{S:05d}  record shards; shard s holds a contiguous range of the
                                           split's records (global index = offset + position)
  .{name}.tmp-{pid}-{rand}                 in-progress writes; never read, removed on rebuild

Record encoding (`FORMAT_NAME`, `FORMAT_VERSION` = 1): each ArrayRecord record is one msgpack map
``{"v": 1, field_name: value, ...}`` with one entry per schema field:

  =================  =============================  ============================================
  kind               stored as                      decoded as
  =================  =============================  ============================================
  ``png_image``      PNG bytes (zlib + chunk CRCs,  uint8 [H, W, C] (C = 1 or 3); shape checked
                     so corruption is detected)     against the schema
  ``text``           UTF-8 str                      str
  ``int``            msgpack int                    int
  ``int32_array``    little-endian int32 bytes      int32 [K], K fixed by the schema
  ``int32_sequence`` little-endian int32 bytes      int32 [n], variable n
  ``float``          msgpack float (finite)         float
  ``float32_array``  little-endian float32 bytes    float32 of the schema's shape (any rank >= 1);
                     (finite values only)           NaN/inf are refused on write and on read
  ``image_bytes``    an encoded JPEG/PNG/WebP file  bytes (magic number checked); pixels are
                     as given (no re-encoding)      decoded by the pipeline (`image_ops`), which
                                                    can crop and resize while decoding
  ``audio_bytes``    an encoded WAV/FLAC/OGG/MP3    bytes (magic number checked); decoded by
                     file as given                  `audio.decode_audio`
  =================  =============================  ============================================

Every split uses the dataset's `schema` unless its entry in `splits` carries its own `schema`
(e.g. interaction datasets store users and items in different splits).

`metadata.json` holds the format name/version, the schema (field names, kinds, dtypes, shapes),
per-split example counts and per-shard files, record counts and sha256 digests, plus whatever the
producer adds (generator parameters, statistics).

Atomicity: every shard (and the metadata) is written under a temporary name and renamed into
place (`os.replace` is atomic on POSIX); a builder deletes `metadata.json` before it rewrites any
shard and writes it again only after every other file is in place. So a crash at any point leaves
either a complete dataset or one without `metadata.json`, which readers refuse with a message
telling how to rebuild it; a rerun overwrites cleanly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
import struct
import threading
import uuid
import zlib
from typing import Any, Iterable, Mapping, Sequence

import msgpack
import numpy as np
from array_record.python import array_record_module
from PIL import Image

FORMAT_NAME = "mmcl-arrayrecord"
FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
WRITER_OPTIONS = "group_size:1,uncompressed"  # group_size 1: one record per chunk, O(1) random
# access; uncompressed: payloads are PNG (already deflated) and short captions.
DEFAULT_BUILD_HINT = ("build the built-in shapes dataset with "
                      "`python -m data_pipelines.image_text --output_dir {path}`")

_KIND_DTYPES = {"png_image": "uint8", "text": "str", "int": "int64", "int32_array": "int32",
                "int32_sequence": "int32", "float": "float64", "float32_array": "float32",
                "image_bytes": "bytes", "audio_bytes": "bytes"}
# Magic numbers of the encoded files `image_bytes` / `audio_bytes` accept: a cheap check that
# catches a wrong column (a path or a caption stored instead of the file) at write time.
IMAGE_MAGIC = {"jpeg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",), "webp": (b"RIFF",)}
AUDIO_MAGIC = {"wav": (b"RIFF", b"RIFX", b"RF64"), "flac": (b"fLaC",), "ogg": (b"OggS",),
               "mp3": (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xfa")}
_LOG = logging.getLogger(__name__)


# --- the skip ledger ------------------------------------------------------------------------------
# With skip_bad_records, every skipped record is counted by (split, field) in a ledger folder named
# by the environment variable below, one JSON file per process (grain worker processes inherit the
# variable, so their skips are counted too). `skip_ledger` sets it; `read_skip_ledger` sums it.
SKIP_LEDGER_ENV = "MMCL_SKIP_LEDGER"
_ledger_lock = threading.Lock()
_ledger_counts: dict[str, dict[str, int]] = {}  # this process's skips: folder -> split/field -> n


def _count_skip(split: str, field: str) -> None:
  folder = os.environ.get(SKIP_LEDGER_ENV)
  if not folder:
    return
  with _ledger_lock:
    key = f"{split}/{field}"
    counts = _ledger_counts.setdefault(folder, {})
    counts[key] = counts.get(key, 0) + 1
    path = pathlib.Path(folder) / f"{os.uname().nodename}-{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(counts, sort_keys=True))
    os.replace(tmp, path)


def read_skip_ledger(folder: str | os.PathLike) -> dict[str, int]:
  """{"split/field": records skipped} summed over every process that wrote into `folder`."""
  total: dict[str, int] = {}
  for path in sorted(pathlib.Path(folder).glob("*.json")):
    try:
      counts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a file being replaced right now: its rename is atomic
      continue
    for key, n in counts.items():
      total[key] = total.get(key, 0) + int(n)
  return dict(sorted(total.items()))


class skip_ledger:  # pylint: disable=invalid-name — used as a context manager
  """`with skip_ledger(folder):` counts the skips of this process and its workers into `folder`."""

  def __init__(self, folder: str | os.PathLike):
    self.folder = str(pathlib.Path(folder).absolute())

  def __enter__(self) -> "skip_ledger":
    self._previous = os.environ.get(SKIP_LEDGER_ENV)
    os.environ[SKIP_LEDGER_ENV] = self.folder
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is None:
      os.environ.pop(SKIP_LEDGER_ENV, None)
    else:
      os.environ[SKIP_LEDGER_ENV] = self._previous

  def counts(self) -> dict[str, int]:
    return read_skip_ledger(self.folder)


def skip_metrics(counts: Mapping[str, int]) -> dict[str, float]:
  """Ledger counts as flat metrics: data/skipped (total) and data/skipped/<split>/<field>."""
  out = {"data/skipped": float(sum(counts.values()))}
  out.update({f"data/skipped/{k}": float(v) for k, v in counts.items()})
  return out


class MetadataError(ValueError):
  """A dataset's metadata.json is malformed or of another format (the message names the file)."""


class CorruptRecordError(ValueError):
  """A record that cannot be read or decoded; names the shard file, record and field."""

  def __init__(self, *, path: str, split: str, index: int, position: int, field: str,
               reason: str):
    self.path, self.split, self.index, self.position, self.field = (path, split, index, position,
                                                                    field)
    super().__init__(f"corrupt record in {path}: record {position} of that file (split "
                     f"{split!r}, record index {index}), field {field!r}: {reason}")


@dataclasses.dataclass(frozen=True)
class Field:
  """One record field. `shape`: (H, W, C) for png_image, (K,) for int32_array, () otherwise."""
  name: str
  kind: str
  shape: tuple[int, ...] = ()

  def __post_init__(self):
    if self.name == "v":
      raise ValueError("field name 'v' is reserved for the record format version")
    if self.kind not in _KIND_DTYPES:
      raise ValueError(f"field {self.name!r}: unknown kind {self.kind!r}, expected one of "
                       f"{sorted(_KIND_DTYPES)}")
    if self.kind == "png_image" and (len(self.shape) != 3 or self.shape[2] not in (1, 3)):
      raise ValueError(f"field {self.name!r}: png_image shape must be (H, W, 1|3), got "
                       f"{self.shape}")
    if self.kind == "int32_array" and len(self.shape) != 1:
      raise ValueError(f"field {self.name!r}: int32_array shape must be (K,), got {self.shape}")
    if self.kind == "float32_array" and (len(self.shape) < 1 or min(self.shape) < 1):
      raise ValueError(f"field {self.name!r}: float32_array shape must be (D, ...) with every "
                       f"dimension >= 1, got {self.shape}")
    if self.kind in ("text", "int", "int32_sequence", "float", "image_bytes",
                     "audio_bytes") and self.shape:
      raise ValueError(f"field {self.name!r}: kind {self.kind} has no fixed shape, got "
                       f"{self.shape}")

  @property
  def dtype(self) -> str:
    return _KIND_DTYPES[self.kind]

  def to_json(self) -> dict[str, Any]:
    return {"name": self.name, "kind": self.kind, "dtype": self.dtype, "shape": list(self.shape)}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Field":
    return cls(name=d["name"], kind=d["kind"], shape=tuple(d["shape"]))


def schema_to_json(fields: Sequence[Field]) -> list[dict[str, Any]]:
  return [f.to_json() for f in fields]


def schema_from_json(items: Sequence[Mapping[str, Any]]) -> tuple[Field, ...]:
  return tuple(Field.from_json(d) for d in items)


# --------------------------------------------------------------------------------------------
# Encoding and decoding one record.


def encode_record(example: Mapping[str, Any], fields: Sequence[Field], *, where: str = "") -> bytes:
  """Validates `example` against the schema and encodes it (see the module docstring).

  Args:
    example: field name → value (image uint8 [H, W, C], str, int, int arrays).
    fields: the schema.
    where: what the example is, for error messages (e.g. "train example 17").

  Returns:
    the record bytes.
  """
  out: dict[str, Any] = {"v": FORMAT_VERSION}
  for f in fields:
    if f.name not in example:
      raise ValueError(f"{where}: missing field {f.name!r} (schema fields: "
                       f"{[g.name for g in fields]})")
    value = example[f.name]
    if f.kind == "png_image":
      value = np.asarray(value)
      if value.dtype != np.uint8 or value.shape != f.shape:
        raise ValueError(f"{where}: field {f.name!r} expected uint8 {list(f.shape)}, found "
                         f"{value.dtype} {list(value.shape)}")
      out[f.name] = encode_png(value)
    elif f.kind == "text":
      if not isinstance(value, str):
        raise ValueError(f"{where}: field {f.name!r} expected str, found {type(value).__name__}")
      out[f.name] = value
    elif f.kind == "int":
      if not isinstance(value, (int, np.integer)):
        raise ValueError(f"{where}: field {f.name!r} expected int, found {type(value).__name__}")
      out[f.name] = int(value)
    elif f.kind == "float":
      if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        raise ValueError(f"{where}: field {f.name!r} expected float, found "
                         f"{type(value).__name__}")
      if not np.isfinite(value):
        raise ValueError(f"{where}: field {f.name!r} is {value} (finite float expected)")
      out[f.name] = float(value)
    elif f.kind == "float32_array":
      arr = np.asarray(value)
      if arr.dtype.kind not in "fiu" or arr.shape != f.shape:
        raise ValueError(f"{where}: field {f.name!r} expected float32 {list(f.shape)}, found "
                         f"{arr.dtype} {list(arr.shape)}")
      arr = arr.astype("<f4")
      if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0].tolist()
        raise ValueError(f"{where}: field {f.name!r} holds non-finite values (first at "
                         f"{bad}: {arr[tuple(bad)]})")
      out[f.name] = arr.tobytes()
    elif f.kind in ("image_bytes", "audio_bytes"):
      if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{where}: field {f.name!r} expected encoded file bytes, found "
                         f"{type(value).__name__}")
      value = bytes(value)
      reason = check_magic(value, f.kind)
      if reason:
        raise ValueError(f"{where}: field {f.name!r}: {reason}")
      out[f.name] = value
    else:  # int32_array / int32_sequence
      arr = np.asarray(value)
      if arr.dtype.kind not in "iu" or arr.ndim != 1 or (f.kind == "int32_array"
                                                         and arr.shape != f.shape):
        expected = list(f.shape) if f.kind == "int32_array" else "[n]"
        raise ValueError(f"{where}: field {f.name!r} expected int32 {expected}, found "
                         f"{arr.dtype} {list(arr.shape)}")
      out[f.name] = arr.astype("<i4").tobytes()
  return msgpack.packb(out, use_bin_type=True)


def check_magic(data: bytes, kind: str) -> str:
  """'' when `data` starts like a file `kind` (image_bytes / audio_bytes) accepts, else why not."""
  table = IMAGE_MAGIC if kind == "image_bytes" else AUDIO_MAGIC
  if any(data.startswith(m) for magics in table.values() for m in magics):
    return ""
  return (f"not an encoded {'/'.join(table)} file (starts with {data[:8]!r}, "
          f"{len(data)} bytes)")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {1: 0, 3: 2}  # channels -> PNG colour type (0 gray, 2 RGB)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(image: np.ndarray) -> bytes:
  """A standard 8-bit PNG of `image` [H, W, C] uint8 (C = 1 or 3), one IDAT, filter "None".

  Written by hand rather than with PIL so that `decode_png` can take its fast path (one zlib
  inflate, no per-row unfiltering): ~5 µs instead of ~30 µs per 32×32 image.
  """
  h, w, c = image.shape
  rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * c)], axis=1)
  header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR_TYPES[c], 0, 0, 0)
  return (_PNG_SIGNATURE + _png_chunk(b"IHDR", header)
          + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + _png_chunk(b"IEND", b""))


def _decode_png_fast(data: bytes) -> np.ndarray | None:
  """Decodes the layout `encode_png` writes; None for other valid layouts (PIL handles those).

  Raises ValueError on corruption: bad signature, truncation, chunk CRC mismatch, zlib error.
  """
  if not data.startswith(_PNG_SIGNATURE):
    raise ValueError("not a PNG (bad signature)")
  pos, header, idat = len(_PNG_SIGNATURE), None, []
  while True:
    if pos + 12 > len(data):
      raise ValueError("truncated PNG (no IEND chunk)")
    (length,) = struct.unpack_from(">I", data, pos)
    kind = data[pos + 4:pos + 8]
    end = pos + 8 + length
    if end + 4 > len(data):
      raise ValueError(f"truncated PNG ({kind!r} chunk runs past the end)")
    (crc,) = struct.unpack_from(">I", data, end)
    if zlib.crc32(data[pos + 4:end]) & 0xFFFFFFFF != crc:
      raise ValueError(f"PNG {kind!r} chunk CRC mismatch")
    if kind == b"IHDR":
      header = struct.unpack(">IIBBBBB", data[pos + 8:end])
    elif kind == b"IDAT":
      idat.append(data[pos + 8:end])
    elif kind == b"IEND":
      break
    pos = end + 4
  if header is None:
    raise ValueError("PNG without IHDR chunk")
  w, h, depth, color_type, _, _, interlace = header
  channels = {0: 1, 2: 3}.get(color_type)
  if depth != 8 or channels is None or interlace:
    return None
  try:
    raw = zlib.decompress(b"".join(idat))
  except zlib.error as e:
    raise ValueError(f"PNG pixel data corrupt (zlib: {e})") from None
  if len(raw) != h * (w * channels + 1):
    raise ValueError(f"PNG pixel data has {len(raw)} bytes, expected {h * (w * channels + 1)}")
  rows = np.frombuffer(raw, np.uint8).reshape(h, w * channels + 1)
  if rows[:, 0].any():  # Rows use PNG filters other than "None": let PIL unfilter them.
    return None
  return np.ascontiguousarray(rows[:, 1:]).reshape(h, w, channels)


def decode_png(data: Any, shape: tuple[int, ...]) -> np.ndarray:
  """PNG bytes → uint8 [H, W, C] of the expected `shape`; ValueError(reason) otherwise."""
  if not isinstance(data, bytes):
    raise ValueError(f"expected PNG bytes, found {type(data).__name__}")
  arr = _decode_png_fast(data)
  if arr is None:
    try:
      with Image.open(io.BytesIO(data), formats=("PNG",)) as im:
        im.load()
        arr = np.asarray(im)
    except Exception as e:  # PIL raises several types (OSError, SyntaxError, zlib.error, ...).
      raise ValueError(f"PNG decode failed ({type(e).__name__}: {e})") from None
    if arr.ndim == 2:
      arr = arr[..., None]
  if arr.dtype != np.uint8 or arr.shape != tuple(shape):
    raise ValueError(f"expected uint8 {list(shape)}, decoded {arr.dtype} {list(arr.shape)}")
  return arr


def _decode_value(value: Any, f: Field) -> Any:
  """Decodes one stored value; raises ValueError(reason) when it does not match the schema."""
  if f.kind == "png_image":
    return decode_png(value, f.shape)
  if f.kind == "text":
    if not isinstance(value, str):
      raise ValueError(f"expected str, found {type(value).__name__}")
    return value
  if f.kind == "int":
    if not isinstance(value, int) or isinstance(value, bool):
      raise ValueError(f"expected int, found {type(value).__name__}")
    return value
  if f.kind == "float":
    if not isinstance(value, float) or not np.isfinite(value):
      raise ValueError(f"expected a finite float, found {type(value).__name__} {value!r}")
    return value
  if f.kind in ("image_bytes", "audio_bytes"):
    if not isinstance(value, bytes):
      raise ValueError(f"expected encoded file bytes, found {type(value).__name__}")
    reason = check_magic(value, f.kind)
    if reason:
      raise ValueError(reason)
    return value
  if f.kind == "float32_array":
    size = int(np.prod(f.shape))
    if not isinstance(value, bytes) or len(value) != 4 * size:
      raise ValueError(f"expected float32 {list(f.shape)} ({4 * size} bytes), found "
                       f"{type(value).__name__} of length "
                       f"{len(value) if isinstance(value, bytes) else '?'}")
    arr = np.frombuffer(value, "<f4").astype(np.float32).reshape(f.shape)
    if not np.isfinite(arr).all():
      raise ValueError(f"non-finite values at {np.argwhere(~np.isfinite(arr))[0].tolist()}")
    return arr
  if not isinstance(value, bytes) or len(value) % 4:
    raise ValueError(f"expected int32 bytes, found {type(value).__name__} of length "
                     f"{len(value) if isinstance(value, bytes) else '?'}")
  arr = np.frombuffer(value, "<i4").astype(np.int32)
  if f.kind == "int32_array" and arr.shape != f.shape:
    raise ValueError(f"expected int32 {list(f.shape)}, found {list(arr.shape)}")
  return arr


def decode_record(raw: bytes, fields: Sequence[Field], *, path: str, split: str, index: int,
                  position: int) -> dict[str, Any]:
  """Decodes one record; raises `CorruptRecordError` naming file, record and field on failure.

  Returns:
    dict with one entry per schema field (images uint8 [H, W, C], int32 arrays, str, int).
  """
  def fail(field: str, reason: str) -> CorruptRecordError:
    return CorruptRecordError(path=path, split=split, index=index, position=position,
                              field=field, reason=reason)
  try:
    record = msgpack.unpackb(raw, raw=False)
  except Exception as e:  # msgpack raises ExtraData, UnpackValueError, ValueError, ...
    raise fail("<record>", f"not a msgpack record ({type(e).__name__}: {e})") from None
  if not isinstance(record, dict):
    raise fail("<record>", f"expected a msgpack map, found {type(record).__name__}")
  if record.get("v") != FORMAT_VERSION:
    raise fail("v", f"record format version {record.get('v')!r}, this reader supports "
                    f"{FORMAT_VERSION}")
  out = {}
  for f in fields:
    if f.name not in record:
      raise fail(f.name, f"missing field (record has {sorted(k for k in record if k != 'v')})")
    try:
      out[f.name] = _decode_value(record[f.name], f)
    except ValueError as e:
      raise fail(f.name, str(e)) from None
  return out


# --------------------------------------------------------------------------------------------
# Writing.


def shard_name(split: str, shard: int, num_shards: int) -> str:
  return f"{split}.array_record-{shard:05d}-of-{num_shards:05d}"


def _tmp_path(path: pathlib.Path) -> pathlib.Path:
  # Unique per writer, so two processes building the same directory never write one file.
  return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync(path: pathlib.Path) -> None:
  # Data reaches the disk before the rename publishes it, so even a power loss cannot leave a
  # complete-looking name over partial contents.
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def is_temporary(name: str) -> bool:
  return name.startswith(".") and ".tmp-" in name


def sha256_file(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as fp:
    for block in iter(lambda: fp.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def shard_bounds(num_records: int, num_shards: int) -> list[tuple[int, int]]:
  """[start, stop) of each shard's contiguous record range; sizes differ by at most one."""
  return [(s * num_records // num_shards, (s + 1) * num_records // num_shards)
          for s in range(num_shards)]


def write_split(data_dir: str | os.PathLike, split: str, payloads: Iterable[bytes], *,
                num_records: int, num_shards: int) -> list[dict[str, Any]]:
  """Writes one split's records into `num_shards` ArrayRecord files, each atomically.

  Args:
    data_dir: existing output directory.
    split: split name (file prefix).
    payloads: exactly `num_records` encoded records (`encode_record`), in index order.
    num_records: N.
    num_shards: S, 1 <= S <= max(N, 1).

  Returns:
    per shard: {"file", "num_records", "num_bytes", "sha256"} — the metadata entry.
  """
  data_dir = pathlib.Path(data_dir)
  if num_shards < 1 or (num_records and num_shards > num_records):
    raise ValueError(f"split {split!r}: num_shards must be in [1, {max(num_records, 1)}], got "
                     f"{num_shards}")
  it = iter(payloads)
  shards = []
  for s, (start, stop) in enumerate(shard_bounds(num_records, num_shards)):
    final = data_dir / shard_name(split, s, num_shards)
    tmp = _tmp_path(final)
    try:
      writer = array_record_module.ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
      try:
        for i in range(start, stop):
          try:
            writer.write(next(it))
          except StopIteration:
            raise ValueError(f"split {split!r}: records ended after {i} of {num_records}") from None
      finally:
        writer.close()
      digest = sha256_file(tmp)
      _fsync(tmp)
      os.replace(tmp, final)
    finally:
      if tmp.exists():
        tmp.unlink()
    shards.append({"file": final.name, "num_records": stop - start,
                   "num_bytes": final.stat().st_size, "sha256": digest})
  if next(it, None) is not None:
    raise ValueError(f"split {split!r}: more than num_records={num_records} records given")
  return shards


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  path = pathlib.Path(path)
  tmp = _tmp_path(path)
  try:
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def begin_rewrite(data_dir: str | os.PathLike) -> None:
  """Prepares `data_dir` for a (re)build: drops the metadata first, then stale temporaries.

  After this, until `write_metadata` succeeds, readers see an incomplete dataset.
  """
  data_dir = pathlib.Path(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  (data_dir / METADATA_FILE).unlink(missing_ok=True)
  for p in data_dir.iterdir():
    if is_temporary(p.name) and p.is_file():
      p.unlink(missing_ok=True)


def remove_unlisted_shards(data_dir: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
  """Deletes `*.array_record-*` files a new metadata does not list (e.g. after a reshard)."""
  data_dir = pathlib.Path(data_dir)
  listed = {s["file"] for split in metadata["splits"].values() for s in split["shards"]}
  for p in data_dir.glob("*.array_record-*"):
    if p.name not in listed and not is_temporary(p.name):
      p.unlink(missing_ok=True)


def write_metadata(data_dir: str | os.PathLike, metadata: Mapping[str, Any]) -> None:
  """Writes `metadata.json` atomically; call last, after every shard is in place."""
  write_json_atomic(pathlib.Path(data_dir) / METADATA_FILE, dict(metadata))


# --------------------------------------------------------------------------------------------
# Reading.


def load_metadata(data_dir: str | os.PathLike, *, build_hint: str = DEFAULT_BUILD_HINT
                  ) -> dict[str, Any]:
  """Reads and validates `metadata.json`.

  Raises:
    FileNotFoundError: the directory or its metadata is missing (message names the path and
      how to build the dataset).
    MetadataError (a ValueError): the metadata is malformed or of an unsupported format version.
  """
  data_dir = pathlib.Path(data_dir)
  hint = build_hint.format(path=data_dir)
  if not data_dir.is_dir():
    raise FileNotFoundError(f"dataset directory {data_dir} does not exist; {hint}")
  path = data_dir / METADATA_FILE
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: {data_dir} holds no complete dataset (metadata.json is written last, "
        f"so a build that was interrupted leaves none); {hint}")
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise MetadataError(f"{path}: not valid JSON ({e}); {hint}") from None
  if not isinstance(meta, dict):
    raise MetadataError(f"{path}: expected a JSON object, found {type(meta).__name__}")
  if meta.get("format") != FORMAT_NAME:
    raise MetadataError(f"{path}: key 'format' is {meta.get('format')!r}, "
                        f"expected {FORMAT_NAME!r}")
  if meta.get("format_version") != FORMAT_VERSION:
    raise MetadataError(f"{path}: key 'format_version' is {meta.get('format_version')!r}, this "
                        f"reader supports {FORMAT_VERSION}; {hint}")
  for key in ("schema", "splits"):
    if key not in meta:
      raise MetadataError(f"{path}: missing key {key!r}")
  try:
    schema_from_json(meta["schema"])
  except (KeyError, TypeError, ValueError) as e:
    raise MetadataError(f"{path}: key 'schema' is malformed: {e!r}") from None
  for split, info in meta["splits"].items():
    if isinstance(info, dict) and "schema" in info:
      try:
        schema_from_json(info["schema"])
      except (KeyError, TypeError, ValueError) as e:
        raise MetadataError(f"{path}: key 'splits.{split}.schema' is malformed: {e!r}") from None
  for split, info in meta["splits"].items():
    shards = info.get("shards") if isinstance(info, dict) else None
    if not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "num_records"}
                                               <= s.keys() for s in shards):
      raise MetadataError(f"{path}: splits.{split}.shards must be a list of "
                          f"{{file, num_records, ...}} objects")
    if sum(s["num_records"] for s in shards) != info.get("num_examples"):
      raise MetadataError(f"{path}: splits.{split}.num_examples={info.get('num_examples')} differs "
                          f"from the sum of its shards' num_records")
  return meta


def split_schema(metadata: Mapping[str, Any], split: str) -> tuple[Field, ...]:
  """The schema of `split`: its own `splits.{split}.schema` if present, else the dataset's."""
  info = metadata["splits"][split]
  return schema_from_json(info["schema"] if "schema" in info else metadata["schema"])


def verify_files(data_dir: str | os.PathLike, metadata: Mapping[str, Any], *,
                 checksums: bool = True) -> list[str]:
  """Problems with the files `metadata` lists (missing, wrong size or sha256); [] if none."""
  data_dir = pathlib.Path(data_dir)
  problems = []
  for split, info in metadata["splits"].items():
    for shard in info["shards"]:
      p = data_dir / shard["file"]
      if not p.is_file():
        problems.append(f"{p}: missing (split {split!r})")
      elif "num_bytes" in shard and p.stat().st_size != shard["num_bytes"]:
        problems.append(f"{p}: {p.stat().st_size} bytes, metadata says {shard['num_bytes']}")
      elif checksums and "sha256" in shard and sha256_file(p) != shard["sha256"]:
        problems.append(f"{p}: sha256 differs from metadata")
  return problems


class ArrayRecordSource:
  """Random-access, decoding source over one split; usable by `grain.MapDataset.source(...)`.

  `source[i]` is the decoded record i of the split: a dict of its schema fields plus
  `index` (int, = i). A record that cannot be read or decoded raises `CorruptRecordError`
  (naming shard file, record and field); with `skip_bad_records=True` it is logged, counted in
  `num_skipped` and returned as None (grain's iterators drop None elements).

  `fields` restricts decoding to the named schema fields (e.g. skip attribute arrays a training
  pipeline does not use); errors are then reported only for those fields.

  Thread-safe (grain reads with several threads) and picklable (readers are reopened lazily in
  each process; `num_skipped` counts only this process's skips).
  """

  def __init__(self, data_dir: str | os.PathLike, split: str, *, skip_bad_records: bool = False,
               fields: Sequence[str] | None = None, metadata: Mapping[str, Any] | None = None,
               build_hint: str = DEFAULT_BUILD_HINT):
    self._data_dir = pathlib.Path(data_dir).resolve()
    meta = dict(metadata) if metadata is not None else load_metadata(data_dir,
                                                                     build_hint=build_hint)
    if split not in meta["splits"]:
      raise KeyError(f"split {split!r} not in dataset {self._data_dir} (splits: "
                     f"{sorted(meta['splits'])})")
    self._split = split
    self._metadata = meta
    schema = split_schema(meta, split)
    if fields is not None:
      unknown = sorted(set(fields) - {f.name for f in schema})
      if unknown:
        raise KeyError(f"fields {unknown} not in the schema of {self._data_dir} (fields: "
                       f"{[f.name for f in schema]})")
      schema = tuple(f for f in schema if f.name in fields)
    self._fields = schema
    shards = meta["splits"][split]["shards"]
    self._paths = [str(self._data_dir / s["file"]) for s in shards]
    self._counts = [int(s["num_records"]) for s in shards]
    self._offsets = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64)
    for p in self._paths:
      if not os.path.isfile(p):
        raise FileNotFoundError(f"shard file {p} listed in {self._data_dir / METADATA_FILE} is "
                                f"missing; {build_hint.format(path=self._data_dir)}")
    self._skip_bad_records = skip_bad_records
    self._init_runtime()

  def _init_runtime(self) -> None:
    self._readers: list[Any] = [None] * len(self._paths)
    self._lock = threading.Lock()
    self._num_skipped = 0

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    for key in ("_readers", "_lock", "_num_skipped"):
      del state[key]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._init_runtime()

  def __repr__(self) -> str:
    # grain compares source reprs when restoring a checkpoint: name the data, not the object.
    return f"ArrayRecordSource(data_dir={str(self._data_dir)!r}, split={self._split!r})"

  def __len__(self) -> int:
    return int(self._offsets[-1])

  @property
  def fields(self) -> tuple[Field, ...]:
    return self._fields

  @property
  def metadata(self) -> dict[str, Any]:
    return self._metadata

  @property
  def split(self) -> str:
    return self._split

  @property
  def num_skipped(self) -> int:
    """Bad records skipped so far by this process (only with `skip_bad_records=True`)."""
    return self._num_skipped

  def _reader(self, shard: int) -> Any:
    reader = self._readers[shard]
    if reader is not None:
      return reader
    with self._lock:
      if self._readers[shard] is None:
        path = self._paths[shard]
        try:
          reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
        except Exception as e:  # riegeli reports damaged files as RuntimeError.
          raise CorruptRecordError(
              path=path, split=self._split, index=int(self._offsets[shard]), position=0,
              field="<file>", reason=f"cannot open as ArrayRecord (truncated or damaged?): "
                                     f"{type(e).__name__}: {e}") from None
        # A truncated or foreign file opens "successfully" with fewer records.
        if reader.num_records() != self._counts[shard]:
          found = reader.num_records()
          try:
            reader.close()
          except RuntimeError:  # close() re-reports the open failure of a damaged file.
            pass
          raise CorruptRecordError(
              path=path, split=self._split, index=int(self._offsets[shard]), position=0,
              field="<file>", reason=f"file holds {found} records, metadata says "
                                     f"{self._counts[shard]} (truncated or replaced?)")
        self._readers[shard] = reader
      return self._readers[shard]

  def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """indices: [m] int64 → (shard [m] int64, position within the shard [m] int64)."""
    n = len(self)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      bad = indices[(indices < 0) | (indices >= n)][0]
      raise IndexError(f"record index {bad} out of range for split {self._split!r} of "
                       f"{n} records")
    shard = np.searchsorted(self._offsets, indices, side="right") - 1
    return shard, indices - self._offsets[shard]

  def _handle(self, error: CorruptRecordError) -> None:
    if not self._skip_bad_records:
      raise error
    with self._lock:
      self._num_skipped += 1
    _count_skip(error.split, error.field)
    _LOG.warning("skipping bad record: %s", error)

  def _read_raw(self, shard: int, positions: list[int]) -> list[bytes | CorruptRecordError]:
    reader = self._reader(shard)
    try:
      return list(reader.read(positions))
    except Exception:  # Locate the bad record(s): one batched read fails as a whole.
      out: list[bytes | CorruptRecordError] = []
      for pos in positions:
        try:
          out.append(reader.read([pos])[0])
        except Exception as e:  # riegeli reports corruption as RuntimeError.
          out.append(CorruptRecordError(
              path=self._paths[shard], split=self._split,
              index=int(self._offsets[shard]) + pos, position=pos, field="<record bytes>",
              reason=f"{type(e).__name__}: {e}"))
      return out

  def read_many(self, indices: Sequence[int]) -> list[dict[str, Any] | None]:
    """Decoded records at `indices` (in that order); None for skipped bad records."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    shards, positions = self._locate(indices)
    out: list[dict[str, Any] | None] = [None] * len(indices)
    for shard in np.unique(shards).tolist():
      rows = np.flatnonzero(shards == shard).tolist()
      shard_positions = positions[rows].tolist()
      raws = self._read_raw(shard, shard_positions)
      for row, position, raw in zip(rows, shard_positions, raws):
        index = int(indices[row])
        try:
          if isinstance(raw, CorruptRecordError):
            raise raw
          record = decode_record(raw, self._fields, path=self._paths[shard], split=self._split,
                                 index=index, position=position)
        except CorruptRecordError as e:
          self._handle(e)
          continue
        record["index"] = index
        out[row] = record
    return out

  def bad_record(self, index: int, field: str, reason: str) -> None:
    """Reports a record that decoded here but failed a later transform (e.g. an undecodable
    JPEG inside `image_bytes`): raises `CorruptRecordError` naming shard file, record and field,
    or, with `skip_bad_records`, logs it and counts it in `num_skipped`."""
    shard, position = self._locate(np.asarray([index], np.int64))
    self._handle(CorruptRecordError(
        path=self._paths[int(shard[0])], split=self._split, index=int(index),
        position=int(position[0]), field=field, reason=reason))

  @property
  def skip_bad_records(self) -> bool:
    return self._skip_bad_records

  # grain's batched-read protocol (SupportsBatchedReadRandomAccessDataSource).
  _getitems = read_many

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    return self.read_many([index])[0]

  def close(self) -> None:
    with self._lock:
      for reader in self._readers:
        if reader is not None:
          reader.close()
      self._readers = [None] * len(self._paths)
