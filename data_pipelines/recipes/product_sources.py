"""Product-search rows (the GCL task's data) held as webdataset shards, a tfds build or parquet
files (config `data.source`), one source per split, read without a conversion step.

`data.source` names every split at once: `{split}` stands for the split's name (data.train_split,
data.val_split, each of task.eval_splits), substituted before brace ranges and globs expand:

  parquet:data/products_pq/{split}/*.parquet
  webdataset:data/products_wds/{split}/{00000..00003}.tar
  tfds:products:{split}@data/tfds                (an ArrayRecord tfds build with one split each)

A row is one (query, document) pair of the query_document schema (`schemas.query_document_schema`
plus `description`): query_id, query, product_id, title, description, image, position,
score_linear, score_reciprocal. Config keys `data.columns.<field>` name the member, column or
feature that holds each field (webdataset: a member extension such as `jpg`, or a key of the JSON
member `data.json_member`); alternatives are separated by ';'. Only the fields the task uses are
read: description and image only when model.doc_fields names them. A missing column is one line
naming the file and the config key; a row with a missing member or a value of the wrong kind is a
`BadRecordError` naming the file, the row and the field, or with data.skip_bad_records a counted
skip (`records.skip_ledger`).

Training streams the training split under `data_pipelines.sources.stream`'s order contract
(whole shards per host, a seeded windowed shuffle, exact resume from the iterator state, worker
processes with data.worker_count); images are decoded and augmented per (seed, epoch, key hash)
by `pairs.decode_images` (a bad image takes the next good row of the batch); texts are tokenised
on the fly by the dataset tokenizer `data.tokenizer`, by a BPE tokenizer trained on the training
split's distinct queries, titles and descriptions (cached in data.cache_dir), or by a pretrained
text tower's own tokenizer. Rows hold the same fields in every format, so the same rows through
two formats give the same batches.

A product-search ArrayRecord set (`mmcl data build products` / `fashion-search`, the marqo-gs
converter) is written in each format, one folder per split, by

  mmcl data build product-rows --input data/products --format parquet --output data/products_pq

Evaluation and export read a split whole, in its natural order, into memory (`SplitRows`, the
part of `records.ArrayRecordSource` the evaluator uses): a split's table of distinct queries and
documents needs every row, and documents are then embedded from their first row, by random access.
Image bytes are kept once per product.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.recipes import products
from data_pipelines.sources import columns as columns_lib
from data_pipelines.sources import pairs
from data_pipelines.sources import parquet as parquet_lib
from data_pipelines.sources import spec as spec_lib
from data_pipelines.sources import stream
from data_pipelines.sources import tfds as tfds_lib
from data_pipelines.sources import webdataset as wds_lib

SPLIT_PLACEHOLDER = "{split}"
# field -> kind (`columns.KINDS`) of a row.
FIELD_KINDS = {"query_id": "text", "query": "text", "product_id": "text", "title": "text",
               "description": "text", "image": "image", "position": "int",
               "score_linear": "float", "score_reciprocal": "float"}
OPTIONAL_FIELDS = ("description", "image")  # read only when model.doc_fields names them
DEFAULT_IMAGE_NAMES = {"webdataset": "jpg;jpeg;png;webp", "parquet": "image", "tfds": "image"}

# key -> (default, doc): the `data` keys of a task reading product-search rows from a source.
CONFIG_KEYS: dict[str, tuple[Any, str]] = {
    "source": ("", "where the rows come from: '' = arrayrecord:<data.dir>; else "
                   "webdataset:PATTERN | tfds:NAME[/CONFIG]:{split}@DATA_DIR | parquet:GLOB, "
                   "with {split} where the split's name goes (e.g. "
                   "parquet:/d/{split}/*.parquet; brace ranges and globs expand after it)"),
    "json_member": ("json", "webdataset: the member whose JSON object holds the fields that "
                            "are not members themselves ('' = none)"),
    "key_field": ("", "parquet column identifying a row ('' = 'key' if the files have it, else "
                      "<file name>/<row>); webdataset keys are member names, tfds keys "
                      "<split>/<index>"),
    "tokenizer": ("", "tokenizer.json for the texts of a webdataset/tfds/parquet source ('' = "
                      "train a BPE tokenizer on the training split's texts and cache it in "
                      "data.cache_dir); unused with a pretrained text tower"),
    "vocab_size": (2048, "vocabulary budget of a tokenizer trained from the source"),
    "tokenizer_texts": (100_000, "distinct texts (queries, titles, descriptions, natural "
                                 "order) a tokenizer is trained on"),
    "shuffle_buffer": (1000, "streamed sources: window of consecutive rows shuffled together "
                             "(besides the per-epoch shard order)"),
    "cache_dir": ("", "where tokenizers trained from a source are kept ('' = "
                      "$XDG_CACHE_HOME/mmcl or ~/.cache/mmcl)"),
}


def define_config(data: Any) -> None:
  """Declares CONFIG_KEYS and the section `columns` (one key per row field) on an `mmcl.config`
  data section (keys already there are kept)."""
  for key, (default, doc) in CONFIG_KEYS.items():
    if key not in data:
      data.define(key, default, doc)
  cols = data.section("columns", "member / column / feature holding each row field in a "
                      "webdataset/tfds/parquet data.source (';' separates alternatives)")
  for field, kind in FIELD_KINDS.items():
    if field == "image":
      cols.define(field, "", "encoded image ('' = webdataset jpg;jpeg;png;webp, parquet and tfds "
                  "'image'; read when model.doc_fields names image)")
    else:
      note = " (read when model.doc_fields names it)" if field in OPTIONAL_FIELDS else ""
      cols.define(field, field, f"{field} ({kind}){note}")


def split_spec(source: str, split: str) -> spec_lib.SourceSpec:
  """The source of one split: `source` with {split} replaced by `split`."""
  if SPLIT_PLACEHOLDER not in source:
    raise spec_lib.SourceConfigError(
        f"data source {source!r}: product-search rows come in splits ({', '.join(products.SPLITS)}"
        f"); write {SPLIT_PLACEHOLDER} where the split's name goes, e.g. "
        f"parquet:/d/{SPLIT_PLACEHOLDER}/*.parquet")
  return spec_lib.parse(source.replace(SPLIT_PLACEHOLDER, split))


def open_reader(spec: spec_lib.SourceSpec, columns: Sequence[columns_lib.Column], *,
                json_member: str = "", key_field: str = "") -> Any:
  """A `stream.ShardReader` of `spec` yielding {field: value, ..., key} per row."""
  if spec.scheme in ("webdataset", "tfds") and key_field:
    raise spec_lib.SourceConfigError(
        f"data source {spec}: {spec.scheme} rows are keyed by "
        f"{'their member names' if spec.scheme == 'webdataset' else '<split>/<index>'}; config "
        f"key data.key_field must be empty (got {key_field!r})")
  if spec.scheme == "webdataset":
    return wds_lib.WebDatasetShards(spec_lib.expand_files(spec), columns=columns,
                                    json_member=json_member)
  if spec.scheme == "parquet":
    return parquet_lib.ParquetShards(spec_lib.expand_files(spec), columns=columns,
                                     key_column=key_field)
  if spec.scheme == "tfds":
    return tfds_lib.TfdsShards(tfds_lib.TfdsRecords(spec, columns=columns))
  raise spec_lib.SourceConfigError(f"data source {spec}: {spec.scheme} datasets are read by "
                                   "data_pipelines.records, not here")


def with_ids(rows: Sequence[dict], tokenizer: tokenizer_lib.TextTokenizer | None,
             text_fields: Sequence[str]) -> list[dict]:
  """The rows with `<field>_ids` (unpadded BPE ids, as the dataset builders store them) added
  for each of `text_fields`; the rows themselves when `tokenizer` is None."""
  if tokenizer is None:
    return list(rows)
  ids = {f: tokenizer.encode_unpadded([r[f] for r in rows]) for f in text_fields}
  return [dict(r, **{f"{f}_ids": np.asarray(ids[f][i], np.int32) for f in text_fields})
          for i, r in enumerate(rows)]


class SplitRows:
  """A split's rows in memory, in natural order, with the part of `records.ArrayRecordSource`'s
  interface that the GCL evaluator and exporter use (`len`, `read_many`, `bad_record`, `split`,
  `metadata`, `close`). Row i carries `index` = i."""

  def __init__(self, rows: list[dict], *, split: str, metadata: Mapping[str, Any], name: str,
               skip_bad_records: bool):
    self._rows, self.split, self.metadata, self.name = rows, split, dict(metadata), name
    self.skip_bad_records = skip_bad_records

  def __len__(self) -> int:
    return len(self._rows)

  def __repr__(self) -> str:
    return f"SplitRows({self.name}, {len(self._rows)} rows)"

  def read_many(self, indices: Sequence[int]) -> list[dict]:
    return [dict(self._rows[int(i)]) for i in indices]

  def bad_record(self, index: int, field: str, reason: str) -> None:
    """Raises (or counts, with skip_bad_records) the bad `field` of row `index`."""
    row = self._rows[int(index)]
    stream.handle_bad(spec_lib.BadRecordError(
        path=row["path"], key=row["key"], position=row["record"], field=field, reason=reason,
        split=self.split), self.skip_bad_records)

  def close(self) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class StreamedRowsBatch:
  """Raw streamed rows → the `products.MultiFieldBatch` batch (images through
  `pairs.decode_images` with the maker's image settings, per row epoch and key hash)."""
  maker: products.MultiFieldBatch
  tokenizer: tokenizer_lib.TextTokenizer | None
  text_fields: tuple[str, ...]
  skip_bad_records: bool = False

  def __call__(self, records: Sequence[dict]) -> dict[str, np.ndarray]:
    image = self.maker.image
    if image is not None:
      images, source_row = pairs.decode_images(
          records, image_size=image.image_size, augment=image.augment,
          crop_scale=tuple(image.crop_scale), seed=image.seed,
          skip_bad_records=self.skip_bad_records)
    else:
      s = self.maker.image_size
      images, source_row = np.zeros((len(records), s, s, 3), np.uint8), np.arange(len(records))
    rows = [records[k] for k in source_row.tolist()]
    return self.maker.assemble(with_ids(rows, self.tokenizer, self.text_fields), images)


class ProductSplits:
  """The splits of a product-search set in a webdataset/tfds/parquet `data.source`.

  Args:
    source: the spec with {split} (module docstring).
    doc_fields: the document fields the task fuses (decides whether image and description are
      read).
    columns: field -> the source's names for it ('' = the default: the field's own name; for
      the image, webdataset jpg;jpeg;png;webp and parquet / tfds 'image').
    json_member, key_field, skip_bad_records: as the config keys data.json_member,
      data.key_field, data.skip_bad_records.
  """

  def __init__(self, source: str, *, doc_fields: Sequence[str],
               columns: Mapping[str, str] | None = None, json_member: str = "json",
               key_field: str = "", skip_bad_records: bool = False):
    self.source = source
    self.scheme = spec_lib.parse(source).scheme
    split_spec(source, products.SPLITS[0])  # {split} present
    if self.scheme == "arrayrecord":
      raise spec_lib.SourceConfigError(f"data source {source!r}: ArrayRecord datasets are read by "
                                       "data_pipelines.records, not as streamed splits")
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELD_KINDS))
    if unknown:
      raise spec_lib.SourceConfigError(f"data.columns: unknown field(s) {unknown}; the fields are "
                                       f"{list(FIELD_KINDS)}")
    self.fields = tuple(f for f in FIELD_KINDS if f not in OPTIONAL_FIELDS or f in doc_fields)
    self.columns = tuple(columns_lib.Column(
        f, tuple(n for n in (columns.get(f) or (DEFAULT_IMAGE_NAMES[self.scheme] if f == "image"
                                                else f)).split(";") if n),
        FIELD_KINDS[f], f"data.columns.{f}") for f in self.fields)
    self.json_member, self.key_field = json_member, key_field
    self.skip_bad_records = skip_bad_records
    self._readers: dict[tuple[str, bool], Any] = {}

  @property
  def has_images(self) -> bool:
    return "image" in self.fields

  @property
  def text_fields(self) -> tuple[str, ...]:
    return ("query", "title") + (("description",) if "description" in self.fields else ())

  def spec(self, split: str) -> spec_lib.SourceSpec:
    return split_spec(self.source, split)

  def reader(self, split: str, *, with_images: bool = True) -> Any:
    """The split's reader (all fields, or without the image for reading texts only)."""
    key = (split, with_images and self.has_images)
    if key not in self._readers:
      cols = [c for c in self.columns if key[1] or c.kind != "image"]
      self._readers[key] = open_reader(self.spec(split), cols, json_member=self.json_member,
                                       key_field=self.key_field)
    return self._readers[key]

  def fingerprint(self, split: str) -> str:
    """Changes when the split's files (names, sizes, modification times) or columns change."""
    reader = self.reader(split, with_images=False)
    files = reader.files if not isinstance(reader, tfds_lib.TfdsShards) else [
        str(p) for p in pathlib.Path(reader.records.path).iterdir()]
    parts = [str(self.spec(split)), repr(self.columns), self.json_member, self.key_field]
    for f in sorted(files):
      st = os.stat(f)
      parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()

  def texts(self, split: str, limit: int) -> list[str]:
    """Up to `limit` texts of the split in natural order: each query once (by query_id), each
    product's title and non-empty description once (by product_id)."""
    out: list[str] = []
    queries, docs = set(), set()
    for rec in stream.natural_records(self.reader(split, with_images=False),
                                      skip_bad_records=self.skip_bad_records):
      if rec["query_id"] not in queries:
        queries.add(rec["query_id"])
        out.append(rec["query"])
      if rec["product_id"] not in docs:
        docs.add(rec["product_id"])
        out.append(rec["title"])
        if rec.get("description"):
          out.append(rec["description"])
      if len(out) >= limit:
        return out[:limit]
    return out

  def tokenizer(self, split: str, *, path: str = "", vocab_size: int = 2048,
                num_texts: int = 100_000, cache_dir: str = ""
                ) -> tuple[tokenizer_lib.TextTokenizer, pathlib.Path]:
    """(tokenizer, its file): `path` when given, else one trained on `texts(split, num_texts)`
    (`pairs.cached_tokenizer`)."""
    if path:
      return tokenizer_lib.TextTokenizer.load(path), pathlib.Path(path)
    return pairs.cached_tokenizer(
        ["product-search texts", self.fingerprint(split), num_texts],
        lambda: self.texts(split, num_texts), vocab_size=vocab_size, cache_dir=cache_dir or None,
        what=f"texts in split {split!r} of data source {self.source!r}")

  def metadata(self, tokenizer: tokenizer_lib.TextTokenizer | None,
               tokenizer_path: pathlib.Path | None) -> dict[str, Any]:
    """What `products.batch_maker` and the task read of a dataset's metadata."""
    names = list(self.fields) + [f"{f}_ids" for f in self.text_fields]
    meta: dict[str, Any] = {"kind": "query_document", "schema": [{"name": n} for n in names],
                            "has_images": self.has_images, "source": self.source,
                            "special_token_ids": {"pad": tokenizer_lib.PAD_ID,
                                                  "unk": tokenizer_lib.UNK_ID,
                                                  "bos": tokenizer_lib.BOS_ID,
                                                  "eos": tokenizer_lib.EOS_ID}}
    if tokenizer is not None:
      meta.update(vocab_size=tokenizer.vocab_size, tokenizer=str(tokenizer_path))
    return meta

  def rows(self, split: str, *, tokenizer: tokenizer_lib.TextTokenizer | None,
           metadata: Mapping[str, Any]) -> SplitRows:
    """The whole split in memory (`SplitRows`), texts tokenised when `tokenizer` is given."""
    rows: list[dict] = []
    images: dict[str, bytes] = {}
    for rec in stream.natural_records(self.reader(split), skip_bad_records=self.skip_bad_records):
      if "image" in rec:  # one copy of a product's image
        rec["image"] = images.setdefault(rec["product_id"], rec["image"])
      rec.setdefault("description", "")
      rec["index"] = len(rows)
      rows.append(rec)
    return SplitRows(with_ids(rows, tokenizer, self.text_fields), split=split, metadata=metadata,
                     name=str(self.spec(split)), skip_bad_records=self.skip_bad_records)

  def train_dataset(self, split: str, *, maker: products.MultiFieldBatch,
                    tokenizer: tokenizer_lib.TextTokenizer | None, global_batch_size: int,
                    seed: int, shuffle_buffer: int, process_index: int = 0,
                    process_count: int = 1, num_epochs: int | None = None) -> grain.IterDataset:
    """This host's batches of the split under `stream`'s order contract."""
    if global_batch_size % process_count:
      raise spec_lib.SourceConfigError(f"config key data.global_batch_size ({global_batch_size}) "
                                       f"must be divisible by the {process_count} processes")
    options = stream.StreamOptions(
        batch_size=global_batch_size // process_count, seed=seed, process_index=process_index,
        process_count=process_count, shuffle_buffer=shuffle_buffer, num_epochs=num_epochs,
        skip_bad_records=self.skip_bad_records)
    return stream.StreamedBatches(self.reader(split), options).map(StreamedRowsBatch(
        maker=maker, tokenizer=tokenizer, text_fields=self.text_fields,
        skip_bad_records=self.skip_bad_records))

  def train_iterator(self, split: str, *, worker_count: int = 0, num_threads: int = 2,
                     prefetch_buffer_size: int = 4, **kwargs) -> grain.DatasetIterator:
    """`train_dataset`'s batches as a checkpointable iterator; `worker_count` grain worker
    processes decode them (same batches, same order)."""
    return pairs.to_iterator(self.train_dataset(split, **kwargs), num_threads=num_threads,
                             prefetch_buffer_size=prefetch_buffer_size, worker_count=worker_count)


