"""Similar-artist retrieval with missing modalities: rankings, metrics, buckets, modality bias.

Protocol (Ferraro et al. 2023, arXiv:2308.06556, adapted to the SAS ground truth): each query artist
ranks every other catalogue artist by cosine similarity of their embeddings; the relevant items
are its ground-truth similar artists (binary). A query that has no embedding under a system (e.g.
a single-modality baseline for an artist lacking that modality) retrieves nothing, so it scores 0
on every metric; a catalogue artist without an embedding is never retrieved. Reported:
  * NDCG@k and Recall@k for k in `ks` (NDCG@200 is the OLGA protocol's headline; NDCG@10 /
    Recall@10 against the top-10 ground truth), mean over queries;
  * coverage@k over the catalogue (share of artists in at least one top-k list);
  * the same by query-popularity bucket (equal-count quintiles of hetrec listeners over the
    catalogue artists with a known count: `pop_q1` least popular … `pop_q5`; `pop_unknown` for
    artists absent from hetrec) and by modality completeness (`complete`, `missing_any`, `missing_{m}`);
  * `modality_bias`: for queries having modality m (resp. lacking it), the share of their top-k
    artists that have m, beside m's base rate in the catalogue.
`evaluate_catalogue` runs the whole protocol for every system, `write_tables` writes its report.
All functions are numpy; the catalogue is small (thousands), so scores are one dense matrix.
"""

from __future__ import annotations

import json
import pathlib
from typing import Mapping, Sequence

import numpy as np

