"""Image <-> text retrieval metrics against a numpy full sort."""
import jax
import numpy as np
import pytest

from mmcl.eval import metrics as m
from mmcl.eval.image_text import image_text_rankings, image_text_retrieval_metrics


def _embeddings(seed, num_images, text_to_image, noise=1.0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num_images, 16)).astype(np.float32)
  texts = (images[text_to_image] + noise * rng.normal(size=(len(text_to_image), 16))).astype(
      np.float32)
  return images, texts


def _reference_ranks(queries, corpus, positive):
  """0-based rank of the first positive; positive: [Q, N] bool."""
  scores = queries.astype(np.float64) @ corpus.astype(np.float64).T
  order = np.lexsort((np.broadcast_to(np.arange(corpus.shape[0]), scores.shape), -scores), axis=1)
  return np.take_along_axis(positive, order, 1).argmax(1)


def _expected(images, texts, text_to_image, ks):
  match = text_to_image[None, :] == np.arange(len(images))[:, None]  # [N_img, N_txt]
  out = {}
  for direction, ranks in (("i2t", _reference_ranks(images, texts, match)),
                           ("t2i", _reference_ranks(texts, images, match.T))):
    for k in ks:
      out[f"{direction}/recall@{k}"] = float(np.mean(ranks < k))
    out[f"{direction}/mrr"] = float(np.mean(1 / (ranks + 1)))
    out[f"{direction}/median_rank"] = float(np.median(ranks + 1))
    out[f"{direction}/mean_rank"] = float(np.mean(ranks + 1))
    out[f"{direction}/num_queries"] = len(ranks)
  return out


def test_paired_metrics_match_reference():
  images, texts = _embeddings(0, 64, np.arange(64))
  got = image_text_retrieval_metrics(images, texts, ks=(1, 5, 10), corpus_chunk=24,
                                     query_chunk=16)
  expected = _expected(images, texts, np.arange(64), (1, 5, 10))
  assert got.keys() == expected.keys()
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key
  # The noise level makes the task neither trivial nor hopeless.
  assert 0.1 < got["i2t/recall@1"] < 0.95 and 0.1 < got["t2i/recall@1"] < 0.95


def test_several_captions_per_image_and_mesh():
  text_to_image = np.repeat(np.arange(20), 3)
  images, texts = _embeddings(1, 20, text_to_image, noise=1.5)
  mesh = jax.make_mesh((8,), ("data",))
  got = image_text_retrieval_metrics(images, texts, ks=(1, 5), text_to_image=text_to_image,
                                     mesh=mesh, corpus_chunk=16)
  expected = _expected(images, texts, text_to_image, (1, 5))
  for key, value in expected.items():
    assert got[key] == pytest.approx(value, abs=1e-12), key
  assert got["i2t/num_queries"] == 20 and got["t2i/num_queries"] == 60


def test_rankings_agree_with_rank_based_recall():
  text_to_image = np.repeat(np.arange(15), 2)
  images, texts = _embeddings(2, 15, text_to_image, noise=1.5)
  rankings = image_text_rankings(images, texts, k=10, text_to_image=text_to_image)
  assert rankings["i2t"].indices.shape == (15, 10) and rankings["t2i"].indices.shape == (30, 10)
  summary = image_text_retrieval_metrics(images, texts, ks=(1, 5, 10),
                                         text_to_image=text_to_image)
  for direction in ("i2t", "t2i"):
    ranking = rankings[direction]
    listed = m.evaluate(ranking.indices, ranking.qrels, ["hit_rate@1", "hit_rate@5",
                                                          "hit_rate@10"])
    for k in (1, 5, 10):
      assert listed[f"hit_rate@{k}"] == pytest.approx(summary[f"{direction}/recall@{k}"])


def test_errors():
  images = np.zeros((4, 8), np.float32)
  with pytest.raises(ValueError, match="4 images but 5 texts"):
    image_text_retrieval_metrics(images, np.zeros((5, 8), np.float32))
  with pytest.raises(ValueError, match=r"text_to_image must be int \[5\] in \[0, 4\)"):
    image_text_retrieval_metrics(images, np.zeros((5, 8), np.float32),
                                 text_to_image=np.array([0, 1, 2, 3, 4]))
  with pytest.raises(ValueError, match="same D"):
    image_text_retrieval_metrics(images, np.zeros((4, 7), np.float32))
