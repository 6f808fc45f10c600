"""MovieLens `.dat` dumps (ml-1m, ml-10m): `ratings.dat` = `UserID::MovieID::Rating::Timestamp`
and optional `movies.dat` = `MovieID::Title::Genres` (genres `|`-separated). The ml-1m files are
ISO-8859-1 encoded; `encoding` overrides.

Every rating is an interaction (as in SASRec's ml-1m); `min_rating` keeps only ratings >= it. A
negative rating is an error naming file and line (MovieLens ratings are 0.5–5 stars) unless
`allow_negative_ratings` is set.
Each user's items are sorted by timestamp (ties keep file order). With `movies.dat`, item indices
follow its row order and item text is "Title. Genre, Genre"; a rating of a movie it does not list
is an error (unknown item id). Without it, indices follow first appearance.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from data_pipelines.converters import common
from data_pipelines.converters import interactions


def _split(line: str, n: int, path: os.PathLike, line_no: int, what: str) -> list[str]:
  parts = line.rstrip("\r\n").split("::")
  if len(parts) != n:
    raise common.ConversionError(path, line_no, None,
                                 f"expected {n} `::`-separated fields ({what}), found {len(parts)}")
  return parts


def read(ratings: str | os.PathLike, movies: str | os.PathLike | None = None, *,
         encoding: str = "latin-1", min_rating: float | None = None,
         allow_negative_ratings: bool = False) -> interactions.InteractionData:
  ratings = common.require_file(ratings, "a MovieLens ratings.dat")
  vocab = interactions.ItemVocabulary()
  texts = None
  if movies is not None:
    movies = common.require_file(movies, "a MovieLens movies.dat")
    texts = []
    with common.open_text(movies, encoding) as fp:
      for line_no, line in enumerate(fp, 1):
        if not line.strip():
          continue
        movie_id, title, genres = _split(line, 3, movies, line_no, "MovieID::Title::Genres")
        common.parse_int(movie_id, movies, line_no, "MovieID")
        if vocab.get(movie_id) is not None:
          raise common.ConversionError(movies, line_no, "MovieID", f"movie {movie_id} twice")
        vocab.add(movie_id)
        genre_text = ", ".join(g for g in genres.split("|") if g)
        texts.append(f"{title.strip()}. {genre_text}" if genre_text else title.strip())
  rows = []
  with common.open_text(ratings, encoding) as fp:
    for line_no, line in enumerate(fp, 1):
      if not line.strip():
        continue
      user, movie, rating, ts = _split(line, 4, ratings, line_no,
                                       "UserID::MovieID::Rating::Timestamp")
      common.parse_int(user, ratings, line_no, "UserID")
      common.parse_int(movie, ratings, line_no, "MovieID")
      r = common.parse_float(rating, ratings, line_no, "Rating")
      if r < 0 and not allow_negative_ratings:
        raise common.ConversionError(ratings, line_no, "Rating",
                                     f"negative rating {rating.strip()} (pass "
                                     "--allow-negative-ratings if the scale has them)")
      t = common.parse_int(ts, ratings, line_no, "Timestamp")
      if min_rating is not None and r < min_rating:
        continue
      if movies is not None:
        idx = vocab.get(movie)
        if idx is None:
          raise common.ConversionError(ratings, line_no, "MovieID",
                                       f"unknown item id {movie} (not in {movies})")
      else:
        idx = vocab.add(movie)
      rows.append((user, idx, float(t), line_no))
  if not rows:
    raise common.ConversionError(ratings, None, None, "no ratings")
  users, seqs = interactions.group_by_user(rows)
  return interactions.InteractionData(user_ids=users, sequences=seqs, item_ids=vocab.ids,
                                      item_text=texts)


def convert(input: str | os.PathLike, output: str | os.PathLike, *, split_by: str | None = None,
            num_shards: int = 4, encoding: str = "latin-1", min_rating: float | None = None,
            allow_negative_ratings: bool = False, **unused: Any) -> dict[str, Any]:
  """`--format movielens`: INPUT is the folder holding ratings.dat (movies.dat used when present)
  or the ratings.dat file itself."""
  common.parse_split_by(split_by, "leave-one-out")
  p = pathlib.Path(input)
  ratings = p / "ratings.dat" if p.is_dir() else p
  movies = ratings.with_name("movies.dat")
  movies = movies if movies.is_file() else None
  source = {"converter": "movielens", "input": str(input), "num_shards": num_shards,
            "encoding": encoding, "min_rating": min_rating,
            "allow_negative_ratings": allow_negative_ratings,
            "inputs": common.input_digest([ratings] + ([movies] if movies else []))}
  existing = common.existing_if_current(output, source)
  if existing is not None:
    return existing
  data = read(ratings, movies, encoding=encoding, min_rating=min_rating,
              allow_negative_ratings=allow_negative_ratings)
  return interactions.write_interactions(output, data, source=source, num_shards=num_shards)
