"""webdataset tar shards (what img2dataset writes and open_clip trains on), read as a stream.

A sample is the run of consecutive tar members that share a key: member `dir/0001.jpg` has key
`dir/0001` and field `jpg` (webdataset's convention: the key is the path up to the first dot of
the file name). Each `columns.Column` of the reader takes the first of its names present as a
member (text members UTF-8, numbers as text), else the value of that name in the sample's JSON
member (`json_member`, e.g. `0001.json` = {"query": ..., "position": 3}). The image–text default
reads the image from the first of `IMAGE_FIELDS` and the caption from `txt`. A sample without a
column, a value of the wrong kind, a corrupt image member or a tar file that ends mid-member is
reported as a `BadRecordError` naming the shard, the sample and the field.
"""

from __future__ import annotations

import json
import re
import tarfile
from typing import Callable, Iterator, Sequence

from data_pipelines.sources import columns as columns_lib
from data_pipelines.sources import spec as spec_lib

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("txt",)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def split_name(name: str) -> tuple[str, str] | None:
  """'dir/0001.seg.jpg' → ('dir/0001', 'seg.jpg'); None for names without an extension."""
  m = _KEY_EXT.match(name)
  return (m.group(1), m.group(2).lower()) if m else None


def pair_columns(image_fields: Sequence[str] = IMAGE_FIELDS,
                 caption_fields: Sequence[str] = CAPTION_FIELDS) -> tuple[columns_lib.Column, ...]:
  """The image–text columns: image from the first of `image_fields`, caption from the first of
  `caption_fields` (member extensions)."""
  return (columns_lib.Column("image", tuple(f.lower().lstrip(".") for f in image_fields), "image",
                             "data.image_field"),
          columns_lib.Column("caption", tuple(f.lower().lstrip(".") for f in caption_fields),
                             "text", "data.caption_field"))


class WebDatasetShards:
  """Reads samples {<column field>: value, ..., key: str} from tar shards, from any position.

  Args:
    files: the shard paths in their natural (sorted) order.
    image_fields, caption_fields: field names (extensions) tried in order, when `columns` is
      not given ({image: bytes, caption: str, key} samples).
    columns: what to read (`columns.Column`; names are member extensions or JSON keys).
    json_member: the member (extension) whose JSON object holds the columns that are not
      members themselves ('' = none).
  """

  def __init__(self, files: Sequence[str], *, image_fields: Sequence[str] = IMAGE_FIELDS,
               caption_fields: Sequence[str] = CAPTION_FIELDS,
               columns: Sequence[columns_lib.Column] | None = None, json_member: str = ""):
    self.files = list(files)
    self.columns = tuple(columns if columns is not None
                         else pair_columns(image_fields, caption_fields))
    # Member names as `split_name` gives them (lower case, no leading dot); JSON keys as given.
    self._members = {c.field: tuple(n.lower().lstrip(".") for n in c.names) for c in self.columns}
    self.json_member = json_member.lower().lstrip(".")

  def __repr__(self) -> str:
    return f"WebDatasetShards({len(self.files)} shards from {self.files[0]!r})"

  def _wanted(self) -> set[str]:
    wanted = {n for names in self._members.values() for n in names}
    if self.json_member:
      wanted.add(self.json_member)
    return wanted

  def _sample(self, path: str, key: str, position: int, members: dict[str, bytes]
              ) -> dict | spec_lib.BadRecordError:
    bad = lambda field, reason: spec_lib.BadRecordError(  # noqa: E731
        path=path, key=key, position=position, field=field, reason=reason)
    meta = None
    if self.json_member and self.json_member in members:
      try:
        meta = json.loads(members[self.json_member].decode("utf-8"))
      except (UnicodeDecodeError, ValueError) as e:
        return bad(self.json_member, f"not a JSON object ({e})")
      if not isinstance(meta, dict):
        return bad(self.json_member, f"not a JSON object (found {type(meta).__name__})")
    out = {}
    for col in self.columns:
      name = next((n for n in self._members[col.field] if n in members), None)
      if name is not None:
        raw = members[name]
      elif meta is not None and any(n in meta for n in col.names):
        name = next(n for n in col.names if n in meta)
        raw = meta[name]
      else:
        where = (f"; its {self.json_member} member has {sorted(meta)}" if meta is not None
                 else f"; no {self.json_member} member" if self.json_member else "")
        return bad(col.label, f"no {col.field} member (the sample has "
                              f"{sorted(members) or 'no members'}{where})")
      value, why = columns_lib.convert(col, raw)
      if why:
        return bad(name, why)
      out[col.field] = value
    out["key"] = key
    return out

  def read(self, shard: int, start: int = 0, keep: Callable[[str], bool] | None = None
           ) -> Iterator[tuple[int, dict | spec_lib.BadRecordError]]:
    """(position, sample or BadRecordError) for the samples of shard `shard` from `start` on.

    Positions count samples from 0 in the file. Members of samples before `start`, and of
    samples whose key `keep` rejects, are skipped without reading their data. A damaged tar
    ends the shard with one BadRecordError."""
    path = self.files[shard]
    wanted = self._wanted()
    position, key, members, kept = -1, None, {}, True
    try:
      with open(path, "rb") as f:
        head = f.read(6)
        f.seek(0)
        compressed = head[:2] in (b"\x1f\x8b", b"BZ") or head == b"\xfd7zXZ\x00"
        entries = _tarfile_members(path) if compressed else _plain_tar_members(f)
        for name, read_data in entries:
          parts = split_name(name)
          if parts is None or parts[0].rsplit("/", 1)[-1].startswith("__"):
            continue
          k, ext = parts
          if k != key:
            if key is not None and position >= start and kept:
              yield position, self._sample(path, key, position, members)
            position, key, members = position + 1, k, {}
            kept = keep is None or keep(k)
          if position >= start and kept and ext in wanted:
            members[ext] = read_data()
        if key is not None and position >= start and kept:
          yield position, self._sample(path, key, position, members)
    except Exception as e:  # pylint: disable=broad-except  (sorted below; GeneratorExit passes)
      if isinstance(e, _Damaged):
        reason = f"tar damaged after sample {key!r}: {e}"
      elif isinstance(e, (OSError, tarfile.TarError, EOFError)):
        reason = f"cannot read as a tar file ({type(e).__name__}: {e})"
      else:
        raise
      yield max(position, start), spec_lib.BadRecordError(
          path=path, key=str(key), position=max(position, 0), field="<file>", reason=reason)


