"""hetrec2011-lastfm-2k → per-artist modalities (`entity` kind): a collaborative-filtering
embedding, a tag embedding, availability bits.

Files (tab-separated, header line): `artists.dat` (id, name, url, pictureURL; UTF-8),
`user_artists.dat` (userID, artistID, weight = play count), `user_taggedartists.dat` (userID,
artistID, tagID, day, month, year) or `user_taggedartists-timestamps.dat` (…, timestamp),
`tags.dat` (tagID, tagValue; ISO-8859-1).

Entities: every artist of `artists.dat`, then (in id order) artists that appear only in the tag
assignments (390 in the original data, a known quirk); their name is ''.

* `cf` [cf_dim]: truncated SVD of the user × artist matrix of log(1 + plays): with
  X ≈ U S Vᵀ, the artist vector is the row of V S^{1/2}, L2-normalised (Hu et al. 2008 use
  log-scaled confidence for implicit feedback; SVD keeps it deterministic and dependency-free).
  `has_cf` = the artist has a play count.
* `tags` [tag_dim]: the artist's weighted tag profile — w(a, t) = (1 + log n(a, t)) ·
  (log(A / df(t)) + 1), n = number of users who gave tag t to artist a, df = number of artists
  with tag t, A = tagged artists (TF-IDF, `featurize.tfidf_svd_counts`) — reduced by truncated SVD
  the same way, L2-normalised. `has_tags` = the artist has a tag assignment.
Both go through `data_pipelines.featurize` (scikit-learn, ARPACK); singular vectors' signs are
fixed (largest-magnitude artist loading positive), so conversions are reproducible. A play count or tag assignment naming an unknown tag id, a negative weight or a
malformed row raises an error naming file, line and field. `metadata["top_tags"]` is not stored;
tag names are kept in `metadata["tag_names"]` (id → value) for inspection.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import scipy.sparse

from data_pipelines import featurize
from data_pipelines.converters import common
from data_pipelines.converters import entities


def artist_svd_embedding(matrix: scipy.sparse.csr_matrix, dim: int) -> np.ndarray:
  """Column embeddings V S^{1/2} of a rank-`dim` truncated SVD, rows L2-normalised
  (`featurize.svd_embedding` of the transpose, ARPACK, largest-|value| loading positive).

  Args:
    matrix: [R, C] sparse, C columns (artists) to embed.
    dim: k < min(R, C).

  Returns:
    [C, k] float32, components in decreasing singular-value order, deterministic signs.
  """
  r, c = matrix.shape
  if not 0 < dim < min(r, c):
    raise ValueError(f"embedding dim must be in [1, {min(r, c) - 1}] for a {r}×{c} matrix, "
                     f"got {dim}")
  return featurize.svd_embedding(matrix.T.tocsr(), dim, singular_power=0.5, algorithm="arpack")


def _int(row: dict, name: str, path, line: int) -> int:
  return common.parse_int(common.get_field(row, name, path, line), path, line, name)


def read(folder: str | os.PathLike, *, cf_dim: int = 64, tag_dim: int = 64) -> dict[str, Any]:
  folder = pathlib.Path(folder)
  artists_path = folder / "artists.dat"
  plays_path = folder / "user_artists.dat"
  tagged_path = folder / "user_taggedartists.dat"
  if not tagged_path.is_file():
    tagged_path = folder / "user_taggedartists-timestamps.dat"
  tags_path = folder / "tags.dat"
  ids, names = [], []
  for line, row in common.read_table(artists_path, delimiter="\t"):
    ids.append(_int(row, "id", artists_path, line))
    names.append(common.get_field(row, "name", artists_path, line).strip())
  if len(set(ids)) != len(ids):
    raise common.ConversionError(artists_path, None, "id", "duplicate artist ids")
  tag_names = {}
  for line, row in common.read_table(tags_path, delimiter="\t", encoding="latin-1"):
    tag_names[_int(row, "tagID", tags_path, line)] = common.get_field(
        row, "tagValue", tags_path, line).strip()
  plays = []
  for line, row in common.read_table(plays_path, delimiter="\t"):
    w = _int(row, "weight", plays_path, line)
    if w < 0:
      raise common.ConversionError(plays_path, line, "weight", f"negative play count {w}")
    plays.append((_int(row, "userID", plays_path, line), _int(row, "artistID", plays_path, line),
                  w))
  tagged = []
  for line, row in common.read_table(tagged_path, delimiter="\t"):
    t = _int(row, "tagID", tagged_path, line)
    if t not in tag_names:
      raise common.ConversionError(tagged_path, line, "tagID", f"unknown tag id {t} (not in "
                                                               f"{tags_path.name})")
    tagged.append((_int(row, "userID", tagged_path, line),
                   _int(row, "artistID", tagged_path, line), t))
  known = set(ids)
  extra = sorted(({a for _, a, _ in plays} | {a for _, a, _ in tagged}) - known)
  all_ids = ids + extra
  pos = {a: i for i, a in enumerate(all_ids)}
  names = names + [""] * len(extra)
  e = len(all_ids)

  users = sorted({u for u, _, _ in plays})
  upos = {u: i for i, u in enumerate(users)}
  p = np.asarray(plays, np.int64)
  play_matrix = scipy.sparse.csr_matrix(
      (np.log1p(p[:, 2].astype(np.float64)), ([upos[u] for u in p[:, 0]],
                                              [pos[a] for a in p[:, 1]])), shape=(len(users), e))
  has_cf = np.zeros(e, bool)
  has_cf[[pos[a] for a in p[:, 1]]] = True
  cf = artist_svd_embedding(play_matrix, cf_dim)

  t = np.asarray(tagged, np.int64)
  tag_ids = sorted(set(t[:, 2].tolist()))
  tpos = {x: i for i, x in enumerate(tag_ids)}
  counts = scipy.sparse.csr_matrix(
      (np.ones(len(t)), ([tpos[x] for x in t[:, 2]], [pos[a] for a in t[:, 1]])),
      shape=(len(tag_ids), e))  # [tags, artists]; duplicates summed = n(a, t)
  counts.sum_duplicates()
  has_tags = np.asarray(counts.getnnz(axis=0) > 0).reshape(-1)
  if not 0 < tag_dim < min(len(tag_ids), int(has_tags.sum())):
    raise ValueError(f"embedding dim must be in [1, {min(len(tag_ids), int(has_tags.sum())) - 1}] "
                     f"for {int(has_tags.sum())} tagged artists and {len(tag_ids)} tags, "
                     f"got {tag_dim}")
  # The tagged artists are the documents: idf counts over them only.
  tags_emb = np.zeros((e, tag_dim), np.float32)
  tags_emb[has_tags] = featurize.tfidf_svd_counts(
      counts.T.tocsr()[has_tags], tag_dim, log_tf=True, smooth_idf=False, unit_tfidf_rows=False,
      singular_power=0.5, algorithm="arpack")
  return {"ids": [str(a) for a in all_ids], "names": names,
          "modalities": {"cf": (cf, has_cf), "tags": (tags_emb, has_tags)},
          "tag_names": {str(k): v for k, v in sorted(tag_names.items())},
          # n(a, t): [tags used, artists] counts, rows in `tag_order` (tag ids) order.
          "tag_counts": counts.tocsc(), "tag_order": tag_ids,
          "stats": {"num_users": len(users), "num_play_counts": len(plays),
                    "num_tag_assignments": len(tagged), "num_tags_used": len(tag_ids),
                    "artists_in_artists_dat": len(ids), "artists_only_in_tags": len(extra)},
          "inputs": [artists_path, plays_path, tagged_path, tags_path]}


def convert(input: str | os.PathLike, output: str | os.PathLike, *, split_by: str | None = None,
            num_shards: int = 4, cf_dim: int = 64, tag_dim: int = 64,
            **unused: Any) -> dict[str, Any]:
  """`--format lastfm-hetrec`: INPUT is the hetrec2011-lastfm-2k folder."""
  if common.parse_split_by(split_by, "none")[0] != "none":
    raise ValueError("--split-by: entity datasets have one split, 'entities'")
  folder = pathlib.Path(input)
  if not folder.is_dir():
    raise FileNotFoundError(f"expected the hetrec2011-lastfm-2k folder at {folder}")
  inputs = [folder / n for n in ("artists.dat", "user_artists.dat", "user_taggedartists.dat",
                                 "user_taggedartists-timestamps.dat", "tags.dat")]
  source = {"converter": "lastfm-hetrec", "input": str(input), "num_shards": num_shards,
            "cf_dim": cf_dim, "tag_dim": tag_dim,
            "inputs": common.input_digest([p for p in inputs if p.is_file()])}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  data = read(folder, cf_dim=cf_dim, tag_dim=tag_dim)
  return entities.write_entities(output, ids=data["ids"], names=data["names"],
                                 modalities=data["modalities"], source=source,
                                 num_shards=num_shards,
                                 extra={"tag_names": data["tag_names"], "stats": data["stats"]})
