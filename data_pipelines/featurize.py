"""Features computed on the host from text or count data: the one TF-IDF + truncated-SVD
featuriser of the project (scikit-learn's `TfidfVectorizer` / `TfidfTransformer` and
`TruncatedSVD`; nothing here runs on a device), and the per-modality item tables of the
recommendation recipes.

  svd_embedding           a (sparse) matrix → [R, k] row embeddings U_k Σ_k^p, rows unit norm
  tfidf_svd_counts        term counts [N, V] → TF-IDF → svd_embedding
  tfidf_svd               texts → [N, k] LSA vectors (TF-IDF, truncated SVD), rows unit norm
  load_modality_features  an interactions dataset → one [N + 1, D_m] table per item modality

Every output is deterministic: the SVD is seeded (randomized solver) or exact to ARPACK's
tolerance, and each component's sign is fixed so that its largest entry in absolute value is
positive (`svd_embedding`). Where singular values tie (a planted catalogue: one direction per
item, all of one size), the components inside the tie are one basis of that subspace among many;
which one depends on the solver and its seed.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import scipy.sparse

from data_pipelines import pipelines
from data_pipelines import records

MODALITIES = ("text", "lexical")
SVD_ALGORITHMS = ("arpack", "randomized")


def svd_embedding(matrix: Any, dim: int, *, singular_power: float = 1.0,
                  algorithm: str = "randomized", seed: int = 0) -> np.ndarray:
  """Row embeddings U_k Σ_k^p of a rank-k truncated SVD (scikit-learn `TruncatedSVD`), k = dim,
  rows unit norm.

  Args:
    matrix: [R, C] scipy sparse or dense float; its R rows are embedded.
    dim: output width; columns past the matrix's usable rank (min(R, C) − 1 for ARPACK,
      min(R, C) for the randomized solver) are zero.
    singular_power: p (1 = the LSA document vectors U Σ; 0.5 = U Σ^{1/2}, the symmetric split
      of a collaborative-filtering factorisation).
    algorithm: "randomized" (Halko et al. 2011, seeded; scikit-learn's default for LSA) or
      "arpack" (exact to its tolerance; its start vector drawn from `seed`).
    seed: random state of the solver.

  Returns:
    [R, dim] float32, components in decreasing singular-value order, each signed so that its
    largest-|value| entry is positive; all-zero rows stay zero.
  """
  from sklearn.decomposition import TruncatedSVD  # pylint: disable=g-import-not-at-top
  if algorithm not in SVD_ALGORITHMS:
    raise ValueError(f"svd_embedding: algorithm {algorithm!r}, expected one of {SVD_ALGORITHMS}")
  r, c = matrix.shape
  k = min(dim, min(r, c) - (1 if algorithm == "arpack" else 0))
  out = np.zeros((r, dim), np.float64)
  if k > 0:
    svd = TruncatedSVD(k, algorithm=algorithm, random_state=seed)
    u_sigma = svd.fit_transform(matrix.astype(np.float64))
    sv = svd.singular_values_
    emb = u_sigma * np.where(sv > 0, sv, 1.0) ** (singular_power - 1.0)
    out[:, :k] = emb[:, np.argsort(-sv, kind="stable")]  # ARPACK's order is not fixed
  norm = np.linalg.norm(out, axis=1, keepdims=True)
  out /= np.where(norm > 0, norm, 1.0)
  # The sign of a singular pair is arbitrary: each component's largest-|value| loading (of the
  # unit rows returned) is made positive.
  peak = out[np.argmax(np.abs(out), axis=0), np.arange(dim)]
  return (out * np.where(peak < 0, -1.0, 1.0)[None, :]).astype(np.float32)


def tfidf_svd_counts(counts: Any, dim: int, *, log_tf: bool = False, smooth_idf: bool = True,
                     unit_tfidf_rows: bool = True, singular_power: float = 1.0,
                     algorithm: str = "randomized", seed: int = 0) -> np.ndarray:
  """TF-IDF of term counts (scikit-learn `TfidfTransformer`) → `svd_embedding`.

  w(d, t) = tf · idf, tf = n(d, t) (log_tf: 1 + log n(d, t)), idf = log((1 + N) / (1 + df(t))) + 1
  (smooth_idf) or log(N / df(t)) + 1; unit_tfidf_rows: each document's TF-IDF row L2-normalised.

  Args:
    counts: [N, V] scipy sparse or dense counts, N documents (rows) over V terms.
    dim: output width (see `svd_embedding`).
  Returns:
    [N, dim] float32, rows unit norm (all-zero for a document without terms).
  """
  from sklearn.feature_extraction.text import TfidfTransformer  # pylint: disable=g-import-not-at-top
  tfidf = TfidfTransformer(norm="l2" if unit_tfidf_rows else None, sublinear_tf=log_tf,
                           smooth_idf=smooth_idf).fit_transform(scipy.sparse.csr_matrix(counts))
  return svd_embedding(tfidf, dim, singular_power=singular_power, algorithm=algorithm, seed=seed)


def tfidf_svd(texts: Sequence[str], dim: int, *, min_df: int = 1, max_vocab: int | None = 5000,
              token_pattern: str = r"[a-z0-9]+", log_tf: bool = False, smooth_idf: bool = True,
              unit_tfidf_rows: bool = True, singular_power: float = 1.0,
              algorithm: str = "randomized", seed: int = 0) -> np.ndarray:
  """Texts → term counts (scikit-learn `CountVectorizer`: lower-cased `token_pattern` words that
  occur in at least `min_df` texts, the `max_vocab` most frequent kept) → `tfidf_svd_counts`:
  with the defaults, the LSA document vectors U_k Σ_k of the smooth-idf, L2-row TF-IDF matrix
  (`TfidfVectorizer`'s), rows unit norm.

  Args:
    texts: N strings.
    dim: output width (see `svd_embedding`).
  Returns:
    [N, dim] float32 (all zeros when no word survives).
  """
  from sklearn.feature_extraction.text import CountVectorizer  # pylint: disable=g-import-not-at-top
  vectorizer = CountVectorizer(lowercase=True, token_pattern=token_pattern, min_df=min_df,
                               max_features=max_vocab, dtype=np.float64)
  try:
    counts = vectorizer.fit_transform(list(texts))
  except ValueError:  # no word survives (empty texts, or none in min_df texts): no signal
    return np.zeros((len(texts), dim), np.float32)
  return tfidf_svd_counts(counts, dim, log_tf=log_tf, smooth_idf=smooth_idf,
                          unit_tfidf_rows=unit_tfidf_rows, singular_power=singular_power,
                          algorithm=algorithm, seed=seed)


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
