"""The one TF-IDF + truncated-SVD featuriser: the SVD it computes, its sign convention, the TF-IDF
options, determinism."""
import numpy as np
import scipy.sparse

from data_pipelines import featurize


def test_svd_embedding_is_u_sigma_power_with_fixed_signs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, 12)) * np.linspace(3.0, 0.5, 12)  # distinct singular values
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  for power in (1.0, 0.5):
    emb = featurize.svd_embedding(scipy.sparse.csr_matrix(x), 4, singular_power=power)
    ref = u[:, :4] * s[:4] ** power
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ref *= np.sign(ref[np.argmax(np.abs(ref), axis=0), np.arange(4)])  # largest |entry| > 0
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    assert (emb[np.argmax(np.abs(emb), axis=0), np.arange(4)] > 0).all()
  # ARPACK and the randomized solver (any seed) find the same well-separated components.
  np.testing.assert_allclose(featurize.svd_embedding(x, 4, algorithm="randomized", seed=3),
                             featurize.svd_embedding(x, 4, algorithm="arpack"), atol=1e-4)
  # Past the usable rank (3 columns; ARPACK: 2): zero columns; zero rows stay zero.
  x[5] = 0.0
  wide = featurize.svd_embedding(x[:, :3], 6, algorithm="arpack")
  assert wide.shape == (30, 6) and (wide[:, 2:] == 0).all() and (wide[5] == 0).all()


def test_tfidf_options_weight_as_documented():
  counts = scipy.sparse.csr_matrix(np.array([[2, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 3],
                                             [1, 0, 0, 1], [0, 0, 2, 1]], float))
  n, df = 5, np.array([2, 3, 2, 3])
  dense = counts.toarray()
  tf = np.where(dense > 0, 1 + np.log(np.maximum(dense, 1)), 0.0)
  weighted = tf * (np.log(n / df) + 1)  # log tf, unsmoothed idf, rows not normalised
  u, s, _ = np.linalg.svd(weighted, full_matrices=False)
  ref = u[:, :2] * np.sqrt(s[:2])
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  ref *= np.sign(ref[np.argmax(np.abs(ref), axis=0), np.arange(2)])
  got = featurize.tfidf_svd_counts(counts, 2, log_tf=True, smooth_idf=False,
                                   unit_tfidf_rows=False, singular_power=0.5)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_tfidf_svd_of_texts_is_deterministic_and_keeps_one_letter_words():
  texts = [f"item {j} {('red', 'green', 'blue')[j % 3]}" for j in range(1, 13)]
  a = featurize.tfidf_svd(texts, 4, seed=0)
  np.testing.assert_array_equal(a, featurize.tfidf_svd(list(texts), 4, seed=0))
  # Items 1..9 are told apart by their one-character number words (the default token pattern
  # keeps them), so no two texts share a vector.
  full = featurize.tfidf_svd(texts, 11)
  assert np.abs(full @ full.T - np.eye(12)).max() < 0.99
  assert (featurize.tfidf_svd(["", ""], 3) == 0).all()
