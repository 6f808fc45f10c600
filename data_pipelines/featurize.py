"""Features computed on the host: the one TF-IDF + truncated-SVD featuriser of the project
(scikit-learn; nothing here runs on a device), and the per-modality item tables of the
recommendation recipes.

  svd_embedding           a (sparse) matrix → [R, k] row embeddings U_k Σ_k^p, rows unit norm
  tfidf_svd               texts → [N, k] LSA vectors (TF-IDF, truncated SVD), rows unit norm
  load_modality_features  an interactions dataset → one [N + 1, D_m] table per item modality
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from data_pipelines import pipelines
from data_pipelines import records

MODALITIES = ("text", "lexical")


def svd_embedding(matrix: Any, dim: int, *, seed: int = 0, singular_power: float = 1.0,
                  algorithm: str = "randomized") -> np.ndarray:
  """Row embeddings U_k Σ_k^p of a rank-k truncated SVD (scikit-learn `TruncatedSVD`), rows unit
  norm, zero columns appended when the matrix has fewer than `dim` dimensions.

  Args:
    matrix: [R, C] scipy sparse or dense; R rows to embed.
    dim: output width.
    seed: the SVD's random state (randomized range finder / ARPACK start vector).
    singular_power: p (1 = the LSA document vectors U Σ; 0.5 = U Σ^{1/2}).
    algorithm: "randomized" (Halko et al. 2011) or "arpack" (exact to its tolerance).

  Returns:
    [R, dim] float32; the signs of the components are deterministic (scikit-learn's svd_flip).
  """
  from sklearn.decomposition import TruncatedSVD  # pylint: disable=g-import-not-at-top
  r, c = matrix.shape
  k = min(dim, min(r, c) - (1 if algorithm == "arpack" else 0))  # ARPACK needs k < min(R, C)
  out = np.zeros((r, dim), np.float64)
  if k > 0:
    svd = TruncatedSVD(k, algorithm=algorithm, random_state=seed)
    u_sigma = svd.fit_transform(matrix)
    sv = svd.singular_values_
    scale = np.where(sv > 0, np.abs(sv) ** (singular_power - 1.0), 0.0)
    out[:, :k] = u_sigma * scale[None, :]
  norm = np.linalg.norm(out, axis=1, keepdims=True)
  return (out / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def tfidf_svd(texts: Sequence[str], dim: int, *, seed: int = 0, max_vocab: int | None = 5000,
              min_df: int = 1, sublinear_tf: bool = False,
              token_pattern: str = r"[a-z0-9]+") -> np.ndarray:
  """TF-IDF (scikit-learn `TfidfVectorizer`: lower-cased `token_pattern` words, smooth idf, L2
  rows) → truncated SVD (`svd_embedding`, randomized, seeded): the LSA vectors U_k Σ_k, rows unit
  norm.

  Args:
    texts: N strings.
    dim: output width k (columns past min(N, vocabulary) are zero).
    max_vocab: keep the most frequent words (None = all).
    min_df: ignore words in fewer texts.
    sublinear_tf: tf → 1 + log(tf).
    token_pattern: the regular expression of a word (after lower-casing).
  Returns:
    [N, dim] float32.
  """
  from sklearn.feature_extraction.text import TfidfVectorizer  # pylint: disable=g-import-not-at-top
  vectorizer = TfidfVectorizer(lowercase=True, token_pattern=token_pattern, max_features=max_vocab,
                               min_df=min_df, sublinear_tf=sublinear_tf, dtype=np.float64)
  try:
    x = vectorizer.fit_transform(list(texts))
  except ValueError:  # no word survives (empty texts): no lexical signal
    return np.zeros((len(texts), dim), np.float32)
  return svd_embedding(x, dim, seed=seed)


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
