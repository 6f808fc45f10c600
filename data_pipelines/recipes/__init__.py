"""Dataset builders of individual recipes, in one place, each reachable as `mmcl data build NAME`.

  shapes          the procedural image–caption set of the CLIP quickstart (`image_text`)
  products        procedural product search, graded relevance (GCL)
  fashion-search  product search over the real fashion-product-images photos (GCL)
  product-rows    a product-search set's splits as webdataset / parquet / tfds rows (GCL's
                  data.source)
  artists         SAS ⋈ hetrec2011-lastfm-2k, per-artist modalities (cross-modal artist retrieval)
  music           the procedural key / tempo music set (LOEV; the task also renders it on its
                  first run)

Each module's `main(argv)` is that command; the modules depend only on `data_pipelines`.
"""

BUILDERS: dict[str, str] = {
    "products": "data_pipelines.recipes.products",
    "fashion-search": "data_pipelines.recipes.fashion_search",
    "product-rows": "data_pipelines.recipes.product_sources",
    "artists": "data_pipelines.recipes.artists",
    "music": "data_pipelines.recipes.music_synth",
}
