"""CLIP's serving towers (uint8 pixels normalised inside the image tower; token ids with the
dataset's tokenizer.json) and its corpora (the evaluation split's images and captions)."""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.train.task import CorpusExport, TowerExport


def export_towers(towers, *, image_shape: tuple[int, int, int], max_text_len: int,
                  normalization: Mapping[str, Any], special: Mapping[str, int],
                  tokenizer: pathlib.Path, example: Mapping[str, np.ndarray]
                  ) -> dict[str, TowerExport]:
  """"image": uint8 pixels [b, H, W, C] → [b, D] unit norm (normalised inside with the
  dataset's `normalization` mean / std); "text": token ids [b, L] of `tokenizer` → [b, D].
  special: the tokenizer's pad / bos / eos ids; example: an evaluation batch."""
  size, _, channels = image_shape
  norm = normalization
  image = TowerExport(
      fn=lambda p, x: towers.embed_images(p, x),
      input_spec=jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8),
      preprocessing={
          "input": "image", "layout": "NHWC", "height": size, "width": size,
          "channels": channels, "channel_order": "RGB", "dtype": "uint8",
          "source": "uint8 pixels in [0, 255], already at height x width (no resize or crop)",
          "normalized_in_model": True,
          # Applied inside the exported tower (the ViT's input path), as in training.
          "formula": "x = (pixel / 255 - mean[c]) / std[c]",
          "mean": list(norm["mean"]), "std": list(norm["std"]),
          "as_computed": "x = float32(pixel) * scale[c] - shift[c] in float32",
          "scale": [float(np.float32(1.0 / (255.0 * s))) for s in norm["std"]],
          "shift": [float(np.float32(m / s)) for m, s in zip(norm["mean"], norm["std"])]},
      files=(), example=np.asarray(example["image"]))
  text = TowerExport(
      fn=lambda p, x: towers.embed_texts(p, x),
      input_spec=jax.ShapeDtypeStruct((1, max_text_len), jnp.int32),
      preprocessing={
          "input": "token_ids", "tokenizer": tokenizer.name, "library": "huggingface tokenizers",
          "encode": "Tokenizer.from_file(tokenizer).encode(text).ids (the post-processor adds "
                    "[BOS] ... [EOS]; the normaliser lowercases)",
          "max_len": max_text_len, "pad_id": int(special.get("pad", 0)),
          "bos_id": int(special.get("bos", 2)), "eos_id": int(special.get("eos", 3)),
          "truncation": "ids longer than max_len keep their first max_len - 1 ids followed by "
                        "eos_id, so the last non-pad id of every row is eos_id",
          "padding": "right-pad with pad_id to max_len"},
      files=(str(tokenizer),), example=np.asarray(example["text"]))
  return {"image": image, "text": text}


def export_corpus(img: np.ndarray, txt: np.ndarray, index: np.ndarray, what: str
                  ) -> dict[str, CorpusExport]:
  """Image and caption embeddings [N, D] of the evaluation pairs, ids = record index [N] (`what`
  says what it is); captions query the images and images the captions."""
  ids = [str(int(i)) for i in index]
  return {"images": CorpusExport("image", img, ids, f"images; id = {what}",
                                 query_tower="text", queries=txt),
          "captions": CorpusExport("text", txt, ids, f"captions; id = {what}",
                                   query_tower="image", queries=img)}
