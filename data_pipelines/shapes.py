"""Procedurally generated image–caption pairs with planted structure ("shapes").

The quickstart's built-in dataset: every example is a pure function of ``(seed, split, index)``
(`np.random.default_rng([seed, split_id, index])`), so generation is deterministic, needs no
download and can be restarted or parallelised at any index.

Planted structure
-----------------
An image of ``image_size × image_size`` RGB pixels (default 32) shows, on a uniform background,
between 1 and ``max_objects`` (default 3) flat-coloured objects. The canvas is split into a 3×3
grid of cells; every object occupies its own cell (no two objects share a cell) and is drawn
centred in it, jittered by up to 10% of a cell. `sample_scene` draws the attributes and caption,
`render_scene` the pixels (so a scene and its caption do not depend on the image size). All
attributes are drawn independently and uniformly:

  =============  =====================================================================
  attribute      values (index = value stored in the record)
  =============  =====================================================================
  background     0 black, 1 gray, 2 white, 3 brown
  num_objects    1 .. max_objects ("count")
  shape          0 circle, 1 square, 2 triangle, 3 cross           (per object)
  color          0 red, 1 green, 2 blue, 3 yellow, 4 purple, 5 cyan (per object)
  size           0 small (radius 0.28 cell), 1 large (radius 0.45 cell) (per object)
  position       cell = 3 * row + column, row 0 = top, column 0 = left (per object)
  =============  =====================================================================

With 3 objects there are 4 · C(9,3) · 48³ ≈ 3.7·10⁷ distinct scenes of 3 objects alone, so
captions identify images almost uniquely: on 1,000 held-out pairs nearly every caption is unique,
and text→image retrieval is limited by what the model learns, not by ties. Coarse cues
(background, colours present, number of objects) are learnable within minutes; shape, size and
position need more training — a graded signal.

Caption grammar
---------------
Objects are listed in reading order (by cell: top row first, left to right)::

  caption  := COUNT " on a " BACKGROUND " background: " OBJECTS "."
  COUNT    := "one shape" | "two shapes" | "three shapes" | ...
  OBJECTS  := OBJ | OBJ " and " OBJ | OBJ ", " OBJ ", " ... " and " OBJ
  OBJ      := "a " SIZE " " COLOR " " SHAPE " at the " POSITION
  POSITION := "top left" | "top" | "top right" | "left" | "center" | "right"
            | "bottom left" | "bottom" | "bottom right"

Example: ``"two shapes on a gray background: a large red circle at the top left and a small
blue cross at the bottom."``

Record fields produced by :func:`generate_example` (object arrays are padded with -1 beyond
``num_objects``; K = ``max_objects``):

  image: [H, W, 3] uint8;  caption: str;  background: int;  num_objects: int;
  object_shape, object_color, object_size, object_position: [K] int32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GENERATOR_VERSION = 1
"""Bump whenever the rendering or the grammar changes: it is part of the dataset's metadata, so a
rebuild is triggered instead of silently mixing two versions."""

SPLIT_IDS = {"train": 0, "test": 1, "validation": 2}
"""Split name → integer stream id mixed into the per-example seed."""

BACKGROUNDS = ("black", "gray", "white", "brown")
BACKGROUND_RGB = ((0, 0, 0), (128, 128, 128), (255, 255, 255), (110, 70, 30))
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
COLOR_RGB = ((230, 25, 25), (30, 190, 40), (35, 70, 235), (245, 215, 20), (150, 45, 200),
             (20, 210, 220))
SIZES = ("small", "large")
SIZE_RADIUS = (0.28, 0.45)  # Half-extent of the shape, in units of one grid cell.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GRID = 3

OBJECT_FIELDS = ("object_shape", "object_color", "object_size", "object_position")


def vocabulary() -> dict[str, tuple[str, ...]]:
  """Names of every attribute value, indexed by the integer stored in the records."""
  return {"background": BACKGROUNDS, "shape": SHAPES, "color": COLORS, "size": SIZES,
          "position": POSITIONS}


def _check_image_size(image_size: int) -> None:
  if not isinstance(image_size, (int, np.integer)) or image_size < 12:
    raise ValueError(f"shapes: image_size must be an int >= 12 (3x3 grid of >= 4 px cells), "
                     f"got {image_size!r}")


def _check_max_objects(max_objects: int) -> None:
  if not isinstance(max_objects, (int, np.integer)) or not 1 <= max_objects <= GRID * GRID:
    raise ValueError(f"shapes: max_objects must be an int in [1, {GRID * GRID}], "
                     f"got {max_objects!r}")


def object_mask(shape: int, cy: float, cx: float, radius: float, image_size: int) -> np.ndarray:
  """Pixels covered by one shape.

  Args:
    shape: index into `SHAPES`.
    cy, cx: centre in pixel coordinates (pixel i spans [i, i+1)).
    radius: half-extent in pixels.
    image_size: canvas side S.

  Returns:
    mask: [S, S] bool.
  """
  coords = np.arange(image_size, dtype=np.float32) + 0.5
  dy = coords[:, None] - cy
  dx = coords[None, :] - cx
  if shape == 0:  # circle
    return dx * dx + dy * dy <= radius * radius
  if shape == 1:  # square, shrunk to about the circle's area so size is a shape-free cue
    half = radius * 0.85
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)
  if shape == 2:  # upward triangle: apex at the top, base at the bottom
    t = (dy + radius) / (2 * radius)  # 0 at apex, 1 at base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * radius)
  if shape == 3:  # plus-shaped cross; arms at least 1 px thick so small crosses stay visible
    arm = max(radius / 3.0, 0.75)
    horizontal = (np.abs(dy) <= arm) & (np.abs(dx) <= radius)
    vertical = (np.abs(dx) <= arm) & (np.abs(dy) <= radius)
    return horizontal | vertical
  raise ValueError(f"unknown shape index {shape}, expected 0..{len(SHAPES) - 1}")


def caption_for(background: int, objects: list[tuple[int, int, int, int]]) -> str:
  """Caption of a scene; `objects` = [(shape, color, size, position)] in reading order."""
  count = len(objects)
  noun = "shape" if count == 1 else "shapes"
  phrases = [f"a {SIZES[size]} {COLORS[color]} {SHAPES[shape]} at the {POSITIONS[position]}"
             for shape, color, size, position in objects]
  if count == 1:
    listed = phrases[0]
  else:
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
  return f"{COUNT_WORDS[count]} {noun} on a {BACKGROUNDS[background]} background: {listed}."


def sample_scene(seed: int, split: str, index: int, *, max_objects: int = 3) -> dict[str, Any]:
  """The attributes and caption of example `index` of `split` (no pixels); pure.

  Args:
    seed: non-negative dataset seed.
    split: one of `SPLIT_IDS` ("train", "test", "validation").
    index: non-negative example index within the split.
    max_objects: K, the largest number of objects in one image.

  Returns:
    dict with background int, objects [(shape, color, size, position)] in reading order,
    jitter [len(objects), 2] float64 (object centre offsets (dy, dx) in cell units) and caption.
  """
  if split not in SPLIT_IDS:
    raise ValueError(f"shapes: unknown split {split!r}, expected one of {sorted(SPLIT_IDS)}")
  if seed < 0 or index < 0:
    raise ValueError(f"shapes: seed and index must be >= 0, got seed={seed}, index={index}")
  _check_max_objects(max_objects)
  rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
  background = int(rng.integers(len(BACKGROUNDS)))
  num_objects = int(rng.integers(1, max_objects + 1))
  cells = np.sort(rng.choice(GRID * GRID, size=num_objects, replace=False))
  shapes = rng.integers(len(SHAPES), size=num_objects)
  colors = rng.integers(len(COLORS), size=num_objects)
  sizes = rng.integers(len(SIZES), size=num_objects)
  jitter = rng.uniform(-0.1, 0.1, size=(num_objects, 2))
  objects = [(int(shapes[k]), int(colors[k]), int(sizes[k]), int(cells[k]))
             for k in range(num_objects)]
  return {"background": background, "objects": objects, "jitter": jitter,
          "caption": caption_for(background, objects)}


def render_scene(scene: dict[str, Any], image_size: int = 32) -> np.ndarray:
  """Pixels of a scene from `sample_scene`.

  Returns:
    image: [S, S, 3] uint8, S = image_size.
  """
  _check_image_size(image_size)
  cell = image_size / GRID
  image = np.empty((image_size, image_size, 3), np.uint8)
  image[:] = BACKGROUND_RGB[scene["background"]]
  for (shape, color, size, position), (jy, jx) in zip(scene["objects"], scene["jitter"]):
    row, col = divmod(position, GRID)
    mask = object_mask(shape, (row + 0.5 + jy) * cell, (col + 0.5 + jx) * cell,
                       SIZE_RADIUS[size] * cell, image_size)
    image[mask] = COLOR_RGB[color]
  return image


def generate_example(seed: int, split: str, index: int, *, image_size: int = 32,
                     max_objects: int = 3) -> dict[str, Any]:
  """Generates example `index` of `split`; a pure function of its arguments.

  Args:
    seed: non-negative dataset seed.
    split: one of `SPLIT_IDS` ("train", "test", "validation").
    index: non-negative example index within the split.
    image_size: canvas side S in pixels (the scene does not depend on it, only its rendering).
    max_objects: K, the largest number of objects in one image.

  Returns:
    dict with image [S, S, 3] uint8, caption str, background int, num_objects int and
    object_shape / object_color / object_size / object_position [K] int32 (padded with -1).
  """
  _check_image_size(image_size)
  _check_max_objects(max_objects)
  scene = sample_scene(seed, split, index, max_objects=max_objects)
  objects = scene["objects"]
  padded = np.full((len(OBJECT_FIELDS), max_objects), -1, np.int32)
  padded[:, :len(objects)] = np.asarray(objects, np.int32).T
  example = {"image": render_scene(scene, image_size), "caption": scene["caption"],
             "background": scene["background"], "num_objects": len(objects)}
  example.update({name: padded[i] for i, name in enumerate(OBJECT_FIELDS)})
  return example


def parse_caption(caption: str) -> dict[str, Any]:
  """Inverse of `caption_for`: recovers the attributes a caption states.

  Used by tests and analysis to check that captions describe their images.

  Returns:
    dict with background int, num_objects int and objects [(shape, color, size, position)].
  """
  def index_of(names: tuple[str, ...], word: str, what: str) -> int:
    if word not in names:
      raise ValueError(f"caption {caption!r}: unknown {what} {word!r}")
    return names.index(word)

  if not caption.endswith("."):
    raise ValueError(f"caption {caption!r} does not end with '.'")
  head, sep, body = caption[:-1].partition(" background: ")
  if not sep:
    raise ValueError(f"caption {caption!r} lacks ' background: '")
  count_word, _, rest = head.partition(" ")
  background = index_of(BACKGROUNDS, rest.split(" on a ", 1)[-1], "background")
  num_objects = index_of(COUNT_WORDS, count_word, "count word")
  phrases = body.replace(" and ", ", ").split(", ")
  objects = []
  for phrase in phrases:
    words, _, position = phrase.partition(" at the ")
    _, size, color, shape = words.split(" ")
    objects.append((index_of(SHAPES, shape, "shape"), index_of(COLORS, color, "color"),
                    index_of(SIZES, size, "size"), index_of(POSITIONS, position, "position")))
  if len(objects) != num_objects:
    raise ValueError(f"caption {caption!r} says {num_objects} objects but lists {len(objects)}")
  return {"background": background, "num_objects": num_objects, "objects": objects}