def export_rows(data_dir: str | os.PathLike, split: str) -> list[dict]:
  """The rows of a split of a query_document ArrayRecord dataset (the product-search builders'
  output), in record order, with the fields of FIELD_KINDS and `key` = `<split>-<record>`: what
  `write_rows` writes to the other formats."""
  source, _ = products.open_split(data_dir, split)
  try:
    recs = source.read_many(list(range(len(source))))
  finally:
    source.close()
  out = []
  for i, r in enumerate(recs):
    row = {f: r[f] for f in FIELD_KINDS if f in r}
    row.setdefault("description", "")
    row["key"] = f"{split}-{i:07d}"
    out.append(row)
  return out


def write_rows(rows: Sequence[Mapping[str, Any]], folder: str | os.PathLike, *, fmt: str,
               per_shard: int = 1000, tfds_name: str = "product_rows",
               split_name: str = "train") -> list[str]:
  """Writes product-search rows with the format's own writer (`sources.write`): webdataset
  samples {key}.jpg (or .png, by the image's bytes) + {key}.json (the other fields); parquet
  and tfds columns / features named as the fields (tfds: split `split_name`). Returns the files
  written (tfds: the build folder)."""
  from data_pipelines.sources import write  # pylint: disable=g-import-not-at-top
  if fmt == "webdataset":
    samples = []
    for r in rows:
      sample = {"__key__": r["key"], "json": json.dumps(
          {k: v for k, v in r.items() if k not in ("image", "key")}).encode()}
      if r.get("image"):
        sample["png" if r["image"].startswith(b"\x89PNG") else "jpg"] = r["image"]
      samples.append(sample)
    return write.write_webdataset_samples(samples, folder, per_shard=per_shard)
  if fmt == "parquet":
    return write.write_parquet_rows(rows, folder, per_file=per_shard)
  if fmt == "tfds":
    return [str(write.write_tfds_rows({split_name: rows}, folder, name=tfds_name,
                                      kinds={**FIELD_KINDS, "key": "text"}))]
  raise ValueError(f"write_rows: format must be webdataset, parquet or tfds, got {fmt!r}")


