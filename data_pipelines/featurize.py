"""Item features computed from a dataset's item text, shared by the recommendation recipes (Demure,
MMSRec): TF-IDF + truncated SVD of the item text, and the per-modality item tables.

  tfidf_svd               texts → [N, k] LSA vectors (TF-IDF, truncated SVD), rows unit norm
  load_modality_features  an interactions dataset → one [N + 1, D_m] table per item modality
"""

from __future__ import annotations

import re

import numpy as np

from data_pipelines import pipelines
from data_pipelines import records

MODALITIES = ("text", "lexical")


def tfidf_svd(texts: list[str], dim: int, *, seed: int = 0, max_vocab: int = 5000) -> np.ndarray:
  """TF-IDF (lower-cased word tokens, smooth idf, L2 rows) → randomized truncated SVD.

  Args:
    texts: N strings.
    dim: output width k (<= min(N, vocabulary)).
  Returns:
    [N, k] float32 = U_k Σ_k (the LSA document vectors), rows L2-normalised.
  """
  docs = [re.findall(r"[a-z0-9]+", t.lower()) for t in texts]
  df: dict[str, int] = {}
  for d in docs:
    for w in set(d):
      df[w] = df.get(w, 0) + 1
  vocab = sorted(df, key=lambda w: (-df[w], w))[:max_vocab]
  index = {w: j for j, w in enumerate(vocab)}
  n = len(texts)
  x = np.zeros((n, len(vocab)), np.float32)
  for i, d in enumerate(docs):
    for w in d:
      j = index.get(w)
      if j is not None:
        x[i, j] += 1.0
  idf = np.log((1 + n) / (1 + np.asarray([df[w] for w in vocab], np.float32))) + 1.0
  x *= idf
  x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
  k = min(dim, *x.shape)
  rng = np.random.default_rng(seed)
  y = x @ rng.normal(size=(x.shape[1], k + 16)).astype(np.float32)
  for _ in range(2):  # power iterations sharpen the spectrum
    y = x @ (x.T @ y)
    y, _ = np.linalg.qr(y)
  q, _ = np.linalg.qr(y)
  u, s, _ = np.linalg.svd(q.T @ x, full_matrices=False)
  out = (q @ u[:, :k]) * s[:k]
  out = np.concatenate([out, np.zeros((n, dim - k), np.float32)], 1) if k < dim else out
  return (out / (np.linalg.norm(out, axis=1, keepdims=True) + 1e-12)).astype(np.float32)


def load_modality_features(data_dir: str, num_items: int, modalities: tuple[str, ...], *,
                           text_features: str, lexical_dim: int, seed: int) -> list[np.ndarray]:
  """Frozen item features per modality: M arrays [N + 1, D_m] float32 (row 0 = padding = 0).

  "text": the precomputed sentence embeddings at `text_features` (config key data.text_features),
  or TF-IDF + SVD when that is ''; "lexical": TF-IDF + SVD of the item text (width lexical_dim).
  The item text is the `items` split of the dataset at `data_dir` (item_index, text).
  """
  texts = None
  feats = []
  for name in modalities:
    if name not in MODALITIES:
      raise ValueError(f"unknown modality {name!r} (config key task.modalities); known: "
                       f"{MODALITIES}")
    if name == "text" and text_features:
      f, avail = pipelines.item_feature_table(data_dir, text_features)
      if not avail[1:].all():
        raise ValueError(f"config key data.text_features = {text_features}: "
                         f"{int((~avail[1:]).sum())} items of {data_dir} have no vector")
    else:
      if texts is None:
        src = records.ArrayRecordSource(data_dir, "items")
        recs = src.read_many(list(range(len(src))))
        src.close()
        texts = [""] * (num_items + 1)
        for r in recs:
          texts[int(r["item_index"])] = r["text"]
      f = np.concatenate([np.zeros((1, lexical_dim), np.float32),
                          tfidf_svd(texts[1:], lexical_dim, seed=seed + (name == "text"))])
    feats.append(np.asarray(f, np.float32))
  return feats
