"""Product search with graded relevance (GCL, arXiv:2404.08535): a procedural set, the Marqo-GS split
construction shared with the real fashion set, and the multi-field training batches.

Every set here is a `query_document` dataset (`schemas.query_document_schema(with_images=True)`,
the layout `mmcl data convert --format marqo-gs` writes) plus one optional "other text" document
field, `description` / `description_ids` ('' / [BOS, EOS] when the product has none). Readers of
the Marqo-GS format ignore the extra field; the GCL task uses it when present.

Build the procedural set (a few seconds; idempotent)::

  mmcl data build products --output data/products

How the procedural set is made (all draws from one seed):
  * Products: a category (8; the drawn shape), a colour (8; the fill), a pattern (4: plain,
    striped, dotted, checked; drawn over the shape), a brand (12) and a material (6). The
    image (`image_size` px PNG) shows category, colour and pattern with jittered size, position
    and brightness. The title names the brand and the category, and the colour / pattern only
    sometimes (p = 0.6 / 0.5, as real titles omit things the photo shows). The description
    (present with p = 0.7) names the material and the pattern. So each field carries something
    the others lack: brand and category (title), colour (image, sometimes title), material
    (description only).
  * Queries: distinct attribute combinations (a category plus 0-2 of colour / pattern / brand /
    material, or 1-2 attributes without a category), each with one phrasing drawn from
    templates ("red striped shirt", "shirts in red", "acme leather bags", ...).
  * Graded relevance: agreement(q, d) = Σ_{a ∈ q} w_a·[d_a = q_a] with w = category 4, colour 2,
    brand 2, pattern 1, material 1. The `max_position` (100) products with the largest positive
    agreement get positions 1..100 (ties in agreement broken by a per-product popularity draw,
    like a search engine's engagement signal); the others are not listed for the query.
  * Scores from positions, as Marqo-GS: score_linear = (P + 1 - position) / P (P = max_position),
    score_reciprocal = 1 / position.
  * Splits as Marqo-GS (`marqo_splits`): 80/20 queries (train/test), 50/50 products; `train` =
    train queries x train products; `in_domain` = a sample of train queries x train products (the
    pairs seen in training, as in Marqo-GS); `novel_query` = test queries x train products;
    `novel_document` = a sample of train queries x test products; `zero_shot` = test queries x
    test products. A pair keeps its position from the ranking over all products (so a query has
    about half of its 100 listed products in each product half).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines import image_ops
from data_pipelines import image_text
from data_pipelines import pipelines
from data_pipelines import records
from data_pipelines import schemas
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.converters import common

SPLITS = ("train", "in_domain", "novel_query", "novel_document", "zero_shot")
EVAL_SPLITS = SPLITS[1:]
DESCRIPTION_FIELDS = (records.Field("description", "text"),
                      records.Field("description_ids", "int32_sequence"))

CATEGORIES = ("shirt", "dress", "shoe", "bag", "hat", "watch", "lamp", "mug")
COLOURS = {"red": (215, 40, 40), "blue": (40, 70, 215), "green": (40, 160, 60),
           "yellow": (235, 205, 40), "black": (25, 25, 25), "white": (250, 250, 250),
           "purple": (135, 50, 170), "orange": (245, 135, 30)}
PATTERNS = ("plain", "striped", "dotted", "checked")
BRANDS = ("acme", "zenith", "nova", "orbit", "lumen", "kestrel", "maple", "vertex", "halcyon",
          "tundra", "quartz", "sable")
MATERIALS = ("cotton", "leather", "wool", "denim", "silk", "canvas")
ATTRIBUTES = ("category", "colour", "pattern", "brand", "material")
AGREEMENT_WEIGHTS = {"category": 4.0, "colour": 2.0, "brand": 2.0, "pattern": 1.0,
                     "material": 1.0}
_PLURAL = {"dress": "dresses", "watch": "watches"}


# --------------------------------------------------------------------------------------------
# Marqo-GS construction shared by every product-search set.


def marqo_splits(num_queries: int, num_docs: int, *, seed: int, query_train_fraction: float = 0.8,
                 doc_train_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """Which queries and which documents are "train" (seen) ones, as in Marqo-GS (80/20, 50/50).

  Returns:
    query_train: [Q] bool, exactly round(Q · query_train_fraction) true.
    doc_train: [N] bool, exactly round(N · doc_train_fraction) true.
  """
  rng = np.random.default_rng([seed, 0x5B117])
  query_train = np.zeros(num_queries, bool)
  query_train[rng.permutation(num_queries)[:round(num_queries * query_train_fraction)]] = True
  doc_train = np.zeros(num_docs, bool)
  doc_train[rng.permutation(num_docs)[:round(num_docs * doc_train_fraction)]] = True
  return query_train, doc_train


def positions_from_agreement(agreement: np.ndarray, popularity: np.ndarray, *,
                             max_position: int = 100) -> np.ndarray:
  """Ranks documents per query by agreement (ties: higher popularity first) → positions.

  Args:
    agreement: [Q, N] float ≥ 0; 0 = not relevant at all (never listed).
    popularity: [N] float, the tie-break.
    max_position: P, how many documents a query lists.

  Returns:
    positions: [Q, N] int32 in 1..P for listed documents, 0 for the others.
  """
  agreement = np.asarray(agreement, np.float64)
  if agreement.ndim != 2 or np.shape(popularity) != agreement.shape[1:]:
    raise ValueError(f"positions_from_agreement: expected agreement [Q, N] and popularity [N], "
                     f"got {agreement.shape} and {np.shape(popularity)}")
  num_q, num_d = agreement.shape
  # lexsort keys, last = primary: agreement descending, then popularity descending.
  pop = np.broadcast_to(-np.asarray(popularity, np.float64), agreement.shape)
  order = np.lexsort((pop, -agreement), axis=1)[:, :max_position]  # [Q, P]
  positions = np.zeros((num_q, num_d), np.int32)
  rows = np.repeat(np.arange(num_q), order.shape[1])
  ranks = np.tile(np.arange(1, order.shape[1] + 1, dtype=np.int32), num_q)
  listed = agreement[rows, order.reshape(-1)] > 0
  positions[rows[listed], order.reshape(-1)[listed]] = ranks[listed]
  return positions


def scores_from_positions(positions: np.ndarray, max_position: int = 100
                          ) -> tuple[np.ndarray, np.ndarray]:
  """positions [...] int ≥ 1 → (score_linear = (P + 1 − pos)/P, score_reciprocal = 1/pos)."""
  positions = np.asarray(positions, np.float64)
  if np.any(positions < 1) or np.any(positions > max_position):
    raise ValueError(f"scores_from_positions: positions must lie in 1..{max_position}")
  return (max_position + 1 - positions) / max_position, 1.0 / positions


def split_pairs(positions: np.ndarray, query_train: np.ndarray, doc_train: np.ndarray, *,
                seed: int, eval_queries: int) -> dict[str, np.ndarray]:
  """The (query, document) pairs of each Marqo-GS split.

  Args:
    positions: [Q, N] int, 0 = not listed.
    query_train: [Q] bool; doc_train: [N] bool (from `marqo_splits`).
    seed: draws the in_domain / novel_document query samples.
    eval_queries: at most this many queries per evaluation split.

  Returns:
    split → [M, 2] int64 (query index, document index) pairs with a position, query-major.
  """
  rng = np.random.default_rng([seed, 0xE7A1])
  train_q = np.flatnonzero(query_train)
  test_q = np.flatnonzero(~query_train)

  def sample(qs: np.ndarray) -> np.ndarray:
    return np.sort(rng.permutation(qs)[:eval_queries])

  query_sets = {"train": train_q, "in_domain": sample(train_q), "novel_query": sample(test_q),
                "novel_document": sample(train_q), "zero_shot": sample(test_q)}
  doc_sets = {"train": doc_train, "in_domain": doc_train, "novel_query": doc_train,
              "novel_document": ~doc_train, "zero_shot": ~doc_train}
  out = {}
  for split in SPLITS:
    qmask = np.zeros(len(query_train), bool)
    qmask[query_sets[split]] = True
    listed = (positions > 0) & qmask[:, None] & doc_sets[split][None, :]
    out[split] = np.argwhere(listed).astype(np.int64)
  return out


def write_product_search_dataset(
    output: str | os.PathLike, *, query_ids: Sequence[str], queries: Sequence[str],
    product_ids: Sequence[str], titles: Sequence[str], descriptions: Sequence[str],
    images: Sequence[bytes], image_paths: Sequence[str], positions: np.ndarray,
    pairs: Mapping[str, np.ndarray], source: Mapping[str, Any], max_position: int = 100,
    vocab_size: int = 2048, num_shards: int = 4, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
  """Writes a `query_document` dataset (Marqo-GS schema + `description`) through the converters'
  writer (`common.write_dataset`): one row per (query, document, position) pair of each split.

  Args:
    output: dataset directory.
    query_ids, queries: Q query ids and texts.
    product_ids, titles, descriptions, images, image_paths: N documents ('' = no description;
      images = encoded JPEG/PNG bytes).
    positions: [Q, N] int, 1..max_position for listed pairs.
    pairs: split → [M, 2] (query index, document index) (from `split_pairs`).
    source: the builder's name and parameters (a re-run with the same source returns at once).
    max_position, vocab_size, num_shards: scores' P, tokenizer size, shards per split.
    extra: more metadata keys.

  Returns:
    the metadata dict.
  """
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  train_pairs = pairs["train"]
  train_q = np.unique(train_pairs[:, 0])
  train_d = np.unique(train_pairs[:, 1])
  tok = common.train_tokenizer(
      [queries[q] for q in train_q] + [titles[d] for d in train_d]
      + [descriptions[d] for d in train_d if descriptions[d]], vocab_size)
  q_ids = tok.encode_unpadded(list(queries))
  t_ids = tok.encode_unpadded(list(titles))
  d_ids = tok.encode_unpadded(list(descriptions))
  fields = schemas.query_document_schema(with_images=True) + DESCRIPTION_FIELDS

  def examples(split: str):
    for q, d in pairs[split]:
      pos = int(positions[q, d])
      lin, rec = scores_from_positions(np.asarray([pos]), max_position)
      yield {"query_id": query_ids[q], "query": queries[q],
             "query_ids": np.asarray(q_ids[q], np.int32), "product_id": product_ids[d],
             "title": titles[d], "title_ids": np.asarray(t_ids[d], np.int32),
             "image_path": image_paths[d], "image": images[d], "position": pos,
             "score_linear": float(lin[0]), "score_reciprocal": float(rec[0]),
             "description": descriptions[d],
             "description_ids": np.asarray(d_ids[d], np.int32)}

  splits = {s: common.SplitSpec(fields, examples(s), len(pairs[s])) for s in pairs}
  return common.write_dataset(
      output, kind=schemas.QUERY_DOCUMENT, schema=fields, splits=splits, source=source,
      num_shards=num_shards, tokenizer=tok,
      extra={"has_images": True, "has_description": True, "max_position": max_position,
             "num_queries": {s: int(len(np.unique(p[:, 0]))) for s, p in pairs.items()},
             "num_documents": {s: int(len(np.unique(p[:, 1]))) for s, p in pairs.items()},
             **(extra or {})})


# --------------------------------------------------------------------------------------------
# The procedural set.


def _plural(noun: str) -> str:
  return _PLURAL.get(noun, noun + "s")


def _shape_mask(category: str, size: int, cx: float, cy: float, scale: float) -> np.ndarray:
  """[size, size] bool: the silhouette of `category` centred at (cx, cy), half-extent scale·size."""
  big = 4 * size  # draw at 4x and downsample: smooth edges at 32 px.
  im = Image.new("L", (big, big), 0)
  dr = ImageDraw.Draw(im)
  r = scale * big
  x, y = cx * big, cy * big

  def box(dx0, dy0, dx1, dy1):
    return [x + dx0 * r, y + dy0 * r, x + dx1 * r, y + dy1 * r]

  if category == "shirt":  # T shape
    dr.rectangle(box(-0.5, -0.6, 0.5, 0.9), fill=255)
    dr.rectangle(box(-1.0, -0.6, 1.0, -0.1), fill=255)
  elif category == "dress":  # trapezoid
    dr.polygon([(x - 0.35 * r, y - 0.9 * r), (x + 0.35 * r, y - 0.9 * r),
                (x + 0.9 * r, y + 0.9 * r), (x - 0.9 * r, y + 0.9 * r)], fill=255)
  elif category == "shoe":  # low wide boot
    dr.rectangle(box(-0.9, 0.2, 0.9, 0.7), fill=255)
    dr.rectangle(box(-0.9, -0.5, -0.3, 0.7), fill=255)
  elif category == "bag":  # square with a handle
    dr.rectangle(box(-0.8, -0.3, 0.8, 0.9), fill=255)
    dr.arc(box(-0.5, -0.9, 0.5, 0.1), 180, 360, fill=255, width=max(1, int(0.15 * r)))
  elif category == "hat":  # dome + brim
    dr.pieslice(box(-0.6, -0.7, 0.6, 0.5), 180, 360, fill=255)
    dr.rectangle(box(-1.0, -0.1, 1.0, 0.15), fill=255)
  elif category == "watch":  # disc + strap
    dr.rectangle(box(-0.25, -1.0, 0.25, 1.0), fill=255)
    dr.ellipse(box(-0.6, -0.6, 0.6, 0.6), fill=255)
  elif category == "lamp":  # shade on a stand
    dr.polygon([(x - 0.3 * r, y - 0.9 * r), (x + 0.3 * r, y - 0.9 * r),
                (x + 0.8 * r, y - 0.1 * r), (x - 0.8 * r, y - 0.1 * r)], fill=255)
    dr.rectangle(box(-0.1, -0.1, 0.1, 0.7), fill=255)
    dr.rectangle(box(-0.5, 0.7, 0.5, 0.9), fill=255)
  elif category == "mug":  # cylinder with a handle
    dr.rectangle(box(-0.6, -0.7, 0.4, 0.8), fill=255)
    dr.arc(box(0.1, -0.4, 0.9, 0.4), 270, 90, fill=255, width=max(1, int(0.15 * r)))
  else:
    raise ValueError(f"unknown category {category!r}")
  return np.asarray(im.resize((size, size), Image.Resampling.BOX)) > 127


def render_product(category: str, colour: str, pattern: str, *, size: int,
                   rng: np.random.Generator) -> np.ndarray:
  """One product photo: [size, size, 3] uint8 (jittered placement, scale and brightness)."""
  cx, cy = rng.uniform(0.42, 0.58, size=2)
  mask = _shape_mask(category, size, cx, cy, rng.uniform(0.28, 0.36))
  base = np.asarray(COLOURS[colour], np.float32) * rng.uniform(0.85, 1.0)
  # The pattern's second tone: darker for light colours, lighter for dark ones.
  alt = base * 0.45 if base.mean() > 110 else base + 0.55 * (255 - base)
  yy, xx = np.mgrid[0:size, 0:size]
  period = max(3, size // 8)
  if pattern == "plain":
    second = np.zeros((size, size), bool)
  elif pattern == "striped":
    second = (yy // max(1, period // 2)) % 2 == 1
  elif pattern == "dotted":
    centre = period / 2
    second = (yy % period - centre) ** 2 + (xx % period - centre) ** 2 < (period / 3.2) ** 2
  elif pattern == "checked":
    second = ((yy // period) + (xx // period)) % 2 == 1
  else:
    raise ValueError(f"unknown pattern {pattern!r}")
  bg = np.asarray([205, 205, 200], np.float32) + rng.normal(0, 6, size=3)
  out = np.broadcast_to(bg, (size, size, 3)).copy()
  fill = np.where(second[..., None], alt, base)
  out[mask] = fill[mask]
  return np.clip(out, 0, 255).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", optimize=False)
  return buf.getvalue()


def _title(p: Mapping[str, str], rng: np.random.Generator) -> str:
  words = [p["brand"]]
  if rng.random() < 0.6:
    words.append(p["colour"])
  if p["pattern"] != "plain" and rng.random() < 0.5:
    words.append(p["pattern"])
  words.append(p["category"])
  if rng.random() < 0.3:
    words.insert(1, str(rng.choice(("classic", "new", "premium", "everyday", "original"))))
  return " ".join(words)


def _description(p: Mapping[str, str]) -> str:
  pattern = "a plain finish" if p["pattern"] == "plain" else f"a {p['pattern']} pattern"
  return f"made of {p['material']} with {pattern}"


def _query_text(q: Mapping[str, str], rng: np.random.Generator) -> str:
  """One natural phrasing of the attribute combination `q`."""
  adj = " ".join(q[a] for a in ("colour", "pattern") if a in q)
  if "category" in q:
    noun = q["category"] if rng.random() < 0.5 else _plural(q["category"])
    material = q.get("material")
    templates = [f"{adj} {material or ''} {noun}"]
    if "brand" in q:
      templates += [f"{q['brand']} {adj} {material or ''} {noun}",
                    f"{adj} {material or ''} {noun} by {q['brand']}"]
      templates = templates[1:]
    if material and "brand" not in q:
      templates.append(f"{adj} {noun} made of {material}")
    if adj and "brand" not in q and not material:
      templates.append(f"{noun} in {adj}")
    text = str(rng.choice(templates))
  else:
    parts = [q.get("brand", ""), adj, q.get("material", "")]
    text = " ".join(parts) + str(rng.choice(("", " products", " items")))
  return " ".join(text.split())


def _draw_queries(num_queries: int, rng: np.random.Generator) -> list[dict[str, str]]:
  values = {"category": CATEGORIES, "colour": tuple(COLOURS), "pattern": PATTERNS[1:],
            "brand": BRANDS, "material": MATERIALS}
  seen, out = set(), []
  tries = 0
  while len(out) < num_queries:
    tries += 1
    if tries > 100 * num_queries:
      raise ValueError(f"could not draw {num_queries} distinct queries")
    if rng.random() < 0.85:
      attrs = ["category"] + list(rng.choice(ATTRIBUTES[1:], size=rng.integers(0, 3),
                                             replace=False))
    else:
      attrs = list(rng.choice(ATTRIBUTES[1:], size=rng.integers(1, 3), replace=False))
    q = {a: str(rng.choice(values[a])) for a in attrs}
    key = tuple(sorted(q.items()))
    if key not in seen:
      seen.add(key)
      out.append(q)
  return out


def agreement_matrix(query_attrs: Sequence[Mapping[str, str]],
                     doc_attrs: Sequence[Mapping[str, str]],
                     weights: Mapping[str, float]) -> np.ndarray:
  """[Q, N] float64: Σ_{a ∈ query} weights[a] · [doc[a] == query[a]]."""
  out = np.zeros((len(query_attrs), len(doc_attrs)))
  for a, w in weights.items():
    doc_vals = np.asarray([d.get(a, "") for d in doc_attrs], object)
    for qi, q in enumerate(query_attrs):
      if a in q:
        out[qi] += w * (doc_vals == q[a])
  return out


def build_products_dataset(output: str | os.PathLike, *, num_docs: int = 2000,
                           num_queries: int = 1000, image_size: int = 32, max_position: int = 100,
                           eval_queries: int = 200, seed: int = 0, num_shards: int = 4,
                           vocab_size: int = 512) -> dict[str, Any]:
  """Builds the procedural product-search set (see the module docstring); returns its metadata."""
  if num_docs < 4 or num_queries < 5:
    raise ValueError(f"need num_docs >= 4 and num_queries >= 5, got {num_docs}, {num_queries}")
  source = {"builder": "products", "num_docs": num_docs, "num_queries": num_queries,
            "image_size": image_size, "max_position": max_position,
            "eval_queries": eval_queries, "seed": seed, "num_shards": num_shards,
            "vocab_size": vocab_size, "version": 1}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  rng = np.random.default_rng([seed, 0x9D0C])
  docs = [{"category": str(rng.choice(CATEGORIES)), "colour": str(rng.choice(tuple(COLOURS))),
           "pattern": str(rng.choice(PATTERNS)), "brand": str(rng.choice(BRANDS)),
           "material": str(rng.choice(MATERIALS))} for _ in range(num_docs)]
  images = [_png(render_product(d["category"], d["colour"], d["pattern"], size=image_size,
                                rng=rng)) for d in docs]
  titles = [_title(d, rng) for d in docs]
  descriptions = [_description(d) if rng.random() < 0.7 else "" for d in docs]
  popularity = rng.random(num_docs)
  query_attrs = _draw_queries(num_queries, rng)
  queries = [_query_text(q, rng) for q in query_attrs]
  positions = positions_from_agreement(agreement_matrix(query_attrs, docs, AGREEMENT_WEIGHTS),
                                       popularity, max_position=max_position)
  query_train, doc_train = marqo_splits(num_queries, num_docs, seed=seed)
  pairs = split_pairs(positions, query_train, doc_train, seed=seed, eval_queries=eval_queries)
  product_ids = [f"p{i:05d}" for i in range(num_docs)]
  return write_product_search_dataset(
      output, query_ids=[f"q{i:05d}" for i in range(num_queries)], queries=queries,
      product_ids=product_ids, titles=titles, descriptions=descriptions, images=images,
      image_paths=[f"{p}.png" for p in product_ids], positions=positions, pairs=pairs,
      source=source, max_position=max_position, vocab_size=vocab_size, num_shards=num_shards,
      extra={"generator": "procedural products", "image_size": image_size,
             "agreement_weights": AGREEMENT_WEIGHTS,
             "query_attributes": [dict(q) for q in query_attrs],
             "product_attributes": docs})


# --------------------------------------------------------------------------------------------
# Multi-field training batches.


def stable_id(text: str) -> int:
  """A non-negative 31-bit id of a string (same on every host and run); for duplicate masks."""
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=4).digest(),
                        "little") & 0x7FFFFFFF


def tokenize_texts(tokenizer: Any, texts: Sequence[str], max_len: int, *, pad_id: int = 0
                   ) -> np.ndarray:
  """Raw texts → [N, max_len] int32 ids with a `tokenizers.Tokenizer` (e.g. BERT WordPiece).

  Each row is the tokenizer's encoding with its special tokens ([CLS] ... [SEP]); a longer one keeps
  its first `max_len - 1` ids and its last id (the closing special token), like `pad_or_truncate`;
  the rest is `pad_id`.
  """
  return tokenizer_lib.pad_or_truncate(
      [enc.ids for enc in tokenizer.encode_batch([str(t) for t in texts])], max_len,
      pad_id=pad_id, last_id="keep")


@dataclasses.dataclass(frozen=True)
class MultiFieldBatch:
  """query_document records → the multi-field batch of the GCL task.

  Text ids come from the dataset's own tokenisation (`query_ids`, `title_ids`, `description_ids`,
  BPE of the dataset's tokenizer) or, when `text_tokenizer` is given, from tokenising the raw
  texts (`query`, `title`, `description`) with it, e.g. the WordPiece tokenizer of a pretrained
  text tower (`mmcl.pretrained.text.load_tokenizer`), padded with `pad_id`.

  Batch (b rows):
    query [b, L] int32 ids; title [b, L]; description [b, L] (when the dataset has it);
    has_title, has_description, has_image [b] bool (a field is missing when its text is empty,
      or, for images, when the dataset has none);
    image [b, S, S, 3] uint8 (the image tower normalises it with CLIP mean/std on the device;
      zeros when the dataset has no images);
    position [b] int32; score_linear, score_reciprocal [b] float32;
    query_gid, doc_gid [b] int32 (`stable_id` of query_id / product_id); index [b] int64.
  """
  max_text_len: int
  image: pipelines.ImageBatch | None
  has_description: bool
  image_size: int = 32
  text_tokenizer: Any = None
  pad_id: int = 0

  def __call__(self, source: records.ArrayRecordSource, indices: np.ndarray,
               epoch: int) -> dict[str, np.ndarray]:
    keep = lambda r: {k: v for k, v in r.items() if k != "image"}
    if self.image is not None:
      images, recs, _ = self.image.decode(source, indices, epoch, keep)
    else:
      recs = [keep(r) for r in image_text._read_rows(source, indices)]  # pylint: disable=protected-access
      images = np.zeros((len(recs), self.image_size, self.image_size, 3), np.uint8)
    return self.assemble(recs, images)

  def assemble(self, recs: Sequence[Mapping[str, Any]], images: np.ndarray
               ) -> dict[str, np.ndarray]:
    """The batch of records `recs` (fields as in the schema, without the image) whose images
    are already decoded: images [b, S, S, 3] uint8."""
    if self.text_tokenizer is None:
      pad = lambda field: tokenizer_lib.pad_or_truncate([r[f"{field}_ids"] for r in recs],
                                                        self.max_text_len)
    else:
      pad = lambda field: tokenize_texts(self.text_tokenizer, [r[field] for r in recs],
                                         self.max_text_len, pad_id=self.pad_id)
    batch = {"query": pad("query"), "title": pad("title"),
             "has_title": np.asarray([bool(r["title"].strip()) for r in recs]),
             "image": images,
             "has_image": np.full(len(recs), self.image is not None),
             "position": np.asarray([r["position"] for r in recs], np.int32),
             "score_linear": np.asarray([r["score_linear"] for r in recs], np.float32),
             "score_reciprocal": np.asarray([r["score_reciprocal"] for r in recs], np.float32),
             "query_gid": np.asarray([stable_id(r["query_id"]) for r in recs], np.int32),
             "doc_gid": np.asarray([stable_id(r["product_id"]) for r in recs], np.int32),
             "index": np.asarray([r["index"] for r in recs], np.int64)}
    if self.has_description:
      batch["description"] = pad("description")
      batch["has_description"] = np.asarray([bool(r["description"].strip()) for r in recs])
    return batch


def open_split(data_dir: str | os.PathLike, split: str, *, skip_bad_records: bool = False
               ) -> tuple[records.ArrayRecordSource, dict[str, Any]]:
  """(source, metadata) of a query_document split; errors name the key `data.dir` and the split."""
  meta = records.load_metadata(data_dir, build_hint=pipelines.BUILD_HINT)
  if meta.get("kind") != schemas.QUERY_DOCUMENT:
    raise ValueError(f"config key 'data.dir' = {data_dir}: expected a query_document dataset, "
                     f"found kind {meta.get('kind')!r}")
  if split not in meta["splits"]:
    raise ValueError(f"dataset {data_dir} has no split {split!r} (splits: "
                     f"{sorted(meta['splits'])})")
  return records.ArrayRecordSource(data_dir, split, metadata=meta, build_hint=pipelines.BUILD_HINT,
                                   skip_bad_records=skip_bad_records), meta


def batch_maker(meta: Mapping[str, Any], *, max_text_len: int, image_size: int, augment: bool,
                crop_scale: tuple[float, float], seed: int, text_tokenizer: Any = None,
                pad_id: int = 0, decode_threads: int = 1) -> MultiFieldBatch:
  """The `MultiFieldBatch` for a dataset's metadata (images and description when it has them);
  `text_tokenizer` (optional) tokenises the raw texts instead of using the stored ids;
  `decode_threads` threads decode each batch's images (the batch does not depend on it)."""
  fields = {f["name"] for f in meta["schema"]}
  image = None
  if meta.get("has_images") and "image" in fields:
    image = pipelines.ImageBatch(image_size=image_size, augment=augment,
                                 crop_scale=tuple(crop_scale), seed=seed,
                                 decode_threads=decode_threads)
  return MultiFieldBatch(max_text_len=max_text_len, image=image,
                         has_description="description_ids" in fields, image_size=image_size,
                         text_tokenizer=text_tokenizer, pad_id=pad_id)