from mmcl.eval import finite as finite_lib
from mmcl.eval import metrics as metrics_lib


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """x: [N, D] → rows of unit norm (zero rows stay zero), float32: the exact host (numpy) division
  of the baseline tables. `mmcl.models.layers.l2_normalize` (rsqrt with ε, on device) rounds
  differently, and on these tables that reorders near-ties (NDCG of the concatenation baseline
  moves by up to 1e-3), so the baselines keep this one."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.where(norm > 0, norm, 1.0)


def rank_catalogue(query_emb: np.ndarray, query_ok: np.ndarray, query_index: np.ndarray,
                   corpus_emb: np.ndarray, corpus_ok: np.ndarray, k: int) -> np.ndarray:
  """Top-k catalogue artists per query by inner product, the query itself left out.

  Args:
    query_emb: [Q, D] float. query_ok: [Q] bool (False → nothing retrieved).
    query_index: [Q] int, each query's own catalogue index (excluded from its list).
    corpus_emb: [N, D] float. corpus_ok: [N] bool (False → never retrieved).
    k: list length.

  Returns:
    [Q, k] int64 catalogue indices, best first; -1 pads (no embedding, or fewer candidates).
  """
  query_emb = np.asarray(query_emb, np.float32)
  corpus_emb = np.asarray(corpus_emb, np.float32)
  q, n = query_emb.shape[0], corpus_emb.shape[0]
  if query_emb.ndim != 2 or corpus_emb.ndim != 2 or query_emb.shape[1] != corpus_emb.shape[1]:
    raise ValueError(f"rank_catalogue: expected queries [Q, D] and corpus [N, D], got "
                     f"{query_emb.shape} and {corpus_emb.shape}")
  if np.shape(query_ok) != (q,) or np.shape(query_index) != (q,) or np.shape(corpus_ok) != (n,):
    raise ValueError(f"rank_catalogue: expected query_ok/query_index [{q}] and corpus_ok [{n}], "
                     f"got {np.shape(query_ok)}, {np.shape(query_index)}, {np.shape(corpus_ok)}")
  scores = query_emb @ corpus_emb.T
  scores[:, ~np.asarray(corpus_ok, bool)] = -np.inf
  scores[np.arange(q), np.asarray(query_index)] = -np.inf
  # Stable descending order: ties go to the lower catalogue index.
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  top = np.take_along_axis(scores, order, axis=1)
  order = np.where(np.isfinite(top), order, -1)
  if order.shape[1] < k:  # a catalogue smaller than k: pad the lists
    order = np.pad(order, ((0, 0), (0, k - order.shape[1])), constant_values=-1)
  order[~np.asarray(query_ok, bool)] = -1
  return order.astype(np.int64)


def popularity_buckets(listeners: np.ndarray, query_index: np.ndarray,
                       num_buckets: int = 5) -> np.ndarray:
  """[Q] labels `pop_q1`..`pop_q{num_buckets}` or `pop_unknown` (count 0: not in the listening
  data).

  Buckets are equal-count slices of the catalogue artists with a known count, ordered by
  (listeners, catalogue index): counts are small integers with many ties (a fifth of the artists
  have 1-3 listeners), and quantile edges would merge the lowest buckets.
  """
  listeners = np.asarray(listeners, np.int64)
  known = np.flatnonzero(listeners > 0)
  order = known[np.lexsort((known, listeners[known]))]
  bucket = np.full(listeners.shape[0], -1, np.int64)
  bucket[order] = np.arange(order.size) * num_buckets // max(order.size, 1)
  return np.asarray([f"pop_q{int(bucket[i]) + 1}" if bucket[i] >= 0 else "pop_unknown"
                     for i in query_index], dtype=object)


def retrieval_metrics(ranked: np.ndarray, gold: np.ndarray, *, corpus_size: int,
                      ks: Sequence[int], coverage_ks: Sequence[int],
                      groups: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
  """Flat metrics of one run.

  Args:
    ranked: [Q, K] int64 catalogue indices (-1 pads), K ≥ max(ks).
    gold: [Q, G] int64 relevant catalogue indices per query (-1 pads).
    corpus_size: N, for coverage.
    ks: cutoffs of ndcg@k and recall@k. coverage_ks: cutoffs of coverage@k.
    groups: name → [Q] bool query subsets (e.g. "pop_q1", "missing_any"); their metrics are
      reported as "{name}/{metric}" (coverage over the subset's lists) with "{name}/num_queries".

  Returns:
    {metric: float}.
  """
  qrels = metrics_lib.Qrels.from_positives(gold)
  names = [f"ndcg@{k}" for k in ks] + [f"recall@{k}" for k in ks]
  per_query = metrics_lib.per_query_metrics(ranked, qrels, names)
  out = {m: metrics_lib.mean_over_judged(v) for m, v in per_query.items()}
  for k in coverage_ks:
    out[f"coverage@{k}"] = metrics_lib.coverage_at_k(ranked, k, corpus_size)
  out["num_queries"] = float(ranked.shape[0])
  for name, mask in (groups or {}).items():
    mask = np.asarray(mask, bool)
    out[f"{name}/num_queries"] = float(mask.sum())
    if not mask.any():
      continue
    for m, v in per_query.items():
      out[f"{name}/{m}"] = metrics_lib.mean_over_judged(v[mask])
    for k in coverage_ks:
      out[f"{name}/coverage@{k}"] = metrics_lib.coverage_at_k(ranked[mask], k, corpus_size)
  return out


def query_groups(available: Mapping[str, np.ndarray], listeners: np.ndarray,
                 query_index: np.ndarray, num_buckets: int = 5) -> dict[str, np.ndarray]:
  """Named [Q] bool query subsets: popularity buckets, `complete`, `missing_any`, `missing_{m}`.

  Args:
    available: modality → [N] bool over the catalogue.
    listeners: [N] int. query_index: [Q] int catalogue indices.
  """
  pop = popularity_buckets(listeners, query_index, num_buckets)
  groups = {label: pop == label for label in sorted(set(pop.tolist()))}
  has = np.stack([np.asarray(a, bool)[query_index] for a in available.values()], 1)
  groups["complete"] = has.all(1)
  groups["missing_any"] = ~has.all(1)
  for j, m in enumerate(available):
    groups[f"missing_{m}"] = ~has[:, j]
  return groups


def modality_bias(ranked: np.ndarray, available: Mapping[str, np.ndarray],
                  query_index: np.ndarray, k: int) -> dict[str, float]:
  """For each modality m: share of the top-k artists that have m, for queries with and without
  m, beside m's catalogue base rate ("bias/{m}/share_if_query_has", "bias/{m}/share_if_query_lacks",
  "bias/{m}/base_rate").

  Args:
    ranked: [Q, K] int64 (-1 pads). available: modality → [N] bool. query_index: [Q] int.
  """
  top = ranked[:, :k]
  out = {}
  for m, avail in available.items():
    avail = np.asarray(avail, bool)
    has_m = np.where(top >= 0, avail[np.maximum(top, 0)], False)
    counted = (top >= 0).sum(1)
    q_has = avail[query_index]
    for label, sel in (("has", q_has), ("lacks", ~q_has)):
      denom = counted[sel].sum()
      out[f"bias/{m}/share_if_query_{label}"] = (float(has_m[sel].sum() / denom) if denom
                                                 else float("nan"))
    out[f"bias/{m}/base_rate"] = float(avail.mean())
  return out


def pca_project(x: np.ndarray, fit_rows: np.ndarray, dim: int) -> np.ndarray:
  """x: [N, D] → [N, dim] float32: centred on and projected onto the top principal axes of
  `x[fit_rows]` (the SVD of the centred fit rows); dim ≥ D returns x unchanged."""
  x = np.asarray(x, np.float64)
  if dim >= x.shape[1]:
    return x.astype(np.float32)
  fit = x[np.asarray(fit_rows)]
  mean = fit.mean(0)
  _, _, vt = np.linalg.svd(fit - mean, full_matrices=False)
  return ((x - mean) @ vt[:dim].T).astype(np.float32)


def baseline_embeddings(vectors: Mapping[str, np.ndarray], available: Mapping[str, np.ndarray],
                        fit_rows: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The raw-embedding baselines: name → (embeddings [N, D] float32, has_embedding [N] bool).

  * `raw_{m}`: modality m's raw vector, L2-normalised (only artists with m);
  * `concat`: the L2-normalised raw vectors of all modalities side by side, zeros where missing,
    L2-normalised;
  * `average`: each modality PCA-projected to the smallest modality dimension (fitted on
    `fit_rows` that have it), L2-normalised, averaged over the available ones, re-normalised.
  """
  out = {}
  names = list(vectors)
  for m in names:
    out[f"raw_{m}"] = (l2_normalize(vectors[m]), np.asarray(available[m], bool))
  parts = [l2_normalize(vectors[m]) * np.asarray(available[m], np.float32)[:, None] for m in names]
  any_avail = np.any([np.asarray(available[m], bool) for m in names], axis=0)
  out["concat"] = (l2_normalize(np.concatenate(parts, 1)), any_avail)
  dim = min(v.shape[1] for v in vectors.values())
  fit_rows = np.asarray(fit_rows)
  total = np.zeros((next(iter(vectors.values())).shape[0], dim), np.float32)
  for m in names:
    avail = np.asarray(available[m], bool)
    rows = fit_rows[avail[fit_rows]]
    proj = l2_normalize(pca_project(vectors[m], rows, dim))
    total += proj * avail[:, None]
  out["average"] = (l2_normalize(total), any_avail)
  return out


