"""A product-search set with graded relevance built from real product photos: the 3,221-product
fashion subset in ../shared/data/fashion-product-images (Myntra / Kaggle; see its SOURCE.md).

  mmcl data build fashion-search --input ../shared/data/fashion-product-images \
      --output data/fashion_search

Construction (all draws from one seed; same Marqo-GS layout and splits as
`data_pipelines.recipes.products`, so the GCL task and the marqo-gs converter's readers take it as is):

  * Documents: every product of `styles.csv`. Fields: `title` = productDisplayName, `image` =
    the product photo re-encoded as a `image_size` px (default 64) JPEG (quality 90; the
    originals are 224 px, the towers here read 64 px, and a row per (query, product) pair would
    otherwise copy 6 KB per row), `description` ("other text") = "{subCategory}, {usage} wear,
    {season} {year} collection" (the attributes the title usually lacks).
  * Queries: attribute combinations that occur in the catalogue, one per combination, over the
    attribute sets (articleType), (gender, articleType), (baseColour, articleType),
    (gender, baseColour, articleType), (usage, articleType), (season, articleType),
    (gender, usage, articleType), (gender, baseColour); a combination is kept when at least
    `min_matches` (2) products have all its values. Up to `num_queries` (1,000) are drawn, each
    phrased by one template drawn at random ("navy blue shirts for men", "women's casual heels",
    "black watches", "t-shirts for summer", ...).
  * Graded relevance from attribute agreement: agreement(q, d) = Σ over the query's attributes of
    articleType 4 (or 2 when only the subCategory agrees, e.g. "sports shoes" for "casual shoes"),
    gender 2 (1 for a unisex product when the query names men / women), baseColour 2 (1 when the
    colour family agrees, e.g. navy blue / blue), usage 1, season 1. The 100 products with the
    largest positive agreement get positions 1..100, ties broken by a seeded per-product
    popularity draw; score_linear / score_reciprocal follow from positions as in Marqo-GS.
  * Splits: 80/20 queries, 50/50 products; train, in_domain, novel_query, novel_document,
    zero_shot exactly as `products.split_pairs` (up to `eval_queries` (200) queries per
    evaluation split).
  * Quirks kept: 23 pairs of products share a byte-identical photo (catalogue variants); they are
    distinct documents, so a query may rank either first.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from data_pipelines.recipes import products
from data_pipelines.converters import common

ATTRIBUTE_SETS = (("articleType",), ("gender", "articleType"), ("baseColour", "articleType"),
                  ("gender", "baseColour", "articleType"), ("usage", "articleType"),
                  ("season", "articleType"), ("gender", "usage", "articleType"),
                  ("gender", "baseColour"))
COLUMNS = ("id", "gender", "masterCategory", "subCategory", "articleType", "baseColour", "season",
           "year", "usage", "productDisplayName")
_ARTICLE_NAMES = {"Tshirts": "t-shirts", "Tops": "tops", "Kurtas": "kurtas", "Jeans": "jeans",
                  "Track Pants": "track pants", "Flip Flops": "flip flops"}
_GENDER_WORDS = {"Men": ("men", "men's"), "Women": ("women", "women's"), "Boys": ("boys", "boys'"),
                 "Girls": ("girls", "girls'"), "Unisex": ("unisex", "unisex")}
# Colour families: partial credit when the family agrees (e.g. navy blue vs blue).
_COLOUR_FAMILY = {"Navy Blue": "Blue", "Teal": "Blue", "Turquoise Blue": "Blue", "Blue": "Blue",
                  "Grey": "Grey", "Grey Melange": "Grey", "Charcoal": "Grey", "Steel": "Grey",
                  "Silver": "Grey", "Red": "Red", "Maroon": "Red", "Rust": "Red", "Brown": "Brown",
                  "Coffee Brown": "Brown", "Tan": "Brown", "Khaki": "Brown", "Beige": "Brown",
                  "Cream": "White", "Off White": "White", "White": "White", "Pink": "Pink",
                  "Peach": "Pink", "Magenta": "Pink", "Green": "Green", "Olive": "Green",
                  "Sea Green": "Green", "Lime Green": "Green", "Fluorescent Green": "Green",
                  "Yellow": "Yellow", "Mustard": "Yellow", "Gold": "Yellow", "Orange": "Orange",
                  "Purple": "Purple", "Lavender": "Purple", "Black": "Black"}


def read_styles(folder: str | os.PathLike) -> list[dict[str, str]]:
  """The rows of `folder/styles.csv` whose image `folder/images/<id>.jpg` exists."""
  folder = pathlib.Path(folder)
  path = common.require_file(folder / "styles.csv", "the fashion styles.csv")
  rows = []
  for line, row in common.read_table(path):
    for col in COLUMNS:
      common.get_field(row, col, path, line)
    if not row["id"].strip().isdigit():
      raise common.ConversionError(path, line, "id", f"expected an integer id, found {row['id']!r}")
    if (folder / "images" / f"{row['id']}.jpg").is_file():
      rows.append({k: row[k].strip() for k in COLUMNS})
  if not rows:
    raise common.ConversionError(path, None, None, f"no row has an image in {folder / 'images'}")
  return rows


def article_name(article_type: str) -> str:
  return _ARTICLE_NAMES.get(article_type, article_type.lower())


def phrase(query: Mapping[str, str], rng: np.random.Generator) -> str:
  """One natural phrasing of an attribute combination (keys of ATTRIBUTE_SETS)."""
  article = article_name(query["articleType"]) if "articleType" in query else "items"
  colour = query.get("baseColour", "").lower()
  usage = query.get("usage", "").lower()
  season = query.get("season", "").lower()
  noun = " ".join(w for w in (colour, usage, article) if w)
  templates = [noun]
  if "gender" in query:
    plain, possessive = _GENDER_WORDS.get(query["gender"], (query["gender"].lower(),) * 2)
    templates = [f"{noun} for {plain}", f"{possessive} {noun}", f"{plain} {noun}"]
  if season:
    templates = [f"{article} for {season}", f"{season} {article}"]
  if usage and "gender" not in query:
    templates.append(f"{article} for {usage} wear")
  return " ".join(str(rng.choice(templates)).split())


def query_combinations(styles: Sequence[Mapping[str, str]], *, min_matches: int
                       ) -> list[dict[str, str]]:
  """Attribute combinations (over ATTRIBUTE_SETS) held by at least `min_matches` products."""
  counts: dict[tuple, int] = {}
  for s in styles:
    for attrs in ATTRIBUTE_SETS:
      if all(s[a] for a in attrs):
        key = tuple((a, s[a]) for a in attrs)
        counts[key] = counts.get(key, 0) + 1
  return [dict(k) for k, n in sorted(counts.items()) if n >= min_matches]


def agreement_matrix(queries: Sequence[Mapping[str, str]],
                     styles: Sequence[Mapping[str, str]]) -> np.ndarray:
  """[Q, N] float64 graded attribute agreement (weights in the module docstring)."""
  col = lambda key, fn=lambda v: v: np.asarray([fn(s[key]) for s in styles], object)
  article, sub = col("articleType"), col("subCategory")
  gender, colour = col("gender"), col("baseColour")
  family = col("baseColour", lambda v: _COLOUR_FAMILY.get(v, v))
  usage, season = col("usage"), col("season")
  sub_of = {s["articleType"]: s["subCategory"] for s in styles}
  out = np.zeros((len(queries), len(styles)))
  for i, q in enumerate(queries):
    if "articleType" in q:
      exact = article == q["articleType"]
      out[i] += np.where(exact, 4.0, np.where(sub == sub_of[q["articleType"]], 2.0, 0.0))
    if "gender" in q:
      unisex = (gender == "Unisex") & (q["gender"] in ("Men", "Women"))
      out[i] += np.where(gender == q["gender"], 2.0, np.where(unisex, 1.0, 0.0))
    if "baseColour" in q:
      fam = _COLOUR_FAMILY.get(q["baseColour"], q["baseColour"])
      out[i] += np.where(colour == q["baseColour"], 2.0, np.where(family == fam, 1.0, 0.0))
    if "usage" in q:
      out[i] += usage == q["usage"]
    if "season" in q:
      out[i] += season == q["season"]
  return out


def _small_jpeg(path: pathlib.Path, size: int) -> bytes:
  with Image.open(path) as im:
    im = im.convert("RGB")
    w, h = im.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
    small = im.resize((size, size), Image.Resampling.LANCZOS, box=box)
  buf = io.BytesIO()
  small.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def build_fashion_search_dataset(input: str | os.PathLike, output: str | os.PathLike, *,
                                 num_queries: int = 1000, min_matches: int = 2,
                                 max_position: int = 100, eval_queries: int = 200,
                                 image_size: int = 64, seed: int = 0, num_shards: int = 4,
                                 vocab_size: int = 2048) -> dict[str, Any]:
  """Builds the fashion product-search set (see the module docstring); returns its metadata."""
  folder = pathlib.Path(input)
  styles_path = common.require_file(folder / "styles.csv", "the fashion styles.csv")
  source = {"builder": "fashion_search", "input": str(folder),
            "styles_sha256": common.input_digest([styles_path])[str(styles_path)],
            "num_queries": num_queries, "min_matches": min_matches, "max_position": max_position,
            "eval_queries": eval_queries, "image_size": image_size, "seed": seed,
            "num_shards": num_shards, "vocab_size": vocab_size, "version": 2}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  styles = read_styles(folder)
  rng = np.random.default_rng([seed, 0xFA5])
  combos = query_combinations(styles, min_matches=min_matches)
  chosen = np.sort(rng.permutation(len(combos))[:num_queries])
  query_attrs = [combos[i] for i in chosen]
  queries = [phrase(q, rng) for q in query_attrs]
  popularity = rng.random(len(styles))
  positions = products.positions_from_agreement(agreement_matrix(query_attrs, styles),
                                                popularity, max_position=max_position)
  query_train, doc_train = products.marqo_splits(len(queries), len(styles), seed=seed)
  pairs = products.split_pairs(positions, query_train, doc_train, seed=seed,
                               eval_queries=eval_queries)
  images = [_small_jpeg(folder / "images" / f"{s['id']}.jpg", image_size) for s in styles]
  descriptions = [", ".join(p for p in (s["subCategory"], f"{s['usage']} wear" if s["usage"]
                                        else "", f"{s['season']} {s['year']} collection".strip())
                            if p) for s in styles]
  return products.write_product_search_dataset(
      output, query_ids=[f"fq{i:05d}" for i in range(len(queries))], queries=queries,
      product_ids=[s["id"] for s in styles], titles=[s["productDisplayName"] for s in styles],
      descriptions=descriptions, images=images,
      image_paths=[f"images/{s['id']}.jpg" for s in styles], positions=positions, pairs=pairs,
      source=source, max_position=max_position, vocab_size=vocab_size, num_shards=num_shards,
      extra={"generator": "fashion product search", "image_size": image_size,
             "num_combinations": len(combos), "query_attributes": query_attrs})


def main(argv: Sequence[str] | None = None) -> None:
  """`mmcl data build fashion-search --input DIR --output DIR`."""
  p = argparse.ArgumentParser(prog="mmcl data build fashion-search", description=main.__doc__)
  p.add_argument("--input", required=True, help="the fashion-product-images folder")
  p.add_argument("--output", required=True)
  p.add_argument("--num_queries", type=int, default=1000)
  p.add_argument("--eval_queries", type=int, default=200)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  meta = build_fashion_search_dataset(args.input, args.output, num_queries=args.num_queries,
                                      eval_queries=args.eval_queries,
                                      image_size=args.image_size, seed=args.seed)
  counts = {k: v["num_examples"] for k, v in meta["splits"].items()}
  print(f"fashion search dataset in {args.output}: rows {counts}, queries "
        f"{meta['num_queries']}, documents {meta['num_documents']}, "
        f"{meta['num_combinations']} attribute combinations")


if __name__ == "__main__":
  main()
