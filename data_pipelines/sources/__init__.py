"""Data sources users already hold, streamed into grain without a conversion step.

`data.source` specs (`spec`): `arrayrecord:DIR` (datasets of `data_pipelines.records`, read by
`data_pipelines.image_text`), `webdataset:PATTERN` (tar shards, `webdataset`), `tfds:NAME[/CONFIG]
[:SPLIT]@DATA_DIR` (an ArrayRecord tfds build, `tfds`), `parquet:GLOB` (`parquet`). Image–text
pipelines over the last three: `pairs`; the streaming order contract, exact resume and worker
processes: `stream`; what a reader takes of each record: `columns`.

Tasks and their `data.source`: clip (image–text pairs, all four schemes) and gcl (product-search
rows, one source per split, `data_pipelines.recipes.product_sources`) stream; mmsrec, demure and
artist_retrieval read ArrayRecord datasets only (`arrayrecord_dir`: they need random access to an
item or artist catalogue), as do sasrec and loev (no `data.source` key).
"""

from __future__ import annotations

from typing import Any

from data_pipelines.sources.spec import BadRecordError
from data_pipelines.sources.spec import SCHEMES
from data_pipelines.sources.spec import SourceConfigError
from data_pipelines.sources.spec import SourceSpec
from data_pipelines.sources.spec import parse

# key -> (default, doc): the config keys of a task that reads image–text pairs from a source.
CONFIG_KEYS: dict[str, tuple[Any, str]] = {
    "source": ("", "where the pairs come from: arrayrecord:DIR | webdataset:PATTERN (brace "
                   "ranges, e.g. /d/{00000..00099}.tar) | tfds:NAME[/CONFIG][:SPLIT]@DATA_DIR | "
                   "parquet:GLOB; '' = arrayrecord:<data.dir>"),
    "image_field": ("", "image member/column/feature ('' = webdataset jpg;jpeg;png;webp, "
                        "parquet and tfds 'image')"),
    "caption_field": ("", "caption member/column/feature ('' = webdataset txt, parquet and tfds "
                          "'caption')"),
    "key_field": ("", "parquet column identifying a row ('' = 'key' if the files have it, else "
                      "<file name>/<row>); webdataset "
                      "keys are member names, tfds keys <split>/<index>"),
    "image_size": (224, "image side S of the batches of webdataset/tfds/parquet sources "
                        "(arrayrecord datasets fix it in their metadata)"),
    "tokenizer": ("", "caption tokenizer.json for webdataset/tfds/parquet sources ('' = train "
                      "a BPE tokenizer on the training captions and cache it in data.cache_dir)"),
    "vocab_size": (8192, "vocabulary budget of a tokenizer trained from the source"),
    "tokenizer_captions": (100_000, "training captions (natural order) a tokenizer is "
                                    "trained on"),
    "holdout_fraction": (0.02, "fraction of samples (by a stable hash of their key) held out "
                               "of training for validation and evaluation, when "
                               "data.eval_source is empty"),
    "eval_source": ("", "a separate source for validation and evaluation ('' = the held-out "
                        "part of data.source)"),
    "eval_examples": (5000, "held-out samples the evaluator and validation read (natural "
                            "order; 0 = all)"),
    "shuffle_buffer": (1000, "streamed sources: window of consecutive samples shuffled together "
                             "(besides the per-epoch shard order)"),
    "decode_threads": (0, "threads decoding the encoded images of each batch (webdataset, "
                          "tfds, parquet sources and ArrayRecord datasets of encoded images; "
                          "0 = one per CPU core, at most 16; with data.worker_count = W > 0, "
                          "ceil(cores / W) and at least 2 per worker); batches do not depend "
                          "on it"),
    "cache_dir": ("", "where tokenizers trained from a source are kept ('' = "
                      "$XDG_CACHE_HOME/mmcl or ~/.cache/mmcl)"),
}


def arrayrecord_dir(source: str, data_dir: str, *, needs: str) -> str:
  """The dataset directory of a task that reads ArrayRecord datasets only: `source` '' →
  `data_dir`, `arrayrecord:DIR` → DIR; any other scheme is a SourceConfigError saying why
  (`needs`: what the task reads by random access, which a stream cannot give)."""
  if not source:
    return data_dir
  spec = parse(source)
  if spec.scheme != "arrayrecord":
    raise SourceConfigError(f"this task reads ArrayRecord datasets only (it needs {needs}, which "
                            f"a {spec.scheme} stream cannot give); use arrayrecord:DIR or "
                            "data.dir")
  return spec.location


def define_arrayrecord_only(section: Any, needs: str) -> None:
  """Declares `source` on a data section of a task that reads ArrayRecord datasets only."""
  if "source" not in section:
    section.define("source", "", f"'' = data.dir, or arrayrecord:DIR; webdataset/tfds/parquet "
                                 f"sources are refused: the task needs {needs}")


def define_config(section: Any) -> None:
  """Declares CONFIG_KEYS on an `mmcl.config` section (keys already there are kept)."""
  for key, (default, doc) in CONFIG_KEYS.items():
    if key not in section:
      section.define(key, default, doc)


__all__ = ["BadRecordError", "CONFIG_KEYS", "SCHEMES", "SourceConfigError", "SourceSpec",
           "arrayrecord_dir", "define_arrayrecord_only", "define_config", "parse"]