def _octal(field: bytes) -> int:
  if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
    return int.from_bytes(field[1:], "big")
  text = field.split(b"\0", 1)[0].strip()
  return int(text, 8) if text else 0


def _plain_tar_members(f) -> Iterator[tuple[str, Callable[[], bytes]]]:
  """(name, read the data) of each regular file in an uncompressed tar, headers parsed here
  (ustar, pax path/size records, GNU long names): members not read are skipped by seeking."""
  pax: dict[str, str] = {}
  long_name: str | None = None
  while True:
    header = f.read(512)
    if not header or header == b"\0" * 512:
      return
    if len(header) < 512:
      raise _Damaged(f"a member header is cut off ({len(header)} of 512 bytes)")
    expected = _octal(header[148:156])
    if sum(header) - sum(header[148:156]) + 256 != expected:
      raise _Damaged(f"member header at byte {f.tell() - 512} fails its checksum")
    size, kind = _octal(header[124:136]), header[156:157]
    start = f.tell()
    padded = (size + 511) // 512 * 512
    if kind in (b"x", b"g", b"L"):
      data = f.read(padded)[:size]
      if len(data) != size:
        raise _Damaged("an extended header is cut off")
      if kind == b"L":
        long_name = data.rstrip(b"\0").decode("utf-8", "replace")
      elif kind == b"x":
        pax = _pax_records(data)
      continue
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
      prefix = header[345:500].split(b"\0", 1)[0]
      if prefix:
        name = prefix + b"/" + name
    name_str = pax.get("path") or long_name or name.decode("utf-8", "replace")
    if "size" in pax:
      size = int(pax["size"])
      padded = (size + 511) // 512 * 512
    pax, long_name = {}, None
    if kind in (b"0", b"\0", b"7"):

      def read_data(size=size, start=start, name=name_str) -> bytes:
        f.seek(start)
        data = f.read(size)
        if len(data) != size:
          raise _Damaged(f"member {name!r} holds {len(data)} of {size} bytes (truncated file)")
        return data

      yield name_str, read_data
    f.seek(start + padded)


def _pax_records(data: bytes) -> dict[str, str]:
  out, pos = {}, 0
  while pos < len(data):
    space = data.index(b" ", pos)
    length = int(data[pos:space])
    key, _, value = data[space + 1:pos + length - 1].partition(b"=")
    out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    pos += length
  return out


def _tarfile_members(path: str) -> Iterator[tuple[str, Callable[[], bytes]]]:
  """The same for compressed tars, through the standard library's tarfile."""
  with tarfile.open(path, "r:*") as tar:
    while True:
      try:
        info = tar.next()
      except tarfile.TarError as e:
        raise _Damaged(f"{type(e).__name__}: {e}") from None
      if info is None:
        return
      if not info.isfile():
        continue

      def read_data(info=info) -> bytes:
        f = tar.extractfile(info)
        data = f.read() if f is not None else b""
        if len(data) != info.size:
          raise _Damaged(f"member {info.name!r} holds {len(data)} of {info.size} bytes "
                         "(truncated file)")
        return data

      yield info.name, read_data


class _Damaged(Exception):
  pass