def markdown_table(results: Mapping[str, Mapping[str, float]], columns: Sequence[str]) -> str:
  """A Markdown table: one row per system, the given metric columns (4 decimals)."""
  lines = ["| system | " + " | ".join(columns) + " |",
           "|---|" + "---:|" * len(columns)]
  for name, row in results.items():
    cells = []
    for c in columns:
      v = row.get(c)
      cells.append("—" if v is None or (isinstance(v, float) and np.isnan(v)) else
                   (f"{int(v)}" if c.endswith("num_queries") else f"{v:.4f}"))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def evaluate_catalogue(net, params, cat: Mapping[str, np.ndarray], catalogue: Mapping, t,
                       where: str) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
  """Every system's retrieval of the `task.eval_queries` artists against the catalogue.

  net: `model.ArtistProjectors`; cat: the catalogue split ({m} [N, d_m], has_{m} [N]);
  catalogue: metadata["catalogue"] (gold [N, K], role [N], listeners [N]); t: the `task` config;
  where: the dataset, named in errors. Systems: the trained embedding ("contrastive", the mean of
  the available projected modalities, re-normalised), each modality's projection alone and the
  raw baselines; then the query-modality × corpus-modality matrix in the shared space.
  Returns (per-system metrics, every metric flat "<system>/<metric>", "matrix/<q>-><c>/...").
  """
  modalities = net.modalities
  gold = np.asarray(catalogue["gold"], np.int64)
  roles = np.asarray(catalogue["role"])
  listeners = np.asarray(catalogue["listeners"], np.int64)
  queries = np.flatnonzero(roles == t.eval_queries)
  n = gold.shape[0]
  if cat["has_" + modalities[0]].shape[0] != n:
    raise ValueError(f"{where}: catalogue split has {cat['has_' + modalities[0]].shape[0]} rows, "
                     f"metadata {n}")
  avail = {m: cat[f"has_{m}"] for m in modalities}
  proj = net.embed_catalogue(params, cat)
  finite_lib.require_scorable({f"{m} projector (catalogue rows with {m})": proj[m][avail[m]]
                               for m in modalities})
  # Mean of the available projected modalities, re-normalised.
  fused = l2_normalize(sum(proj[m] * avail[m][:, None] for m in modalities))
  any_avail = np.any([avail[m] for m in modalities], axis=0)
  kmax = max(max(t.eval_ks), max(t.coverage_ks), t.bias_k)
  groups = query_groups(avail, listeners, queries)

  systems: dict[str, tuple[np.ndarray, np.ndarray]] = {"contrastive": (fused, any_avail)}
  for m in modalities:
    systems[f"contrastive_{m}_only"] = (proj[m], avail[m])
  if t.baselines:
    fit_rows = np.flatnonzero(roles == "train")
    systems.update(baseline_embeddings({m: cat[m] for m in modalities}, avail, fit_rows))
  results: dict[str, dict[str, float]] = {}
  flat: dict[str, float] = {}
  for name, (emb, ok) in systems.items():
    ranked = rank_catalogue(emb[queries], ok[queries], queries, emb, ok, kmax)
    r = retrieval_metrics(ranked, gold[queries], corpus_size=n, ks=t.eval_ks,
                          coverage_ks=t.coverage_ks, groups=groups)
    if name == "contrastive":
      r.update(modality_bias(ranked, avail, queries, t.bias_k))
    results[name] = r
    flat.update({f"{name}/{k}": v for k, v in r.items()})

  # Query-modality × corpus-modality matrix in the shared space (gold restricted to the corpus
  # artists that have the corpus modality; queries need the query modality).
  for qm in modalities:
    for cm in modalities:
      qsel = queries[avail[qm][queries]]
      g = np.where(avail[cm][np.maximum(gold[qsel], 0)] & (gold[qsel] >= 0), gold[qsel], -1)
      ranked = rank_catalogue(proj[qm][qsel], np.ones(len(qsel), bool), qsel, proj[cm],
                              avail[cm], kmax)
      r = retrieval_metrics(ranked, g, corpus_size=n, ks=(10,), coverage_ks=(10,))
      for k in ("ndcg@10", "recall@10", "num_queries"):
        flat[f"matrix/{qm}->{cm}/{k}"] = r[k]
  flat["num_catalogue"] = float(n)
  flat["num_queries"] = float(len(queries))
  return results, flat


