"""Artist retrieval's serving towers (one projector per modality, and the fused artist) and the
catalogue corpus."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmcl.tasks.artist_retrieval.model import artist_rows
from mmcl.train.task import CorpusExport, TowerExport


def export_towers(net, cat: Mapping[str, np.ndarray], metadata: Mapping[str, Any]
                  ) -> dict[str, TowerExport]:
  """One projector tower per modality (its precomputed embedding [b, d_m] → g_m [b, D], unit
  norm), for cross-modal retrieval, and "artist": all modalities with availability flags
  [b, Σ d_m + M] → the fused artist embedding [b, D] (missing modalities left out of the mean).
  net: `model.ArtistProjectors`; cat: the catalogue split (example inputs)."""
  towers = {}
  for m in net.modalities:
    towers[m] = TowerExport(
        fn=lambda p, x, m=m: net.project(p, m, x),
        input_spec=jax.ShapeDtypeStruct((1, net.dims[m]), jnp.float32),
        preprocessing={"input": "modality_embedding", "modality": m, "dim": net.dims[m],
                       "source": metadata.get("modality_sources", {}).get(
                           m, f"the dataset's precomputed {m!r} vector of the artist")},
        example=cat[m][cat[f"has_{m}"]][:8])
  dims = [net.dims[m] for m in net.modalities]
  towers["artist"] = TowerExport(
      fn=net.fuse, input_spec=jax.ShapeDtypeStruct((1, sum(dims) + len(dims)), jnp.float32),
      preprocessing={"input": "artist_modalities",
                     "layout": [{"modality": m, "dim": d} for m, d in zip(net.modalities, dims)]
                     + [{"availability": list(net.modalities)}],
                     "availability": "the last M columns: 1.0 if the modality is present, 0.0 "
                                     "if missing (its vector is then ignored, e.g. zeros)",
                     "fusion": "normalise(sum of the available modality projections)"},
      example=artist_rows(cat, net.modalities)[:8])
  return towers


def export_corpus(net, params, cat: Mapping[str, np.ndarray], roles: np.ndarray,
                  eval_queries: str) -> dict[str, CorpusExport]:
  """The catalogue's fused artist embeddings [N', D] (artists with at least one modality),
  queried by the evaluator's query artists (role `eval_queries`)."""
  rows = artist_rows(cat, net.modalities)
  emb = np.asarray(jax.jit(net.fuse)(params, rows))
  keep = rows[:, -len(net.modalities):].any(axis=1)
  queries = emb[(roles == eval_queries) & keep]
  return {"artists": CorpusExport(
      "artist", emb[keep], [str(i) for i, k in zip(cat["ids"], keep) if k],
      "catalogue artists with at least one modality; id = the dataset's artist id",
      query_tower="artist", queries=queries)}