def main(argv: Sequence[str] | None = None) -> None:
  """`mmcl data build product-rows --input DIR --format F --output OUT`: writes every split of a
  product-search ArrayRecord set as OUT/<split>/ in format F (webdataset, parquet or tfds: one
  build `product_rows` in OUT), ready for data.source (the spec is printed)."""
  p = argparse.ArgumentParser(prog="mmcl data build product-rows", description=main.__doc__)
  p.add_argument("--input", required=True, help="a query_document ArrayRecord dataset")
  p.add_argument("--format", required=True, choices=("webdataset", "parquet", "tfds"))
  p.add_argument("--output", required=True)
  p.add_argument("--per_shard", type=int, default=1000, help="rows per shard / file")
  args = p.parse_args(argv)
  out = pathlib.Path(args.output)
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"--output {out} is not empty; rows are written into a new folder")
  splits = list(products.open_split(args.input, products.SPLITS[0])[1]["splits"])
  rows = {s: export_rows(args.input, s) for s in splits}
  if args.format == "tfds":
    from data_pipelines.sources import write  # pylint: disable=g-import-not-at-top
    write.write_tfds_rows(rows, out, name="product_rows", kinds={**FIELD_KINDS, "key": "text"})
    spec = f"tfds:product_rows:{{split}}@{out}"
  else:
    for split, split_rows in rows.items():
      write_rows(split_rows, out / split, fmt=args.format, per_shard=args.per_shard)
    spec = (f"webdataset:{out}/{{split}}/*.tar" if args.format == "webdataset"
            else f"parquet:{out}/{{split}}/*.parquet")
  print(f"{sum(map(len, rows.values()))} rows of splits {splits} in {out}; train with "
        f"--set data.source='{spec}' --set data.tokenizer={pathlib.Path(args.input)}/"
        f"tokenizer.json")