def train_iterator(data_dir: str | os.PathLike, *, split: str, global_batch_size: int, seed: int,
                   max_text_len: int, image_size: int, augment: bool = False,
                   crop_scale: tuple[float, float] = (0.6, 1.0), process_index: int = 0,
                   process_count: int = 1, num_epochs: int | None = None,
                   worker_count: int = 0, skip_bad_records: bool = False,
                   text_tokenizer: Any = None, pad_id: int = 0):
  """Checkpointable iterator of this host's rows of the shuffled global batches (see
  `pipelines.train_dataset` for the order contract); batches as in `MultiFieldBatch`."""
  source, meta = open_split(data_dir, split, skip_bad_records=skip_bad_records)
  maker = batch_maker(meta, max_text_len=max_text_len, image_size=image_size, augment=augment,
                      crop_scale=crop_scale, seed=seed, text_tokenizer=text_tokenizer,
                      pad_id=pad_id,
                      decode_threads=image_ops.decode_threads(0, worker_count=worker_count))
  ds = pipelines.train_dataset(source, maker, global_batch_size=global_batch_size, seed=seed,
                               process_index=process_index, process_count=process_count,
                               num_epochs=num_epochs)
  return image_text.to_iterator(ds, worker_count=worker_count)


def main(argv: Sequence[str] | None = None) -> None:
  """`mmcl data build products --output DIR [...]`: builds the procedural set."""
  p = argparse.ArgumentParser(prog="mmcl data build products", description=main.__doc__)
  p.add_argument("--output", required=True)
  p.add_argument("--num_docs", type=int, default=2000)
  p.add_argument("--num_queries", type=int, default=1000)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--eval_queries", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  meta = build_products_dataset(args.output, num_docs=args.num_docs, num_queries=args.num_queries,
                                image_size=args.image_size, eval_queries=args.eval_queries,
                                seed=args.seed)
  counts = {k: v["num_examples"] for k, v in meta["splits"].items()}
  print(f"products dataset in {args.output}: rows {counts}, queries {meta['num_queries']}, "
        f"documents {meta['num_documents']}")


if __name__ == "__main__":
  main()
