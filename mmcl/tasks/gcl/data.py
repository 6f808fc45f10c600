"""GCL's data: the product-search rows named by `data.source` — a query_document ArrayRecord
dataset (`arrayrecord:DIR`, the default `data.dir`: its splits, stored token ids and tokenizer) or
the same rows as webdataset shards, a tfds build or parquet files, one source per split named by
`{split}` in the spec (`data_pipelines.recipes.product_sources`) — and the batches the task
trains and evaluates on (`data_pipelines.recipes.products.MultiFieldBatch`)."""

from __future__ import annotations

import pathlib

from data_pipelines import sources as sources_lib
from data_pipelines.recipes import product_sources
from data_pipelines.recipes import products as data_lib
from mmcl.config import Config, ConfigError


class ProductData:
  """The rows of `config.data` for the document fields `fields`.

  Attributes: data_dir (the ArrayRecord dataset, None for a streamed source), name (how errors
  name the data), metadata (the dataset's, or the streamed splits' own), streamed
  (`product_sources.ProductSplits` or None), bpe / tokenizer_file (a streamed source's BPE
  tokenizer, set by `train_tokenizer`).
  """

  def __init__(self, d: Config, fields: tuple[str, ...]):
    self.streamed, self.bpe, self.tokenizer_file = None, None, None
    try:
      spec = sources_lib.parse(d.source) if d.source else None
      if spec is not None and spec.scheme != "arrayrecord":
        self.data_dir, self.name = None, d.source
        self.streamed = product_sources.ProductSplits(
            d.source, doc_fields=fields,
            columns={f: getattr(d.columns, f) for f in product_sources.FIELD_KINDS},
            json_member=d.json_member, key_field=d.key_field,
            skip_bad_records=d.skip_bad_records)
        self.metadata = self.streamed.metadata(None, None)
        return
    except sources_lib.SourceConfigError as e:
      raise ConfigError(f"config key 'data.source' = {d.source!r}: {e}") from None
    self.data_dir = pathlib.Path(spec.location if spec is not None else d.dir)
    self.name = str(self.data_dir)
    source, self.metadata = data_lib.open_split(self.data_dir, d.train_split)
    source.close()

  def train_tokenizer(self, d: Config) -> None:
    """A streamed source: the BPE tokenizer of `data.tokenizer`, or one trained on the training
    split's texts (cached under `data.cache_dir`); the metadata then holds its vocabulary."""
    if self.streamed is None:
      return
    try:
      self.bpe, self.tokenizer_file = self.streamed.tokenizer(
          d.train_split, path=d.tokenizer, vocab_size=d.vocab_size, num_texts=d.tokenizer_texts,
          cache_dir=d.cache_dir)
    except sources_lib.SourceConfigError as e:
      raise ConfigError(f"config key 'data.source' = {d.source!r}: {e}") from None
    self.metadata = self.streamed.metadata(self.bpe, self.tokenizer_file)

  def tokenizer_path(self) -> pathlib.Path | str:
    """The tokenizer file of the stored token ids (for export)."""
    if self.streamed is not None:
      return self.tokenizer_file
    return self.data_dir / self.metadata.get("tokenizer", "tokenizer.json")

  def open_split(self, split: str, *, skip_bad_records: bool = False):
    """A split's records: the ArrayRecord split, or a streamed split read into memory."""
    if self.streamed is None:
      return data_lib.open_split(self.data_dir, split, skip_bad_records=skip_bad_records)[0]
    return self.streamed.rows(split, tokenizer=self.bpe, metadata=self.metadata)

  def iterator(self, c: Config, split: str, process_index: int, process_count: int, *,
               train: bool, text_tokenizer=None, pad_id: int = 0):
    """Batches of `split` for this host: augmented and repeated for `data.num_epochs` when
    `train`, else one un-augmented pass; `text_tokenizer` / `pad_id`: a pretrained text tower's
    tokenizer of the raw texts (None: the stored token ids)."""
    if self.streamed is not None:
      maker = data_lib.batch_maker(self.metadata, max_text_len=c.data.max_text_len,
                                   image_size=c.data.image_size,
                                   augment=train and c.data.augment,
                                   crop_scale=tuple(c.data.crop_scale), seed=c.seed,
                                   text_tokenizer=text_tokenizer, pad_id=pad_id)
      return self.streamed.train_iterator(
          split, maker=maker, tokenizer=self.bpe, global_batch_size=c.data.global_batch_size,
          seed=c.seed, shuffle_buffer=c.data.shuffle_buffer, process_index=process_index,
          process_count=process_count, num_epochs=c.data.num_epochs if train else 1,
          worker_count=c.data.worker_count if train else 0)
    return data_lib.train_iterator(
        self.data_dir, split=split, global_batch_size=c.data.global_batch_size, seed=c.seed,
        max_text_len=c.data.max_text_len, image_size=c.data.image_size,
        augment=train and c.data.augment, crop_scale=tuple(c.data.crop_scale),
        process_index=process_index, process_count=process_count,
        num_epochs=c.data.num_epochs if train else 1,
        worker_count=c.data.worker_count if train else 0,
        skip_bad_records=c.data.skip_bad_records, text_tokenizer=text_tokenizer, pad_id=pad_id)