def write_tables(out_dir: str, results: Mapping[str, Mapping[str, float]],
                 flat: Mapping[str, float], modalities: Sequence[str], bias_k: int) -> None:
  """artist_retrieval.md (systems, popularity buckets, modality matrix and bias) and
  artist_retrieval.json (every system's metrics) in out_dir."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  cols = ["ndcg@10", "recall@10", "coverage@10", "ndcg@200", "recall@50", "recall@200",
          "pop_q1/ndcg@10", "pop_q1/recall@10", "missing_any/ndcg@10", "missing_any/recall@10"]
  parts = ["## Systems\n", markdown_table(results, cols), "\n\n## By popularity\n"]
  buckets = sorted({k.split("/")[0] for r in results.values() for k in r if k.startswith("pop_")})
  pop_cols = [f"{b}/ndcg@10" for b in buckets] + [f"{b}/num_queries" for b in buckets]
  parts += [markdown_table(results, pop_cols), "\n\n## Modality matrix (ndcg@10)\n"]
  ms = modalities
  parts.append("| query \\ corpus | " + " | ".join(ms) + " |\n|---|" + "---:|" * len(ms))
  for qm in ms:
    parts.append(f"\n| {qm} | " + " | ".join(f"{flat[f'matrix/{qm}->{cm}/ndcg@10']:.4f}"
                                             for cm in ms) + " |")
  parts.append("\n\n## Modality bias (contrastive, top-%d)\n" % bias_k)
  for m in ms:
    r = results["contrastive"]
    parts.append(f"- {m}: share with {m} = {r[f'bias/{m}/share_if_query_has']:.3f} (query has "
                 f"{m}), {r[f'bias/{m}/share_if_query_lacks']:.3f} (query lacks it); base rate "
                 f"{r[f'bias/{m}/base_rate']:.3f}\n")
  (out / "artist_retrieval.md").write_text("".join(parts) + "\n")
  (out / "artist_retrieval.json").write_text(json.dumps(results, indent=1, sort_keys=True))
