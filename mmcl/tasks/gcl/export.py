"""GCL's serving towers: the query tower and one tower per document field, each document tower's
preprocessing carrying the fusion with the field weights, and the fused document corpus."""

from __future__ import annotations

import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import image_ops
from mmcl.models.layers import l2_normalize
from mmcl.train.task import CorpusExport, TowerExport


def text_preprocessing(c, metadata: Mapping[str, Any], tokenizer: pathlib.Path | None,
                       pad_id: int) -> tuple[dict, tuple[str, ...]]:
  """(preprocessing of the text towers, the files it needs) for the config c: the dataset's BPE
  tokenizer file `tokenizer`, or (None) the pretrained folder's WordPiece tokenizer."""
  length = c.data.max_text_len
  if tokenizer is not None:
    return {"input": "token_ids", "tokenizer": tokenizer.name, "max_len": length, "pad_id": 0,
            "eos_id": int(metadata.get("special_token_ids", {}).get("eos", 3)),
            "encode": "Tokenizer.from_file(tokenizer).encode(text).ids ([BOS] ... [EOS])",
            "truncation": "ids longer than max_len keep their first max_len - 1 ids followed "
                          "by eos_id", "padding": "right-pad with pad_id to max_len"
            }, (str(tokenizer),)
  return {"input": "token_ids", "max_len": length, "pad_id": int(pad_id),
          "tokenizer": "the pretrained folder's WordPiece tokenizer "
                       f"({c.model.pretrained_text.folder or 'all-MiniLM-L6-v2'})",
          "truncation": "[CLS] ... [SEP] cut to max_len", "padding": "right-pad"}, ()


def export_towers(towers, c, text_pre: dict, files: tuple[str, ...],
                  example: Mapping[str, np.ndarray], queries: Mapping[str, np.ndarray]
                  ) -> dict[str, TowerExport]:
  """"query" (token ids [B, L] → [B, D] unit embedding) and one tower per document field
  ("doc_title", "doc_description", "doc_image": the field's unit embedding); each document
  tower's preprocessing carries the fusion with the field weights (`model.fuse_fields`):
  e_d = normalise(Σ_f w_f m_f e_f / Σ_f w_f m_f), m_f = field f present.

  towers: `model.GCLTowers`; c: the config; text_pre, files: `text_preprocessing`; example,
  queries: the evaluator's batches of a few documents and queries (conversion checks).
  """
  length, size = c.data.max_text_len, c.data.image_size
  fusion = {"fields": [f"doc_{f}" for f in towers.doc_fields],
            "weights": [float(w) for w in towers.doc_field_weights],
            "formula": "e_d = normalise(sum_f w_f * m_f * e_f / sum_f w_f * m_f), m_f = 1 if "
                       "field f is present (non-empty text, an image) else 0; no field "
                       "present: no embedding"}
  d_key = towers.text_keys()[1]
  out = {"query": TowerExport(
      fn=lambda p, x: towers.embed_queries(p, x),
      input_spec=jax.ShapeDtypeStruct((1, length), jnp.int32), preprocessing=text_pre,
      files=files, example=np.asarray(queries["query"]))}
  for field in towers.doc_fields:
    if field == "image":
      norm = {"mean": list(image_ops.CLIP_MEAN), "std": list(image_ops.CLIP_STD)}
      out["doc_image"] = TowerExport(
          fn=lambda p, x: l2_normalize(towers.image(p, x)),
          input_spec=jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8),
          preprocessing={"input": "image", "height": size, "width": size, "channels": 3,
                         "layout": "NHWC", "channel_order": "RGB", "dtype": "uint8",
                         "source": "uint8 pixels, center crop to a square, resized to "
                                   "height x width (data_pipelines.image_ops)",
                         "normalized_in_model": True,
                         # Applied inside the exported tower (the ViT's input path).
                         "formula": "x = (pixel / 255 - mean[c]) / std[c]", **norm,
                         "as_computed": "x = float32(pixel) * scale[c] - shift[c] in float32",
                         "scale": [float(np.float32(1.0 / (255.0 * s))) for s in norm["std"]],
                         "shift": [float(np.float32(m / s))
                                   for m, s in zip(norm["mean"], norm["std"])],
                         "fusion": fusion},
          example=np.asarray(example["image"]))
    else:
      out[f"doc_{field}"] = TowerExport(
          fn=lambda p, x: l2_normalize(towers.text(p, d_key, x)),
          input_spec=jax.ShapeDtypeStruct((1, length), jnp.int32),
          preprocessing={**text_pre, "fusion": fusion}, files=files,
          example=np.asarray(example[field]))
  return out


def export_corpus(towers, split: str, doc_ids, d_emb: np.ndarray, q_emb: np.ndarray
                  ) -> dict[str, CorpusExport]:
  """The fused documents d_emb [N, D] of `split` (ids doc_ids), queried by its queries
  q_emb [Q, D]."""
  return {"documents": CorpusExport(
      f"doc_{towers.doc_fields[0]}", d_emb, [str(i) for i in doc_ids],
      f"documents of split {split!r}, fused over {list(towers.doc_fields)} with weights "
      f"{list(towers.doc_field_weights)}; id = the dataset's document id", query_tower="query",
      queries=q_emb)}
