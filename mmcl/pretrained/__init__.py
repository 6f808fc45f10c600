"""Pretrained models: loading, inference, export and precomputed features, in one package.

  text      Hugging Face BERT-family folders → `mmcl.models.bert` towers; `encode_texts`
  vit       open_clip / timm ViT folders → `mmcl.models.vit`
  export    a pretrained folder's tower as a serving artifact (`mmcl export --tower FOLDER`)
  towers    the towers `mmcl features` embeds with: a pretrained folder, a `mmcl train` workdir's
            tower (its task given by the caller's `resolve_task`) or an `mmcl export` directory
  features  `mmcl features`: embeddings of a dataset field in the precomputed-features format

It sits above `mmcl.export` and `mmcl.workdir` (its towers run trained checkpoints and export
artifacts too) and below the methods (`mmcl.tasks`), which load pretrained towers from it.
"""
