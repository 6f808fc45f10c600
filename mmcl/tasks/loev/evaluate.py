"""LOEV's evaluation: key / tempo probes, equivariance probes, kNN retrieval with transforming
labels and invariance of every representation, each with its standard error, and the per-item
outcomes for paired comparisons between runs."""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Mapping

import numpy as np

from data_pipelines.recipes import music_synth
from mmcl.tasks.loev import probes


def evaluation_metrics(emb: Mapping[str, Mapping[str, np.ndarray]],
                       views: Mapping[str, np.ndarray], t
                       ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Every LOEV metric of the representations of the evaluation views.

  emb: view ("clean", "pitch", "stretch") → space ("whole", "sub/<head>", ...) → [N, F] float32;
  views: `data.evaluation_views` (key [N], bpm [N], semitones [N], rate [N]); t: the `task`
  config (eval_probe_train_fraction, eval_knn_k, eval_tempo_tolerance).
  Returns (metrics {name: value, "<name>/se": its standard error}, per-item outcomes
  {name: [n] or [n_test]} for paired comparisons).
  """
  n = len(views["key"])
  n_train = int(round(t.eval_probe_train_fraction * n))
  tr, te = np.arange(n_train), np.arange(n_train, n)
  key, bpm = views["key"], views["bpm"]
  out: dict[str, float] = {}
  items: dict[str, np.ndarray] = {}  # per test item, for standard errors and paired comparisons
  whole = emb["clean"]["whole"]
  keyp = probes.logistic_probe(whole[tr], key[tr], whole[te], key[te], num_classes=24)
  out["probe/key_accuracy"] = keyp["accuracy"]
  items["probe/key_correct"] = (keyp["pred"] == key[te]).astype(np.float64)
  tempo = probes.ridge_probe(whole[tr], np.log2(bpm[tr]), whole[te], np.log2(bpm[te]))
  out["probe/tempo_r2"] = tempo["r2"]
  out["probe/tempo_acc1"] = float(np.mean(np.abs(2 ** tempo["pred"] / bpm[te] - 1) <= 0.04))
  items["probe/tempo_target"], items["probe/tempo_pred"] = np.log2(bpm[te]), tempo["pred"]
  items["probe/tempo_acc1"] = (np.abs(2 ** tempo["pred"] / bpm[te] - 1) <= 0.04).astype(float)
  targets = {"pitch": views["semitones"], "stretch": np.log2(views["rate"])}
  spaces = list(emb["clean"])  # whole, sub/<head> (and head/<head> for loev++)
  # Key and tempo probes on every space, cross-fitted over all n clean clips: which subspace
  # holds key / tempo (e.g. whether the stretch head keeps tempo), and the whole embedding's
  # probes with all n clips as test clips (about half the SE of the 70/30 split).
  key_probe = functools.partial(probes.logistic_probe, num_classes=24)
  log_bpm = np.log2(bpm)
  items["probe_cf/tempo/target"] = log_bpm
  for s in spaces:
    x = emb["clean"][s]
    tempo_cf = probes.cross_fitted(probes.ridge_probe, x, log_bpm)
    pred_t = tempo_cf["pred"]
    out[f"probe_cf/tempo/{s}/r2"] = tempo_cf["r2"]
    out[f"probe_cf/tempo/{s}/r2/se"] = probes.bootstrap_se(
        lambda i: probes.r2_score(log_bpm[i], pred_t[i]), n)  # pylint: disable=cell-var-from-loop
    items[f"probe_cf/tempo/{s}/pred"] = pred_t
    key_correct = (probes.out_of_fold(key_probe, x, key) == key).astype(np.float64)
    out[f"probe_cf/key/{s}/accuracy"] = float(np.mean(key_correct))
    out[f"probe_cf/key/{s}/accuracy/se"] = float(np.std(key_correct, ddof=1) / np.sqrt(n))
    items[f"probe_cf/key/{s}/correct"] = key_correct
  k = t.eval_knn_k
  tol = t.eval_tempo_tolerance
  for aug in ("pitch", "stretch"):
    for s in spaces:
      x = np.concatenate([emb[aug][s], emb["clean"][s]], 1)
      eq = probes.ridge_probe(x[tr], targets[aug][tr], x[te], targets[aug][te])
      out[f"equivariance/{aug}/{s}/r2"] = eq["r2"]
      items[f"equivariance/{aug}/target"] = targets[aug][te]
      items[f"equivariance/{aug}/{s}/pred"] = eq["pred"]
      # Cross-fitted over all n clips (each predicted by a probe fitted on the other folds),
      # linear and RBF kernel ridge: the nonlinear probe reads a separation that is not linear
      # in the parameter (e.g. cyclic in semitones); all n clips are test clips (smaller SE).
      for name, fn in (("equivariance_cf", probes.ridge_probe),
                       ("equivariance_rbf_cf", probes.kernel_ridge_probe)):
        cf = probes.cross_fitted(fn, x, targets[aug])
        out[f"{name}/{aug}/{s}/r2"] = cf["r2"]
        items[f"{name}/{aug}/{s}/pred"] = cf["pred"]
      items[f"equivariance_cf/{aug}/target"] = targets[aug]
  # kNN: transformed queries against the other clips' clean views; labels transform.
  key_after = music_synth.transpose_key(key, views["semitones"].astype(int))
  bpm_after = bpm * views["rate"]
  own = np.arange(n)
  for s in spaces:
    items[f"knn/key/{s}/hit@{k}"] = probes.knn_hits(
        emb["pitch"][s], emb["clean"][s], lambda top: key[top] == key_after[:, None], k=k,
        exclude=own)
    items[f"knn/tempo/{s}/hit@{k}"] = probes.knn_hits(
        emb["stretch"][s], emb["clean"][s],
        lambda top: np.abs(bpm[top] / bpm_after[:, None] - 1) <= tol, k=k, exclude=own)
    for task_ in ("key", "tempo"):
      hits = items[f"knn/{task_}/{s}/hit@{k}"]
      out[f"knn/{task_}/{s}/hit@{k}"] = float(np.mean(hits))
      out[f"knn/{task_}/{s}/hit@{k}/se"] = float(np.std(hits, ddof=1) / np.sqrt(n))
  # Invariance: share of transformed views whose nearest clean clip (cosine) is their own clip.
  # An invariant space → 1; a space that keeps augmentation k apart → lower for k.
  for aug in ("pitch", "stretch"):
    for s in spaces:
      own_hit = probes.knn_hits(emb[aug][s], emb["clean"][s], lambda top: top == own[:, None],
                                k=1)
      out[f"invariance/{aug}/{s}/own_top1"] = float(np.mean(own_hit))
      out[f"invariance/{aug}/{s}/own_top1/se"] = float(np.std(own_hit, ddof=1) / np.sqrt(n))
      items[f"invariance/{aug}/{s}/own_top1"] = own_hit
  # Chance levels of the kNN hits (a random neighbour).
  out["knn/key/chance"] = float(np.mean(key[None, :] == key_after[:, None]))
  out["knn/tempo/chance"] = float(np.mean(np.abs(bpm[None, :] / bpm_after[:, None] - 1) <= tol))
  out["num_eval_clips"] = float(n)
  # Bootstrap standard errors over the test clips of the probe metrics (the kNN ones above are
  # means over all n queries).
  nt = len(te)
  out["probe/key_accuracy/se"] = float(np.std(items["probe/key_correct"], ddof=1) / np.sqrt(nt))
  out["probe/tempo_r2/se"] = probes.bootstrap_se(
      lambda i: probes.r2_score(items["probe/tempo_target"][i], items["probe/tempo_pred"][i]), nt)
  for aug in ("pitch", "stretch"):
    y = items[f"equivariance/{aug}/target"]
    for s in spaces:
      pred = items[f"equivariance/{aug}/{s}/pred"]
      out[f"equivariance/{aug}/{s}/r2/se"] = probes.bootstrap_se(
          lambda i: probes.r2_score(y[i], pred[i]), nt)  # pylint: disable=cell-var-from-loop
      y_all = items[f"equivariance_cf/{aug}/target"]
      for name in ("equivariance_cf", "equivariance_rbf_cf"):
        pred_cf = items[f"{name}/{aug}/{s}/pred"]
        out[f"{name}/{aug}/{s}/r2/se"] = probes.bootstrap_se(
            lambda i: probes.r2_score(y_all[i], pred_cf[i]),  # pylint: disable=cell-var-from-loop
            n)
  return out, items


def write_evaluation(out_dir: str, out: Mapping[str, float],
                     items: Mapping[str, np.ndarray]) -> None:
  """loev_eval.json (the metrics) and loev_eval_items.npz (the per-item outcomes) in out_dir."""
  path = pathlib.Path(out_dir)
  path.mkdir(parents=True, exist_ok=True)
  np.savez(path / "loev_eval_items.npz", **items)
  (path / "loev_eval.json").write_text(json.dumps(out, indent=1, sort_keys=True))
