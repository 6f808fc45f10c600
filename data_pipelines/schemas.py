"""The five example kinds mmcl trains on: record schemas (field names, kinds, dtypes, shapes).

Every converter in `data_pipelines.converters` writes one of these kinds into ArrayRecord shards
(`data_pipelines.records`), and records it as `metadata["kind"]`; the pipelines in
`data_pipelines.pipelines` pick their transforms by that name. Field kinds and their decoded
dtypes are those of `records` (text → str, int → int, float → float, int32_sequence → int32 [n],
float32_array → float32 of a fixed shape, image_bytes / audio_bytes → the encoded file as bytes).

1. ``image_text`` — image–text pairs (split names chosen by the converter, e.g. train/test)::

     id           text            source identifier (an id column, or the image's file name)
     image        image_bytes     encoded JPEG/PNG/WebP, any size (decoded + cropped by the pipeline)
     caption      text            the caption
     caption_ids  int32_sequence  [n] caption ids `[BOS] ... [EOS]` (the dataset's tokenizer.json)

   Batches (`pipelines`): image [b, S, S, 3] float32 (CLIP mean/std), text [b, L] int32, index [b].

2. ``query_document`` — multi-field query–document–score triples (Marqo-GS-10M and similar;
   splits = the source's splits, e.g. in_domain / novel_document / novel_query / zero_shot)::

     query_id, query      text            the query and its id
     query_ids            int32_sequence  [n] tokenized query
     product_id, title    text            the document and its title
     title_ids            int32_sequence  [n] tokenized title
     image_path           text            the document image's path as given by the source ('' if none)
     image                image_bytes     the document image (only when the converter was given the
                                          image root; see `metadata["has_images"]`)
     position             int             rank of the document for the query (1 = top)
     score_linear         float           graded relevance, linear in the rank
     score_reciprocal     float           graded relevance, reciprocal of the rank

3. ``entity`` — per-entity multimodal embeddings with missing modalities (e.g. artists). For
   each modality m listed in `metadata["modalities"]` (name → dim D_m)::

     id      text                  entity id (unique)
     name    text                  display name ('' when unknown)
     {m}     float32_array [D_m]   the modality's embedding; all zeros when not available
     has_{m} int                   1 when the entity has modality m, else 0 (availability bit)

4. ``audio_clip`` — audio clips with labels::

     id            text            clip id (the audio file's path relative to the audio root)
     audio         audio_bytes     encoded WAV/FLAC/OGG/MP3 file, as given
     sample_rate   int             native sample rate (Hz)
     num_channels  int             native channel count
     num_frames    int             native length in samples per channel
     key           int             0..23 = pitch class (C=0 ... B=11) + 12·minor; -1 = unknown
     tempo         float           beats per minute; -1.0 = unknown
     tags          int32_sequence  [n] tag ids into `metadata["tag_names"]` (genre, style, ...)

5. ``interactions`` — user interaction sequences whose items carry content. Two splits with
   their own schemas (`metadata["splits"][s]["schema"]`):

   ``sequences`` (one record per user)::

     user_id  text            the source's user id
     items    int32_sequence  [n] item indices in 1..num_items, oldest first (0 is padding)

   ``items`` (record i = item index i + 1, so `items[j - 1]` describes item index j)::

     item_index  int             1..num_items
     item_id     text            the source's item id (e.g. ASIN or MovieLens id)
     text        text            item text (title, categories, brand, ...; '' when none)
     text_ids    int32_sequence  [n] tokenized text
     attributes  int32_sequence  [k] attribute ids (S3-Rec item2attributes; empty when none)

   Train/validation/test follow leave-one-out (`sequences.leave_one_out`): train on prefixes
   of items[:-2], validation target = items[-2], test target = items[-1]. Optional image/audio
   item features are attached from a precomputed-embeddings file keyed by `item_id`
   (`pipelines.item_feature_table`).
"""

from __future__ import annotations

from typing import Mapping

from data_pipelines.records import Field

IMAGE_TEXT = "image_text"
QUERY_DOCUMENT = "query_document"
ENTITY = "entity"
AUDIO_CLIP = "audio_clip"
INTERACTIONS = "interactions"
KINDS = (IMAGE_TEXT, QUERY_DOCUMENT, ENTITY, AUDIO_CLIP, INTERACTIONS)

KEY_NAMES = tuple(f"{tonic} {mode}" for mode in ("major", "minor")
                  for tonic in ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"))
"""Key label names by id: 0..11 = C..B major, 12..23 = C..B minor."""


def image_text_schema() -> tuple[Field, ...]:
  return (Field("id", "text"), Field("image", "image_bytes"), Field("caption", "text"),
          Field("caption_ids", "int32_sequence"))


def query_document_schema(*, with_images: bool) -> tuple[Field, ...]:
  fields = [Field("query_id", "text"), Field("query", "text"),
            Field("query_ids", "int32_sequence"), Field("product_id", "text"),
            Field("title", "text"), Field("title_ids", "int32_sequence"),
            Field("image_path", "text")]
  if with_images:
    fields.append(Field("image", "image_bytes"))
  fields += [Field("position", "int"), Field("score_linear", "float"),
             Field("score_reciprocal", "float")]
  return tuple(fields)


def entity_schema(modalities: Mapping[str, int]) -> tuple[Field, ...]:
  """modalities: name → embedding dim D_m (names must be identifiers, not id/name)."""
  fields = [Field("id", "text"), Field("name", "text")]
  for m, dim in modalities.items():
    if not m.isidentifier() or m in ("id", "name") or m.startswith("has_"):
      raise ValueError(f"modality name {m!r} must be an identifier other than id/name/has_*")
    fields += [Field(m, "float32_array", (int(dim),)), Field(f"has_{m}", "int")]
  return tuple(fields)


def audio_clip_schema() -> tuple[Field, ...]:
  return (Field("id", "text"), Field("audio", "audio_bytes"), Field("sample_rate", "int"),
          Field("num_channels", "int"), Field("num_frames", "int"), Field("key", "int"),
          Field("tempo", "float"), Field("tags", "int32_sequence"))


def sequence_schema() -> tuple[Field, ...]:
  return (Field("user_id", "text"), Field("items", "int32_sequence"))


def item_schema() -> tuple[Field, ...]:
  return (Field("item_index", "int"), Field("item_id", "text"), Field("text", "text"),
          Field("text_ids", "int32_sequence"), Field("attributes", "int32_sequence"))


def parse_key(label: str) -> int:
  """'D minor' / 'D min' / 'Db major' / 'f# minor' → key id (see KEY_NAMES); ValueError otherwise."""
  parts = label.strip().split()
  if len(parts) != 2:
    raise ValueError(f"key label {label!r}: expected '<tonic> <major|minor>'")
  tonic, mode = parts[0].strip(), parts[1].strip().lower()
  names = {"c": 0, "d": 2, "e": 4, "f": 5, "g": 7, "a": 9, "b": 11}
  if not tonic or tonic[0].lower() not in names:
    raise ValueError(f"key label {label!r}: unknown tonic {tonic!r}")
  pc = names[tonic[0].lower()]
  for accidental in tonic[1:]:
    if accidental in "#♯":
      pc += 1
    elif accidental in "b♭":
      pc -= 1
    else:
      raise ValueError(f"key label {label!r}: unknown accidental {accidental!r}")
  if mode in ("major", "maj"):
    minor = 0
  elif mode in ("minor", "min"):
    minor = 1
  else:
    raise ValueError(f"key label {label!r}: mode must be major/minor, got {mode!r}")
  return pc % 12 + 12 * minor
