"""The two photo sets of the input-pipeline benchmarks, built from the shared fashion photos.

  small: the first N photos of `fashion-product-images` as they are (224 x 224 JPEG, ~5.6 KB);
  web:   the same photos upsampled to 800 x 800 (Lanczos) and re-encoded at JPEG quality 90
         (~50-100 KB, the size of a typical web image).

Everything is written under a cache directory (never into the repository); a set that is
already there with the same parameters is reused. Each set holds `images/<id>.jpg`, `styles.csv`
(the id, caption and image columns of the shared file, for `mmcl data convert --format image-captions`),
the converted mmcl dataset `mmcl/`, and webdataset shards `wds/shard-%05d.tar` (`<id>.jpg`,
`<id>.txt`) written with the standard library's tarfile.
"""
from __future__ import annotations

import csv
import io
import json
import pathlib
import sys
import tarfile

from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from data_pipelines import convert  # noqa: E402

SETS = ("small", "web")
WEB_SIDE, WEB_QUALITY = 800, 90


def _rows(shared: pathlib.Path, count: int) -> list[dict[str, str]]:
  with open(shared / "styles.csv", newline="") as f:
    rows = [r for r in csv.DictReader(f)
            if r["productDisplayName"].strip() and (shared / "images" / f"{r['id']}.jpg").is_file()]
  rows.sort(key=lambda r: int(r["id"]))
  if len(rows) < count:
    raise ValueError(f"{shared}: only {len(rows)} photos with captions, {count} requested")
  return rows[:count]


def build(shared: str | pathlib.Path, cache: str | pathlib.Path, *, count: int = 1200,
          shard_size: int = 300) -> dict[str, pathlib.Path]:
  """Builds (or reuses) both photo sets; returns {set name: its directory}."""
  shared, cache = pathlib.Path(shared), pathlib.Path(cache)
  rows = _rows(shared, count)
  out = {}
  for name in SETS:
    root = cache / name
    params = {"count": count, "shard_size": shard_size, "web_side": WEB_SIDE,
              "web_quality": WEB_QUALITY, "first_id": rows[0]["id"], "last_id": rows[-1]["id"]}
    stamp = root / "photo_set.json"
    out[name] = root
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
      continue
    (root / "images").mkdir(parents=True, exist_ok=True)
    for r in rows:
      data = (shared / "images" / f"{r['id']}.jpg").read_bytes()
      if name == "web":
        im = Image.open(io.BytesIO(data)).convert("RGB").resize((WEB_SIDE, WEB_SIDE),
                                                                Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=WEB_QUALITY)
        data = buf.getvalue()
      (root / "images" / f"{r['id']}.jpg").write_bytes(data)
    with open(root / "styles.csv", "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(["id", "productDisplayName", "image"])
      w.writerows([r["id"], r["productDisplayName"], f"{r['id']}.jpg"] for r in rows)
    convert.convert("image-captions", root / "styles.csv", root / "mmcl",
                    image_root=str(root / "images"), caption_column="productDisplayName",
                    id_column="id", split_by="none")
    (root / "wds").mkdir(exist_ok=True)
    for s in range(0, count, shard_size):
      with tarfile.open(root / "wds" / f"shard-{s // shard_size:05d}.tar", "w") as tar:
        for r in rows[s:s + shard_size]:
          for ext, payload in (("jpg", (root / "images" / f"{r['id']}.jpg").read_bytes()),
                               ("txt", r["productDisplayName"].encode())):
            info = tarfile.TarInfo(f"{r['id']}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    stamp.write_text(json.dumps(params))
  return out


if __name__ == "__main__":
  repo = pathlib.Path(__file__).resolve().parents[2]
  print(build(repo.parent / "shared" / "data" / "fashion-product-images", "/tmp/mmcl_peers"))
