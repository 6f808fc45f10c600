"""TREC run and qrels files, so any IR tool (trec_eval, ranx, pytrec_eval) can re-score an eval.

Run format, one line per retrieved item:   `qid Q0 docid rank score tag`   (rank is 1-based)
Qrels format, one line per judgment:       `qid 0 docid rel`             (rel an integer grade)

Identifiers are whitespace-free strings. By default query q is named `str(q)` and corpus item j
`str(j)`; pass `query_ids` / `doc_ids` to use dataset ids instead.

Tools re-sort each query's run by decreasing score and break ties their own way (trec_eval: by
decreasing docid), so the file reproduces our ranking exactly only when a query's scores are
distinct; `write_run(..., scores=None)` writes rank-derived scores (K + 1 - rank) that always are.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from mmcl.eval.atomic import write_text_atomic
from mmcl.eval.metrics import Qrels


def _names(ids: Sequence[str] | None, count: int, what: str) -> list[str]:
  if ids is None:
    return [str(i) for i in range(count)]
  ids = [str(i) for i in ids]
  if len(ids) < count:
    raise ValueError(f"{what}: {len(ids)} ids given, but index {count - 1} is used")
  bad = [i for i in ids if not i or any(c.isspace() for c in i)]
  if bad:
    raise ValueError(f"{what}: ids must be non-empty and whitespace-free, got {bad[:3]!r}")
  return ids


def format_run(ranked: np.ndarray, scores: np.ndarray | None = None, *,
               query_ids: Sequence[str] | None = None, doc_ids: Sequence[str] | None = None,
               tag: str = "mmcl") -> str:
  """The text of a TREC run.

  Args:
    ranked: [Q, K] int corpus indices, best first; -1 = padding (not written).
    scores: [Q, K] float scores of `ranked`, non-increasing along K; None writes K + 1 - rank.
    query_ids: Q names (default "0".."Q-1").
    doc_ids: names of corpus items (default "0".."N-1").
    tag: run name (last column).

  Returns:
    The run, one `qid Q0 docid rank score tag` line per retrieved item.
  """
  ranked = np.asarray(ranked)
  if ranked.ndim != 2:
    raise ValueError(f"write_run: expected ranked [Q, K], got shape {ranked.shape}")
  if scores is None:
    scores = np.broadcast_to(np.arange(ranked.shape[1], 0, -1, dtype=np.float64), ranked.shape)
  scores = np.asarray(scores)
  if scores.shape != ranked.shape:
    raise ValueError(f"write_run: scores {scores.shape} must match ranked {ranked.shape}")
  if not tag or any(c.isspace() for c in tag):
    raise ValueError(f"write_run: tag must be non-empty and whitespace-free, got {tag!r}")
  qnames = _names(query_ids, ranked.shape[0], "query_ids")
  dnames = _names(doc_ids, int(ranked.max(initial=-1)) + 1, "doc_ids")
  lines = []
  for q, (row, row_scores) in enumerate(zip(ranked.tolist(), scores.tolist())):
    rank = 0
    for item, score in zip(row, row_scores):
      if item < 0:
        continue
      rank += 1
      # %.9g round-trips float32 scores exactly.
      lines.append(f"{qnames[q]} Q0 {dnames[item]} {rank} {score:.9g} {tag}\n")
  return "".join(lines)


def write_run(path: str | os.PathLike, ranked: np.ndarray, scores: np.ndarray | None = None, *,
              query_ids: Sequence[str] | None = None, doc_ids: Sequence[str] | None = None,
              tag: str = "mmcl") -> pathlib.Path:
  """Writes a TREC run file atomically; arguments as in `format_run`."""
  return write_text_atomic(path, format_run(ranked, scores, query_ids=query_ids, doc_ids=doc_ids,
                                            tag=tag))


def format_qrels(qrels: Qrels, *, query_ids: Sequence[str] | None = None,
                 doc_ids: Sequence[str] | None = None) -> str:
  """The text of a TREC qrels file: one `qid 0 docid rel` line per judgment (grades must be
  integers, as trec_eval requires)."""
  if not np.all(qrels.rels == np.round(qrels.rels)):
    raise ValueError("write_qrels: TREC qrels need integer grades, found fractional ones")
  qnames = _names(query_ids, qrels.num_queries, "query_ids")
  dnames = _names(doc_ids, int(qrels.items.max(initial=-1)) + 1, "doc_ids")
  return "".join(
      f"{qnames[q]} 0 {dnames[item]} {int(rel)}\n"
      for q, item, rel in zip(qrels.query_of_entry.tolist(), qrels.items.tolist(),
                              qrels.rels.tolist()))


def write_qrels(path: str | os.PathLike, qrels: Qrels, *, query_ids: Sequence[str] | None = None,
                doc_ids: Sequence[str] | None = None) -> pathlib.Path:
  """Writes a TREC qrels file atomically; arguments as in `format_qrels`."""
  return write_text_atomic(path, format_qrels(qrels, query_ids=query_ids, doc_ids=doc_ids))


def read_run(path: str | os.PathLike) -> dict[str, dict[str, float]]:
  """Reads a TREC run: {qid: {docid: score}}, each query's items in file order.

  Raises:
    ValueError: naming the file and line of a malformed record.
  """
  run: dict[str, dict[str, float]] = {}
  for lineno, fields in _records(path, 6, "qid Q0 docid rank score tag"):
    try:
      score = float(fields[4])
      int(fields[3])
    except ValueError:
      raise ValueError(f"{path}:{lineno}: rank and score must be numbers, got {fields[3:5]}")
    docs = run.setdefault(fields[0], {})
    if fields[2] in docs:
      raise ValueError(f"{path}:{lineno}: document {fields[2]!r} listed twice for {fields[0]!r}")
    docs[fields[2]] = score
  return run


def read_qrels(path: str | os.PathLike) -> dict[str, dict[str, int]]:
  """Reads a TREC qrels file: {qid: {docid: grade}}.

  Raises:
    ValueError: naming the file and line of a malformed record.
  """
  qrels: dict[str, dict[str, int]] = {}
  for lineno, fields in _records(path, 4, "qid 0 docid rel"):
    try:
      rel = int(fields[3])
    except ValueError:
      raise ValueError(f"{path}:{lineno}: relevance must be an integer, got {fields[3]!r}")
    qrels.setdefault(fields[0], {})[fields[2]] = rel
  return qrels


def _records(path: str | os.PathLike, width: int, layout: str):
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) != width:
        raise ValueError(
            f"{path}:{lineno}: expected {width} fields `{layout}`, found {len(fields)}: {line!r}")
      yield lineno, fields


def qrels_from_trec(judgments: Mapping[str, Mapping[str, int]], query_ids: Sequence[str],
                    doc_ids: Sequence[str]) -> Qrels:
  """Converts `read_qrels` output back to a `Qrels` over the given query and document order.

  Args:
    judgments: {qid: {docid: grade}}.
    query_ids: Q names; row q of the result is `query_ids[q]`.
    doc_ids: N names; item j is `doc_ids[j]`.
  """
  doc_index = {d: j for j, d in enumerate(doc_ids)}
  rows = []
  for qid in query_ids:
    row = {}
    for doc, rel in judgments.get(qid, {}).items():
      if doc not in doc_index:
        raise ValueError(f"qrels: document {doc!r} (query {qid!r}) is not in doc_ids")
      row[doc_index[doc]] = rel
    rows.append(row)
  return Qrels.from_dict(rows)


def ranked_from_trec(run: Mapping[str, Mapping[str, float]], query_ids: Sequence[str],
                     doc_ids: Sequence[str], k: int | None = None) -> np.ndarray:
  """Converts `read_run` output to `ranked: [Q, K] int64` (sorted by decreasing score, stable in
  file order; -1 padding).

  Args:
    run: {qid: {docid: score}}.
    query_ids: Q names; row q is `query_ids[q]`.
    doc_ids: N names.
    k: K, defaults to the longest list.
  """
  doc_index = {d: j for j, d in enumerate(doc_ids)}
  rows = []
  for qid in query_ids:
    docs = run.get(qid, {})
    order = sorted(range(len(docs)), key=lambda i, s=list(docs.values()): -s[i])
    names = list(docs)
    missing = [names[i] for i in order if names[i] not in doc_index]
    if missing:
      raise ValueError(f"run: documents {missing[:3]!r} (query {qid!r}) are not in doc_ids")
    rows.append([doc_index[names[i]] for i in order])
  width = max((len(r) for r in rows), default=0) if k is None else k
  out = np.full((len(rows), width), -1, np.int64)
  for q, row in enumerate(rows):
    out[q, :min(width, len(row))] = row[:width]
  return out


def write_run_and_qrels(out_dir: str | os.PathLike, name: str, ranked: np.ndarray,
                        scores: np.ndarray | None, qrels: Qrels, *,
                        query_ids: Sequence[str] | None = None,
                        doc_ids: Sequence[str] | None = None,
                        tag: str = "mmcl") -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `out_dir/<name>.run` and `out_dir/<name>.qrels` (e.g. name "i2t") beside metrics.json.

  Args:
    out_dir: folder to write into.
    name: file stem.
    ranked: [Q, K] int corpus indices, -1 = padding.
    scores: [Q, K] float or None (see `format_run`).
    qrels: judgments of the Q queries.
    query_ids, doc_ids, tag: see `format_run`.

  Returns:
    (run path, qrels path).
  """
  out_dir = pathlib.Path(out_dir)
  return (write_run(out_dir / f"{name}.run", ranked, scores, query_ids=query_ids,
                    doc_ids=doc_ids, tag=tag),
          write_qrels(out_dir / f"{name}.qrels", qrels, query_ids=query_ids, doc_ids=doc_ids))
