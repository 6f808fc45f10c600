"""webdataset tar shards (what img2dataset writes and open_clip trains on), read as a stream.

A sample is the run of consecutive tar members that share a key: member `dir/0001.jpg` has key
`dir/0001` and field `jpg` (webdataset's convention: the key is the path up to the first dot of
the file name). The image is the first of `image_fields` present, the caption the first of
`caption_fields` (UTF-8 text). A sample without one of them, a corrupt image member or a tar file
that ends mid-member is reported as a `BadRecordError` naming the shard, the sample and the field.
"""

from __future__ import annotations

import re
import tarfile
from typing import Iterator, Sequence

from data_pipelines.sources import spec as spec_lib

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("txt",)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def split_name(name: str) -> tuple[str, str] | None:
  """'dir/0001.seg.jpg' → ('dir/0001', 'seg.jpg'); None for names without an extension."""
  m = _KEY_EXT.match(name)
  return (m.group(1), m.group(2).lower()) if m else None


class WebDatasetShards:
  """Reads samples {image: bytes, caption: str, key: str} from tar shards, from any position.

  Args:
    files: the shard paths in their natural (sorted) order.
    image_fields, caption_fields: field names (extensions) tried in order.
  """

  def __init__(self, files: Sequence[str], *, image_fields: Sequence[str] = IMAGE_FIELDS,
               caption_fields: Sequence[str] = CAPTION_FIELDS):
    self.files = list(files)
    self.image_fields = tuple(f.lower().lstrip(".") for f in image_fields)
    self.caption_fields = tuple(f.lower().lstrip(".") for f in caption_fields)

  def __repr__(self) -> str:
    return f"WebDatasetShards({len(self.files)} shards from {self.files[0]!r})"

  def _sample(self, path: str, key: str, position: int, members: dict[str, bytes]
              ) -> dict | spec_lib.BadRecordError:
    image = next((members[f] for f in self.image_fields if f in members), None)
    if image is None:
      return spec_lib.BadRecordError(
          path=path, key=key, position=position, field="/".join(self.image_fields),
          reason=f"no image member (the sample has {sorted(members) or 'no members'})")
    caption = next((members[f] for f in self.caption_fields if f in members), None)
    if caption is None:
      return spec_lib.BadRecordError(
          path=path, key=key, position=position, field="/".join(self.caption_fields),
          reason=f"no caption member (the sample has {sorted(members)})")
    try:
      text = caption.decode("utf-8").strip()
    except UnicodeDecodeError as e:
      return spec_lib.BadRecordError(path=path, key=key, position=position,
                                     field=self.caption_fields[0], reason=f"not UTF-8 ({e})")
    return {"image": image, "caption": text, "key": key}

  def read(self, shard: int, start: int = 0) -> Iterator[tuple[int, dict | spec_lib.BadRecordError]]:
    """(position, sample or BadRecordError) for the samples of shard `shard` from `start` on.

    Positions count samples from 0 in the file. Members of samples before `start` are skipped
    without reading their data. A damaged tar ends the shard with one BadRecordError."""
    path = self.files[shard]
    wanted = set(self.image_fields) | set(self.caption_fields)
    position, key, members = -1, None, {}
    try:
      with tarfile.open(path, "r:*") as tar:
        while True:
          try:
            info = tar.next()
          except tarfile.TarError as e:
            raise _Damaged(f"tar damaged after sample {key!r} ({type(e).__name__}: {e})") from None
          if info is None:
            break
          if not info.isfile():
            continue
          parts = split_name(info.name)
          if parts is None or parts[0].rsplit("/", 1)[-1].startswith("__"):
            continue
          k, ext = parts
          if k != key:
            if key is not None and position >= start:
              yield position, self._sample(path, key, position, members)
            position, key, members = position + 1, k, {}
          if position >= start and ext in wanted:
            f = tar.extractfile(info)
            data = f.read() if f is not None else b""
            if len(data) != info.size:
              raise _Damaged(f"member {info.name!r} holds {len(data)} of {info.size} bytes "
                             "(truncated file)")
            members[ext] = data
        if key is not None and position >= start:
          yield position, self._sample(path, key, position, members)
    except _Damaged as e:
      yield max(position, start), spec_lib.BadRecordError(
          path=path, key=str(key), position=max(position, 0), field="<file>", reason=str(e))
    except (OSError, tarfile.TarError, EOFError) as e:
      yield max(position, start), spec_lib.BadRecordError(
          path=path, key=str(key), position=max(position, 0), field="<file>",
          reason=f"cannot read as a tar file ({type(e).__name__}: {e})")


class _Damaged(Exception):
  pass
