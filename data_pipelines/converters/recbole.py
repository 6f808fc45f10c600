"""RecBole atomic files: `{name}.inter` (+ optional `{name}.item`), and the sequence form
`{name}.train/.valid/.test.inter` + `{name}.text` (+ `.item2index`, `.user2index`) used by UniSRec.

Atomic files are tab-separated with a header of `name:type` cells (types token, token_seq, float,
float_seq). `.inter` needs `user_id` and `item_id` (a `timestamp` column orders each user's
items; without it file order is kept). `.item` rows give item indices in file order and the item
text: the values of its other columns (or of `text_fields`), joined with ". ".

Sequence form (UniSRec): rows `user_id  item_id_list  item_id` where `item_id_list` is the history
truncated to its last L items and `item_id` the next item; train holds one row per prefix, valid
the second-to-last target and test the last. The full sequence is rebuilt by chaining the train
rows (each extends the history by its target), then the valid and test targets, and checked
against every row. `.inter` item ids are the `.item2index` indices (0-based), so item index =
that index + 1 and `item_id` = the ASIN; `.text` rows are keyed by ASIN.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterator, Sequence

import numpy as np

from data_pipelines.converters import common
from data_pipelines.converters import interactions


def read_atomic(path: str | os.PathLike) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
  """Header field names (types dropped) and (line number, cells) rows of an atomic file."""
  path = common.require_file(path, "a RecBole atomic file")
  fp = common.open_text(path, "utf-8")
  header_line = fp.readline().rstrip("\r\n")
  if not header_line:
    fp.close()
    raise common.ConversionError(path, 1, None, "empty file (expected a `name:type` header)")
  header = []
  for cell in header_line.split("\t"):
    name, sep, kind = cell.partition(":")
    if not sep or kind not in ("token", "token_seq", "float", "float_seq"):
      fp.close()
      raise common.ConversionError(path, 1, cell, "header cells must be `name:type` with type "
                                                  "token/token_seq/float/float_seq")
    header.append(name)

  def rows() -> Iterator[tuple[int, list[str]]]:
    with fp:
      for line_no, line in enumerate(fp, 2):
        line = line.rstrip("\r\n")
        if not line:
          continue
        cells = line.split("\t")
        if len(cells) != len(header):
          raise common.ConversionError(path, line_no, None,
                                       f"{len(cells)} cells, the header has {len(header)}")
        yield line_no, cells
  return header, rows()


def _column(header: Sequence[str], name: str, path: os.PathLike) -> int:
  if name not in header:
    raise common.ConversionError(path, 1, name, f"missing column (header: {list(header)})")
  return header.index(name)


def find_atomic(input: str | os.PathLike, suffix: str) -> pathlib.Path | None:
  """`{name}{suffix}` for INPUT = a directory (its single such file) or any `{name}.*` file."""
  p = pathlib.Path(input)
  if p.is_dir():
    found = sorted(p.glob(f"*{suffix}"))
    found = [f for f in found if f.name.count(".") == suffix.count(".")]
    return found[0] if len(found) == 1 else None
  candidate = p.with_name(p.name.split(".")[0] + suffix)
  return candidate if candidate.is_file() else None


def read_inter(inter: str | os.PathLike, item: str | os.PathLike | None = None, *,
               text_fields: Sequence[str] | None = None, k_core: int = 0
               ) -> interactions.InteractionData:
  """Reads `.inter` (+ `.item`) into per-user chronological sequences."""
  inter = pathlib.Path(inter)
  vocab = interactions.ItemVocabulary()
  texts = None
  if item is not None:
    header, rows = read_atomic(item)
    id_col = _column(header, "item_id", item)
    fields = list(text_fields) if text_fields else [h for h in header if h != "item_id"]
    cols = [_column(header, f, item) for f in fields]
    texts = []
    for line_no, cells in rows:
      if vocab.get(cells[id_col]) is not None:
        raise common.ConversionError(item, line_no, "item_id", f"duplicate item {cells[id_col]!r}")
      vocab.add(cells[id_col])
      texts.append(". ".join(cells[c].strip() for c in cols if cells[c].strip()))
  header, rows = read_atomic(inter)
  u_col, i_col = _column(header, "user_id", inter), _column(header, "item_id", inter)
  t_col = header.index("timestamp") if "timestamp" in header else None
  out = []
  for line_no, cells in rows:
    if item is not None:
      idx = vocab.get(cells[i_col])
      if idx is None:
        raise common.ConversionError(inter, line_no, "item_id",
                                     f"unknown item id {cells[i_col]!r} (not in {item})")
    else:
      idx = vocab.add(cells[i_col])
    t = common.parse_float(cells[t_col], inter, line_no, "timestamp") if t_col is not None else 0.0
    out.append((cells[u_col], idx, t, line_no))
  if not out:
    raise common.ConversionError(inter, None, None, "no interactions")
  users, seqs = interactions.group_by_user(out)
  users, seqs = interactions.k_core(users, seqs, k_core)
  if k_core > 1:
    return interactions.reindex(users, seqs, vocab.ids, texts, None)
  return interactions.InteractionData(user_ids=users, sequences=seqs, item_ids=vocab.ids,
                                      item_text=texts)


def convert_atomic(input: str | os.PathLike, output: str | os.PathLike, *,
                   split_by: str | None = None, num_shards: int = 4,
                   text_fields: str | None = None, k_core: int = 0,
                   **unused: Any) -> dict[str, Any]:
  """`--format recbole`: INPUT is the dataset folder or its `.inter` file (`.item` beside it is
  used when present). `--text-fields a,b` picks the `.item` columns of the item text."""
  common.parse_split_by(split_by, "leave-one-out")
  inter = find_atomic(input, ".inter")
  if inter is None:
    raise FileNotFoundError(f"no single `{{name}}.inter` file found at {input}")
  item = find_atomic(inter, ".item")
  fields = [f for f in text_fields.split(",") if f] if text_fields else None
  source = {"converter": "recbole", "input": str(input), "num_shards": num_shards,
            "text_fields": fields, "k_core": k_core,
            "inputs": common.input_digest([inter] + ([item] if item else []))}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  data = read_inter(inter, item, text_fields=fields, k_core=k_core)
  return interactions.write_interactions(output, data, source=source, num_shards=num_shards)


# --------------------------------------------------------------------------------------------
# UniSRec sequence form.


def _read_index(path: pathlib.Path) -> dict[int, str]:
  """`.item2index` / `.user2index` (no header): `id<TAB>index` → {index: id}."""
  out: dict[int, str] = {}
  with common.open_text(path, "utf-8") as fp:
    for line_no, line in enumerate(fp, 1):
      line = line.rstrip("\r\n")
      if not line:
        continue
      parts = line.split("\t")
      if len(parts) != 2:
        raise common.ConversionError(path, line_no, None, "expected `id<TAB>index`")
      idx = common.parse_int(parts[1], path, line_no, "index")
      if idx in out:
        raise common.ConversionError(path, line_no, "index", f"index {idx} appears twice")
      out[idx] = parts[0]
  return out


def _read_seq_inter(path: pathlib.Path) -> list[tuple[int, str, list[int], int]]:
  header, rows = read_atomic(path)
  u, h, t = (_column(header, c, path) for c in ("user_id", "item_id_list", "item_id"))
  out = []
  for line_no, cells in rows:
    hist = [common.parse_int(x, path, line_no, "item_id_list") for x in cells[h].split()]
    out.append((line_no, cells[u], hist, common.parse_int(cells[t], path, line_no, "item_id")))
  return out


def read_unisrec(input: str | os.PathLike) -> interactions.InteractionData:
  """Reads `{name}.{train,valid,test}.inter` + `.text` (+ `.item2index`/`.user2index`)."""
  paths = {s: find_atomic(input, f".{s}.inter") for s in ("train", "valid", "test")}
  for s, p in paths.items():
    if p is None:
      raise FileNotFoundError(f"no `{{name}}.{s}.inter` file found at {input}")
  splits = {s: _read_seq_inter(p) for s, p in paths.items()}
  base = paths["test"].with_name(paths["test"].name.split(".")[0])
  item_index_path = base.with_name(base.name + ".item2index")
  user_index_path = base.with_name(base.name + ".user2index")
  text_path = base.with_name(base.name + ".text")
  item_names = _read_index(item_index_path) if item_index_path.is_file() else None
  user_names = _read_index(user_index_path) if user_index_path.is_file() else None
  max_hist = max(len(h) for rows in splits.values() for _, _, h, _ in rows)

  def window(seq: list[int]) -> list[int]:
    return seq[-max_hist:]

  # Chain the train rows: from the shortest history, each row's target extends the sequence.
  by_user: dict[str, dict[tuple[int, ...], tuple[int, int]]] = {}
  starts: dict[str, tuple[int, list[int]]] = {}
  for line_no, user, hist, target in splits["train"]:
    rows = by_user.setdefault(user, {})
    key = tuple(hist)
    if key in rows:
      raise common.ConversionError(paths["train"], line_no, "item_id_list",
                                   f"user {user}: two train rows with the same history")
    rows[key] = (target, line_no)
    if user not in starts or len(hist) < len(starts[user][1]):
      starts[user] = (line_no, hist)
  seqs: dict[str, list[int]] = {}
  for user, rows in by_user.items():
    seq = list(starts[user][1])
    for _ in range(len(rows)):
      nxt = rows.get(tuple(window(seq)))
      if nxt is None:
        raise common.ConversionError(paths["train"], starts[user][0], "item_id_list",
                                     f"user {user}: train rows do not chain into one sequence "
                                     f"(no row continues after {len(seq)} items)")
      seq.append(nxt[0])
    seqs[user] = seq
  for split in ("valid", "test"):
    seen = set()
    for line_no, user, hist, target in splits[split]:
      if user in seen:
        raise common.ConversionError(paths[split], line_no, "user_id", f"user {user} twice")
      seen.add(user)
      seq = seqs.setdefault(user, list(hist))
      if window(seq) != hist:
        raise common.ConversionError(paths[split], line_no, "item_id_list",
                                     f"user {user}: history differs from the train rows plus "
                                     f"earlier targets")
      seq.append(target)
  users = [u for _, u, _, _ in splits["test"]]
  missing = sorted(set(seqs) - set(users))
  if missing:
    raise common.ConversionError(paths["test"], None, "user_id",
                                 f"{len(missing)} users have train/valid rows but no test row "
                                 f"(e.g. {missing[0]})")
  all_items = {i for s in seqs.values() for i in s}
  if item_names is not None:
    num_items = len(item_names)
    if sorted(item_names) != list(range(num_items)):
      raise common.ConversionError(item_index_path, None, "index",
                                   f"indices are not exactly 0..{num_items - 1}")
    unknown = sorted(all_items - set(item_names))
    if unknown:
      raise common.ConversionError(paths["test"], None, "item_id",
                                   f"unknown item id {unknown[0]} (not in {item_index_path})")
    item_ids = [item_names[j] for j in range(num_items)]
  else:
    if min(all_items) < 0:
      raise common.ConversionError(paths["test"], None, "item_id", "negative item id")
    num_items = max(all_items) + 1
    item_ids = [str(j) for j in range(num_items)]
  texts = None
  if text_path.is_file():
    pos = {iid: j for j, iid in enumerate(item_ids)}
    texts = [""] * num_items
    header, rows = read_atomic(text_path)
    id_col, text_col = _column(header, "item_id", text_path), _column(header, "text", text_path)
    for line_no, cells in rows:
      j = pos.get(cells[id_col])
      if j is None:
        raise common.ConversionError(text_path, line_no, "item_id",
                                     f"unknown item id {cells[id_col]!r}")
      texts[j] = cells[text_col].strip()
  return interactions.InteractionData(
      user_ids=[user_names.get(int(u), u) if user_names and u.isdigit() else u for u in users],
      sequences=[np.asarray(seqs[u], np.int32) + 1 for u in users], item_ids=item_ids,
      item_text=texts)


def convert_unisrec(input: str | os.PathLike, output: str | os.PathLike, *,
                    split_by: str | None = None, num_shards: int = 4,
                    **unused: Any) -> dict[str, Any]:
  """`--format unisrec`: INPUT is the dataset folder (or any of its `{name}.*` files)."""
  common.parse_split_by(split_by, "leave-one-out")
  files = [find_atomic(input, f".{s}.inter") for s in ("train", "valid", "test")]
  if any(f is None for f in files):
    raise FileNotFoundError(f"expected `{{name}}.train/.valid/.test.inter` at {input}")
  base = files[2].with_name(files[2].name.split(".")[0])
  extra = [base.with_name(base.name + s) for s in (".text", ".item2index", ".user2index")]
  source = {"converter": "unisrec", "input": str(input), "num_shards": num_shards,
            "inputs": common.input_digest(files + [p for p in extra if p.is_file()])}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  return interactions.write_interactions(output, read_unisrec(input), source=source,
                                         num_shards=num_shards)
