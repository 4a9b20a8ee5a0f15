"""Procedurally rendered subject videos, pure numpy: the data of ``persvid_synthetic``.

No TensorFlow here (it must run on a GPU box where TF is absent): the TFDS
builder (``synthetic_tfds.py``) and the numpy pipeline both call
``render_example``.

**Subjects.** A subject is a seeded parameter vector (``Subject``): one of
``SHAPES``, two continuous RGB colours, one of ``PATTERNS`` with a continuous
scale / angle / phase, a continuous size and aspect ratio. Its parameters are
drawn from ``np.random.default_rng([seed, _SUBJECT_STREAM, subject_id])``, so
a subject id *is* an identity. Captions name the subject only coarsely
("a reddish star with bluish stripes"): the exact colours, pattern geometry
and aspect are what a concept must carry beyond words (SPEC §3, recipe notes).

**Train/test split by id range.** Train subject ``i`` has id ``i``; test
subject ``i`` has id ``TEST_ID_OFFSET + i``. The ranges never meet, so test
subjects are never seen in training, whatever the split sizes.

**Videos.** Example ``index`` of a split shows subject
``index // videos_per_subject`` (its ``index % videos_per_subject``-th video),
moving in one of ``DIRECTIONS`` (four translations, and "towards"/"away" as
growth/shrinkage) over one of ``BACKGROUNDS`` (solid colours and simple
textured scenes: grass, water, night sky, brick wall, …). The video's random
stream is ``default_rng([seed, _VIDEO_STREAM, subject_id, video])``: an
example depends on ``(seed, split, index)`` and ``videos_per_subject`` only,
not on the split sizes; and since every draw is made in frame-relative units,
the same index at another (square) resolution shows the same scene.

**Reference.** Each example carries a reference image + mask of the same
subject at another position, scale and background than the target video
(reference ≠ target, SPEC recipe notes: identical pairs teach copy-paste).

**Rendering.** Everything is drawn at ``supersample``× resolution and box-
filtered down (antialiasing); the subject only inside its per-frame bounding
box, so a ``16×32×32`` video costs a few milliseconds. Values are stored as
uint8 (``x / 127.5 - 1`` gives [-1, 1]); masks as uint8 coverage (0..255).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from typing import Any, Callable, Iterator

import numpy as np

# ----------------------------------------------------------------------------
# Vocabulary of the world. Every caption word is in
# persvid_jax.concepts.tokens.DEFAULT_WORDS (tests/data check: no <unk>).
# ----------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "heart")
PATTERNS = ("plain", "striped", "dotted", "checkered")
# The noun for the secondary colour's role ("a reddish star with bluish stripes").
_PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "checkered": "checkerboard"}
DIRECTIONS = ("left", "right", "up", "down", "towards", "away")
DIRECTION_PHRASES = ("moving left", "moving right", "moving up", "moving down",
                     "moving towards the camera", "moving away from the camera")

# Bank slot 0's placeholder, as ``persvid_jax.concepts.tokens.placeholder(0)``
# writes it (not imported: that module pulls in transformers).
PLACEHOLDER = "<c0>"

# Train ids are [0, TEST_ID_OFFSET), test ids [TEST_ID_OFFSET, ...).
TEST_ID_OFFSET = 1_000_000
SPLITS = ("train", "test")

# Independent random streams (the second entry of every rng key).
_SUBJECT_STREAM = 1
_VIDEO_STREAM = 2

# Continuous ranges of the subject parameters (also used to quantise the
# oracle caption).
SIZE_RANGE = (0.13, 0.22)            # radius, fraction of min(H, W)
ASPECT_RANGE = (0.7, 1.4)            # width / height, log-uniform
PATTERN_SCALE_RANGE = (0.8, 1.8)     # pattern cycles per subject radius
_MIN_COLOUR_DISTANCE = 0.45          # primary vs secondary, Euclidean RGB
_MIN_BACKGROUND_DISTANCE = 0.35      # subject primary vs background nominal colour


@dataclasses.dataclass(frozen=True)
class Background:
  """A named background. ``rgb`` is nominal (for contrast); ``render`` draws it."""
  name: str
  phrase: str                          # caption words, at most 4
  rgb: tuple[float, float, float]
  render: Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


def _sines(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, n: int,
           fx: tuple[float, float], fy: tuple[float, float]) -> np.ndarray:
  """Resolution-independent smooth noise in [-1, 1]: a mean of ``n`` random plane waves."""
  out = 0.0
  for _ in range(n):
    kx = rng.uniform(*fx) * rng.choice((-1, 1))
    ky = rng.uniform(*fy) * rng.choice((-1, 1))
    out = out + np.cos(2 * np.pi * (kx * x + ky * y) + rng.uniform(0, 2 * np.pi))
  return out / n


def _solid(rgb):
  def render(rng, x, y):
    base = np.clip(np.asarray(rgb) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    # A faint vertical gradient, so that "solid" is not one constant.
    shade = 1 + 0.08 * rng.uniform(-1, 1) * (y - 0.5)
    return base * shade[..., None] + 0 * x[..., None]
  return render


def _grass(rng, x, y):
  blades = _sines(rng, x, y, 6, (18, 40), (0.5, 3))          # vertical streaks
  base = np.array([0.22, 0.52, 0.16]) * rng.uniform(0.9, 1.1)
  return base * (0.8 + 0.22 * blades[..., None]) * (0.85 + 0.15 * y[..., None])


def _sand(rng, x, y):
  ripples = _sines(rng, x, y, 5, (4, 12), (4, 12))
  base = np.array([0.86, 0.76, 0.52]) * rng.uniform(0.95, 1.05)
  return base * (0.92 + 0.08 * ripples[..., None])


def _water(rng, x, y):
  wobble = 0.04 * np.sin(2 * np.pi * (3 * x + rng.uniform()))
  waves = np.cos(2 * np.pi * (rng.uniform(8, 14) * (y + wobble)))
  base = np.array([0.12, 0.38, 0.72]) * rng.uniform(0.9, 1.1)
  return base * (0.85 + 0.15 * waves[..., None]) + 0.08 * np.clip(waves, 0.8, 1)[..., None]


def _night_sky(rng, x, y):
  top, bottom = np.array([0.01, 0.02, 0.08]), np.array([0.05, 0.08, 0.24])
  img = top + (bottom - top) * y[..., None]
  for _ in range(rng.integers(8, 15)):                  # stars: small white discs
    sx, sy, r = rng.uniform(), rng.uniform(0, 0.8), rng.uniform(0.012, 0.022)
    disc = ((x - sx) ** 2 + (y - sy) ** 2) < r * r
    img = np.where(disc[..., None], 0.95, img)
  return img


def _sunset_sky(rng, x, y):
  top, mid, low = (np.array([0.30, 0.12, 0.45]), np.array([0.95, 0.45, 0.25]),
                   np.array([1.0, 0.78, 0.38]))
  y = np.clip(y + 0.05 * rng.uniform(-1, 1), 0, 1)[..., None]
  img = np.where(y < 0.55, top + (mid - top) * y / 0.55, mid + (low - mid) * (y - 0.55) / 0.45)
  return img + 0 * x[..., None]


def _brick_wall(rng, x, y):
  rows = rng.integers(5, 8)
  row_h = 1.0 / rows
  brick_w = 2.2 * row_h
  row = np.floor(y / row_h)
  xs = x / brick_w + 0.5 * (row % 2) + rng.uniform()
  col = np.floor(xs)
  tint = rng.uniform(0.85, 1.1, size=(rows + 1, int(1 / brick_w) + 4))
  brick = np.array([0.62, 0.24, 0.16]) * tint[row.astype(int), col.astype(int) % tint.shape[1]][..., None]
  mortar_x = (xs - col) * brick_w < 0.07 * row_h
  mortar_y = (y - row * row_h) < 0.1 * row_h
  return np.where((mortar_x | mortar_y)[..., None], np.array([0.78, 0.76, 0.72]), brick)


def _wooden_floor(rng, x, y):
  planks = rng.integers(4, 7)
  plank = np.floor(y * planks)
  tint = rng.uniform(0.85, 1.12, size=planks + 1)[plank.astype(int)]
  grain = np.cos(2 * np.pi * (rng.uniform(25, 40) * y + 1.5 * np.sin(2 * np.pi * (2 * x + plank / 3))))
  base = np.array([0.56, 0.35, 0.18])
  img = base * (tint * (0.9 + 0.08 * grain))[..., None]
  seam = (y * planks - plank) < 0.06
  return np.where(seam[..., None], base * 0.45, img)


def _snow(rng, x, y):
  drifts = _sines(rng, x, y, 4, (1, 4), (1, 4))
  base = np.array([0.92, 0.94, 0.98])
  return base * (0.95 + 0.04 * drifts[..., None]) - np.array([0.05, 0.03, 0.0]) * (1 - y[..., None])


BACKGROUNDS: tuple[Background, ...] = (
    Background("red", "on a red background", (0.78, 0.12, 0.12), _solid((0.78, 0.12, 0.12))),
    Background("blue", "on a blue background", (0.12, 0.25, 0.75), _solid((0.12, 0.25, 0.75))),
    Background("green", "on a green background", (0.15, 0.60, 0.20), _solid((0.15, 0.60, 0.20))),
    Background("yellow", "on a yellow background", (0.92, 0.82, 0.15), _solid((0.92, 0.82, 0.15))),
    Background("white", "on a white background", (0.95, 0.95, 0.95), _solid((0.95, 0.95, 0.95))),
    Background("black", "on a black background", (0.05, 0.05, 0.05), _solid((0.05, 0.05, 0.05))),
    Background("gray", "on a gray background", (0.50, 0.50, 0.50), _solid((0.50, 0.50, 0.50))),
    Background("grass", "on grass", (0.20, 0.45, 0.14), _grass),
    Background("sand", "on sand", (0.84, 0.74, 0.50), _sand),
    Background("water", "over water", (0.13, 0.38, 0.72), _water),
    Background("night_sky", "against a night sky", (0.04, 0.05, 0.16), _night_sky),
    Background("sunset_sky", "against a sunset sky", (0.75, 0.40, 0.32), _sunset_sky),
    Background("brick_wall", "against a brick wall", (0.62, 0.32, 0.24), _brick_wall),
    Background("wooden_floor", "on a wooden floor", (0.50, 0.31, 0.16), _wooden_floor),
    Background("snow", "on snow", (0.90, 0.92, 0.97), _snow),
)


# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """What a ``persvid_synthetic`` variant renders.

  Attributes:
    frames, height, width: video shape ``[T, H, W, 3]``.
    reference_size: the reference image is ``[R, R, 3]``.
    train_subjects, test_subjects, videos_per_subject: split sizes; a split
      has ``subjects * videos_per_subject`` examples.
    supersample: antialiasing factor; ``None`` picks 4 up to 64 px, else 2.
    max_caption_words: captions drop colour detail until they fit (14 words
      = ``config.text.max_length`` 16 of the tiny config minus BOS/EOS).
    seed: the world seed; subjects and videos are functions of it.
  """
  frames: int = 4
  height: int = 32
  width: int = 32
  reference_size: int = 32
  train_subjects: int = 64
  test_subjects: int = 16
  videos_per_subject: int = 2
  supersample: int | None = None
  max_caption_words: int = 14
  seed: int = 0

  def num_examples(self, split: str) -> int:
    """Videos in ``split`` ("train" or "test"): subjects x videos per subject."""
    subjects = {"train": self.train_subjects, "test": self.test_subjects}[_check_split(split)]
    return subjects * self.videos_per_subject

  @property
  def antialias(self) -> int:
    """Supersampling factor of the renderer (4 at <= 64 px, else 2, unless set)."""
    if self.supersample is not None:
      return self.supersample
    return 4 if max(self.height, self.width, self.reference_size) <= 64 else 2

  def replace(self, **changes) -> "SyntheticConfig":
    """A copy with ``changes`` applied (``dataclasses.replace``)."""
    return dataclasses.replace(self, **changes)


#: The named variants (the TFDS builder configs). Resolution is that of the
#: highest cascade scale (tiny: base 16 px x sr_factor 2 = 32 px); the base
#: network's input is a 2x downsample of it.
CONFIGS: dict[str, SyntheticConfig] = {
    "tiny": SyntheticConfig(frames=4, height=32, width=32, reference_size=32,
                            train_subjects=64, test_subjects=16, videos_per_subject=2),
    "small": SyntheticConfig(frames=8, height=32, width=32, reference_size=32,
                             train_subjects=256, test_subjects=32, videos_per_subject=4),
    "demo": SyntheticConfig(frames=8, height=32, width=32, reference_size=32,
                            train_subjects=2048, test_subjects=128, videos_per_subject=4),
}


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; persvid_synthetic has {SPLITS}")
  return split


# ----------------------------------------------------------------------------
# Subjects
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Subject:
  """One identity. Colours are RGB in [0, 1]; lengths in subject radii."""
  subject_id: int
  shape: int                    # index into SHAPES
  primary_rgb: tuple[float, float, float]
  secondary_rgb: tuple[float, float, float]
  pattern: int                  # index into PATTERNS
  pattern_scale: float          # cycles per subject radius
  pattern_angle: float          # radians in [0, pi)
  pattern_phase: float          # in [0, 1)
  size: float                   # radius as a fraction of min(H, W), at scale 1
  aspect: float                 # width / height

  @property
  def pattern_params(self) -> np.ndarray:
    """``[3]`` float32: scale, angle, phase."""
    return np.array([self.pattern_scale, self.pattern_angle, self.pattern_phase], np.float32)

  def vector(self) -> np.ndarray:
    """The identity as ``[13]`` float32: shape, rgb1, rgb2, pattern, scale, angle, phase, size, aspect."""
    return np.array([self.shape, *self.primary_rgb, *self.secondary_rgb, self.pattern,
                     self.pattern_scale, self.pattern_angle, self.pattern_phase,
                     self.size, self.aspect], np.float32)


def subject_id(split: str, i: int) -> int:
  """The id of the ``i``-th subject of ``split`` (train: ``i``, test: offset + ``i``)."""
  if not 0 <= i < TEST_ID_OFFSET:
    raise ValueError(f"subject index {i} out of range [0, {TEST_ID_OFFSET})")
  return i if _check_split(split) == "train" else TEST_ID_OFFSET + i


def split_of(sid: int) -> str:
  """Which split subject id ``sid`` belongs to."""
  return "train" if sid < TEST_ID_OFFSET else "test"


def _sample_colour(rng: np.random.Generator) -> tuple[float, float, float]:
  if rng.uniform() < 0.15:       # near-neutral: whites, greys, blacks
    h, s, v = rng.uniform(), rng.uniform(0, 0.12), rng.uniform(0.1, 1.0)
  else:
    h, s, v = rng.uniform(), rng.uniform(0.4, 1.0), rng.uniform(0.35, 1.0)
  return tuple(float(c) for c in colorsys.hsv_to_rgb(h, s, v))


def _distance(a, b) -> float:
  return float(np.linalg.norm(np.subtract(a, b)))


def make_subject(sid: int, seed: int = 0) -> Subject:
  """The subject with id ``sid`` in world ``seed`` (deterministic)."""
  rng = np.random.default_rng([seed, _SUBJECT_STREAM, sid])
  shape = int(rng.integers(len(SHAPES)))
  pattern = int(rng.integers(len(PATTERNS)))
  primary = _sample_colour(rng)
  secondary = _sample_colour(rng)
  while _distance(primary, secondary) < _MIN_COLOUR_DISTANCE:   # pattern must be visible
    secondary = _sample_colour(rng)
  return Subject(
      subject_id=int(sid), shape=shape, primary_rgb=primary, secondary_rgb=secondary,
      pattern=pattern,
      pattern_scale=float(rng.uniform(*PATTERN_SCALE_RANGE)),
      pattern_angle=float(rng.uniform(0, np.pi)),
      pattern_phase=float(rng.uniform()),
      size=float(rng.uniform(*SIZE_RANGE)),
      aspect=float(np.exp(rng.uniform(*np.log(ASPECT_RANGE)))))


# ----------------------------------------------------------------------------
# Geometry: inside tests and patterns in subject-local coordinates
# (u right, v up, unit = subject radius).
# ----------------------------------------------------------------------------

def _regular(n: int, r: float = 1.0, start_deg: float = 90.0) -> np.ndarray:
  a = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
  return r * np.stack([np.cos(a), np.sin(a)], -1)


def _star_polygon() -> np.ndarray:
  outer, inner = _regular(5, 1.0), _regular(5, 0.45, 90.0 + 36.0)
  return np.stack([outer, inner], 1).reshape(10, 2)


def _plus_polygon(w: float = 0.32) -> np.ndarray:
  return np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w),
                   (-1, -w), (-1, w), (-w, w), (-w, 1)], np.float64)


_POLYGONS = {"triangle": _regular(3), "star": _star_polygon(),
             "cross": _plus_polygon(), "hexagon": _regular(6, 1.0, 0.0)}


def _inside_polygon(poly: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Even-odd crossing test, vectorised over points (any simple polygon)."""
  inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
  for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
    if y1 == y2:
      continue
    crosses = (y1 > v) != (y2 > v)
    x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
    inside ^= crosses & (u < x_at)
  return inside


def inside_shape(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Whether local points ``(u, v)`` (broadcastable) lie inside ``SHAPES[shape]``."""
  name = SHAPES[shape]
  if name == "circle":
    return u * u + v * v <= 1.0
  if name == "square":
    return np.maximum(np.abs(u), np.abs(v)) <= 0.85
  if name == "diamond":
    return np.abs(u) + np.abs(v) <= 1.0
  if name == "heart":
    # The classic implicit heart (x²+y²-1)³ - x²y³ <= 0, scaled into the unit disc.
    x, y = 1.15 * u, 1.15 * v + 0.1
    return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
  return _inside_polygon(_POLYGONS[name], u, v)


def secondary_pattern(subject: Subject, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Where the secondary colour shows, at local points ``(u, v)``.

  The pattern lives in subject-local coordinates, so it moves and scales
  with the subject (part of its identity, not of the frame).
  """
  name = PATTERNS[subject.pattern]
  shape = np.broadcast_shapes(u.shape, v.shape)
  if name == "plain":
    return np.zeros(shape, bool)
  c, s = math.cos(subject.pattern_angle), math.sin(subject.pattern_angle)
  a = (u * c + v * s) * subject.pattern_scale + subject.pattern_phase
  b = (-u * s + v * c) * subject.pattern_scale + subject.pattern_phase
  if name == "striped":
    return (a - np.floor(a)) < 0.5
  if name == "dotted":
    da, db = a - np.floor(a) - 0.5, b - np.floor(b) - 0.5
    return da * da + db * db < 0.09           # dots of radius 0.3 cell
  return ((np.floor(a) + np.floor(b)) % 2) == 1   # checkered


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

def _pool(x: np.ndarray, ss: int) -> np.ndarray:
  """Box-filters the first two axes by ``ss``: ``[h*ss, w*ss, ...] -> [h, w, ...]``."""
  h, w = x.shape[0] // ss, x.shape[1] // ss
  return x.reshape(h, ss, w, ss, *x.shape[2:]).mean(axis=(1, 3))


def render_background(background: int, height: int, width: int,
                      rng: np.random.Generator, supersample: int = 4) -> np.ndarray:
  """``BACKGROUNDS[background]`` as float32 ``[H, W, 3]`` in [0, 1]."""
  ss = supersample
  y = (np.arange(height * ss) + 0.5) / (height * ss)
  x = (np.arange(width * ss) + 0.5) / (width * ss)
  img = BACKGROUNDS[background].render(rng, x[None, :], y[:, None])
  img = np.broadcast_to(img, (height * ss, width * ss, 3))
  return _pool(np.clip(img, 0, 1), ss).astype(np.float32)


def _extent(subject: Subject) -> tuple[float, float]:
  """Half-extents (x, y) in radii, covering every shape (the heart is the widest)."""
  return 1.0 * math.sqrt(subject.aspect), 1.0 / math.sqrt(subject.aspect)


def render_subject(subject: Subject, track: np.ndarray, height: int, width: int,
                   supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
  """Draws the subject at each pose of ``track``.

  Args:
    subject: the identity.
    track: ``[T, 3]`` poses ``(cx, cy, scale)``: centre as fractions of the
      width / height (y down), scale multiplies ``subject.size``.
    height, width: output frame size.
    supersample: antialiasing factor.

  Returns:
    ``alpha [T, H, W]`` coverage in [0, 1] and ``premultiplied [T, H, W, 3]``
    colour (colour × coverage), float32.
  """
  ss = supersample
  track = np.asarray(track, np.float64).reshape(-1, 3)
  alpha = np.zeros((len(track), height, width), np.float32)
  premult = np.zeros((len(track), height, width, 3), np.float32)
  c1 = np.asarray(subject.primary_rgb, np.float32)
  c2 = np.asarray(subject.secondary_rgb, np.float32)
  ex, ey = _extent(subject)
  for t, (cx, cy, scale) in enumerate(track):
    radius = subject.size * scale * min(height, width)        # pixels
    rx, ry = radius * math.sqrt(subject.aspect), radius / math.sqrt(subject.aspect)
    cxp, cyp = cx * width, cy * height
    # Bounding box in output pixels (+1 for the heart's overhang and rounding).
    x0, x1 = max(0, int(cxp - 1.2 * ex * radius) - 1), min(width, int(cxp + 1.2 * ex * radius) + 2)
    y0, y1 = max(0, int(cyp - 1.2 * ey * radius) - 1), min(height, int(cyp + 1.2 * ey * radius) + 2)
    if x0 >= x1 or y0 >= y1:
      continue
    xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
    ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
    u = ((xs - cxp) / rx)[None, :]
    v = (-(ys - cyp) / ry)[:, None]                            # v up
    inside = inside_shape(subject.shape, u, v)
    second = inside & secondary_pattern(subject, u, v)
    # Two scalar coverages instead of pooling a 3-channel colour image.
    a = _pool(inside.astype(np.float32), ss)
    a2 = _pool(second.astype(np.float32), ss)
    alpha[t, y0:y1, x0:x1] = a
    premult[t, y0:y1, x0:x1] = (a - a2)[..., None] * c1 + a2[..., None] * c2
  return alpha, premult


def subject_mask(subject: Subject, size: int, supersample: int = 4) -> np.ndarray:
  """The subject centred at scale 1 in a ``size × size`` frame: ``[size, size]`` coverage.

  For evaluation (shape IoU against a generated subject, after aligning
  centroid and scale).
  """
  alpha, _ = render_subject(subject, np.array([[0.5, 0.5, 1.0]]), size, size, supersample)
  return alpha[0]


def render_video(subject: Subject, direction: int, background: int, frames: int, height: int,
                 width: int, rng: np.random.Generator, supersample: int = 4) -> np.ndarray:
  """A video of ``subject`` moving ``DIRECTIONS[direction]`` over ``BACKGROUNDS[background]``.

  Drawn as the dataset draws one (a straight track from ``rng``), for any
  subject, motion and scene: the evaluation's ground truth for a prompt.

  Returns:
    uint8 ``[frames, height, width, 3]``.
  """
  track = _sample_track(rng, subject, direction, frames, height, width)
  bg = render_background(background, height, width, rng, supersample)
  alpha, premult = render_subject(subject, track, height, width, supersample)
  return _to_uint8(bg[None] * (1.0 - alpha[..., None]) + premult)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------
# Poses
# ----------------------------------------------------------------------------

def _margins(subject: Subject, scale: float, height: int, width: int) -> tuple[float, float]:
  """Centre margins (fractions) that keep the whole subject in frame at ``scale``."""
  ex, ey = _extent(subject)
  r = subject.size * scale * min(height, width)
  mx = min(0.5, 1.1 * ex * r / width + 0.02)
  my = min(0.5, 1.1 * ey * r / height + 0.02)
  return mx, my


def _sample_track(rng: np.random.Generator, subject: Subject, direction: int,
                  frames: int, height: int, width: int) -> np.ndarray:
  """``[T, 3]`` poses (cx, cy, scale) for a straight motion in ``DIRECTIONS[direction]``."""
  t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
  name = DIRECTIONS[direction]
  if name in ("towards", "away"):
    small = rng.uniform(0.6, 0.75)
    large = small * rng.uniform(1.6, 1.9)
    s0, s1 = (small, large) if name == "towards" else (large, small)
    scale = s0 * (s1 / s0) ** t                       # geometric: constant apparent speed
    mx, my = _margins(subject, large, height, width)
    cx = np.full_like(t, rng.uniform(mx, 1 - mx))
    cy = np.full_like(t, rng.uniform(my, 1 - my))
    return np.stack([cx, cy, scale], -1)
  s = rng.uniform(0.85, 1.15)
  mx, my = _margins(subject, s, height, width)
  horizontal = name in ("left", "right")
  lo, hi = (mx, 1 - mx) if horizontal else (my, 1 - my)
  distance = min(rng.uniform(0.3, 0.5), hi - lo)
  start = rng.uniform(lo + distance, hi) if name in ("left", "up") else rng.uniform(lo, hi - distance)
  sign = -1.0 if name in ("left", "up") else 1.0       # y grows downwards
  along = start + sign * distance * t
  p_lo, p_hi = (my, 1 - my) if horizontal else (mx, 1 - mx)
  across = np.full_like(t, rng.uniform(p_lo, p_hi))
  cx, cy = (along, across) if horizontal else (across, along)
  return np.stack([cx, cy, np.full_like(t, s)], -1)


def _sample_reference_pose(rng: np.random.Generator, subject: Subject, track: np.ndarray,
                           size: int) -> np.ndarray:
  """``[3]`` pose away from every target pose: other position and other scale."""
  target_scale = float(np.exp(np.mean(np.log(track[:, 2]))))
  scale = rng.uniform(0.8, 1.3)
  for _ in range(32):
    if abs(math.log(scale / target_scale)) >= math.log(1.2):
      break
    scale = rng.uniform(0.8, 1.3)
  else:   # every draw was too close: step away deterministically
    scale = target_scale * (1.25 if target_scale < 1.05 else 0.8)
  mx, my = _margins(subject, scale, size, size)
  best, best_d = None, -1.0
  for _ in range(32):
    c = np.array([rng.uniform(mx, 1 - mx), rng.uniform(my, 1 - my)])
    d = float(np.min(np.linalg.norm(track[:, :2] - c, axis=-1)))
    if d > best_d:
      best, best_d = c, d
    if d >= 0.2:
      break
  return np.array([best[0], best[1], scale])


def pick_background(rng: np.random.Generator, subject: Subject, exclude: int = -1) -> int:
  """A background contrasting with the subject's main colour (never ``exclude``)."""
  ok = [i for i, b in enumerate(BACKGROUNDS)
        if i != exclude and _distance(b.rgb, subject.primary_rgb) >= _MIN_BACKGROUND_DISTANCE]
  if not ok:
    ok = [i for i in range(len(BACKGROUNDS)) if i != exclude]
  return int(ok[rng.integers(len(ok))])


# ----------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------

# Hue bins in degrees -> coarse words.
_HUES = ((15, "reddish"), (40, "orangish"), (70, "yellowish"), (165, "greenish"),
         (195, "teal"), (255, "bluish"), (290, "purplish"), (345, "pinkish"), (360, "reddish"))


def colour_name(rgb, detailed: bool = True) -> str:
  """Coarse words for a colour: ``'reddish'``, ``'light bluish'``, ``'grayish'``.

  Deliberately lossy (SPEC §3): many colours share a name.
  """
  h, s, v = colorsys.rgb_to_hsv(*[float(c) for c in rgb])
  if s < 0.2:
    return "whitish" if v > 0.8 else "blackish" if v < 0.25 else "grayish"
  word = next(name for edge, name in _HUES if h * 360 < edge)
  if not detailed:
    return word
  if v < 0.5:
    return f"dark {word}"
  if v > 0.8 and s < 0.6:
    return f"light {word}"
  return word


def _subject_phrases(subject: Subject) -> list[str]:
  """The subject's words, most detailed first (both colours with modifiers,
  both colours, the main colour only)."""
  shape, pattern = SHAPES[subject.shape], PATTERNS[subject.pattern]
  out = []
  for detailed in (True, False):
    c1 = colour_name(subject.primary_rgb, detailed)
    c2 = colour_name(subject.secondary_rgb, detailed)
    if pattern == "plain":
      out.append(f"a plain {c1} {shape}")
    elif pattern == "checkered":
      out.append(f"a {c1} and {c2} checkered {shape}")
    else:
      out.append(f"a {c1} {shape} with {c2} {_PATTERN_NOUNS[pattern]}")
  c1 = colour_name(subject.primary_rgb, False)
  out.append(f"a plain {c1} {shape}" if pattern == "plain" else f"a {c1} {pattern} {shape}")
  return out


def _fit(phrases: list[str], rest: str, max_words: int) -> str:
  for p in phrases:
    text = f"{p} {rest}".strip()
    if len(text.split()) <= max_words:
      return text
  return f"{phrases[-1]} {rest}".strip()


def _digit(x: float, lo: float, hi: float) -> str:
  """``x`` quantised to one of ten bins of ``[lo, hi]``, written as a digit word."""
  return str(int(np.clip(math.floor((x - lo) / (hi - lo) * 10), 0, 9)))


def oracle_phrase(subject: Subject) -> str:
  """The subject with precise attributes, in vocabulary words (digits are words).

  ``a star colored R G B size S A with stripes colored R G B F O P`` — each
  continuous value quantised to 10 bins (rgb channels, size, log-aspect,
  pattern frequency, angle/pi, phase). The "oracle text" ablation: how far
  text alone gets when it says everything.
  """
  def rgb(c):
    return " ".join(_digit(x, 0, 1) for x in c)
  shape, pattern = SHAPES[subject.shape], PATTERNS[subject.pattern]
  size = (f"size {_digit(subject.size, *SIZE_RANGE)} "
          f"{_digit(math.log(subject.aspect), *np.log(ASPECT_RANGE))}")
  head = f"a {'plain ' if pattern == 'plain' else ''}{shape} colored {rgb(subject.primary_rgb)} {size}"
  if pattern == "plain":
    return head
  geometry = " ".join((_digit(subject.pattern_scale, *PATTERN_SCALE_RANGE),
                       _digit(subject.pattern_angle, 0, math.pi),
                       _digit(subject.pattern_phase, 0, 1)))
  return (f"{head} with {_PATTERN_NOUNS[pattern]} colored {rgb(subject.secondary_rgb)} "
          f"{geometry}")


def captions(subject: Subject, direction: int, background: int,
             max_words: int = 14) -> dict[str, str]:
  """The six captions of an example.

  ``caption`` / ``placeholder_caption`` / ``oracle_caption`` describe the
  video; the ``still_*`` ones the same without motion, for when one frame is
  used as an image (``image_fraction`` in the pipeline). In the placeholder
  captions the subject's words are replaced by ``<c0>``. ``caption`` drops
  colour detail until it has at most ``max_words`` words; the oracle captions
  are longer (up to ~30 words) and need a longer ``text.max_length``.
  """
  motion, scene = DIRECTION_PHRASES[direction], BACKGROUNDS[background].phrase
  phrases = _subject_phrases(subject)
  oracle = oracle_phrase(subject)
  return {
      "caption": _fit(phrases, f"{motion} {scene}", max_words),
      "placeholder_caption": f"a {PLACEHOLDER} {motion} {scene}",
      "oracle_caption": f"{oracle} {motion} {scene}",
      "still_caption": _fit(phrases, scene, max_words),
      "still_placeholder_caption": f"a {PLACEHOLDER} {scene}",
      "still_oracle_caption": f"{oracle} {scene}",
  }


CAPTION_KEYS = ("caption", "placeholder_caption", "oracle_caption",
                "still_caption", "still_placeholder_caption", "still_oracle_caption")


# ----------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------

def render_example(config: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
  """Example ``index`` of ``split``: deterministic in ``(config.seed, split, index)``.

  Returns a flat dict (the TFDS features, see ``synthetic_tfds.py``):
    index: int64, the example index in its split.
    subject_id: int64 (train ids < ``TEST_ID_OFFSET`` <= test ids).
    video: uint8 ``[T, H, W, 3]``; mask: uint8 ``[T, H, W, 1]`` subject coverage.
    frame_mask: uint8 ``[T]``, all 1 (folders and stills pad with 0).
    reference: uint8 ``[R, R, 3]``; reference_mask: uint8 ``[R, R, 1]``; has_reference: 1.
    caption, placeholder_caption, oracle_caption, still_*: str (``CAPTION_KEYS``).
    shape, pattern, direction, background, reference_background: int32 ids.
    primary_rgb, secondary_rgb, background_rgb: float32 ``[3]`` in [0, 1]
      (``background_rgb`` = the rendered background's mean colour).
    pattern_params: float32 ``[3]`` (scale, angle, phase); size, aspect: float32.
    track: float32 ``[T, 3]`` (cx, cy, scale) per frame; reference_track: ``[3]``.
  """
  n = config.num_examples(split)
  if not 0 <= index < n:
    raise IndexError(f"example {index} out of range for {split} ({n} examples)")
  sid = subject_id(split, index // config.videos_per_subject)
  video_number = index % config.videos_per_subject
  subject = make_subject(sid, config.seed)
  rng = np.random.default_rng([config.seed, _VIDEO_STREAM, sid, video_number])
  T, H, W, R, ss = (config.frames, config.height, config.width, config.reference_size,
                    config.antialias)

  direction = int(rng.integers(len(DIRECTIONS)))
  background = pick_background(rng, subject)
  track = _sample_track(rng, subject, direction, T, H, W)
  ref_background = pick_background(rng, subject, exclude=background)
  ref_track = _sample_reference_pose(rng, subject, track, R)

  bg = render_background(background, H, W, rng, ss)
  alpha, premult = render_subject(subject, track, H, W, ss)
  video = bg[None] * (1.0 - alpha[..., None]) + premult

  ref_bg = render_background(ref_background, R, R, rng, ss)
  ref_alpha, ref_premult = render_subject(subject, ref_track[None], R, R, ss)
  reference = ref_bg * (1.0 - ref_alpha[0, ..., None]) + ref_premult[0]

  example = {
      "index": np.int64(index),
      "subject_id": np.int64(sid),
      "video": _to_uint8(video),
      "mask": _to_uint8(alpha[..., None]),
      "frame_mask": np.ones((T,), np.uint8),
      "reference": _to_uint8(reference),
      "reference_mask": _to_uint8(ref_alpha[0, ..., None]),
      "has_reference": np.uint8(1),
      "shape": np.int32(subject.shape),
      "primary_rgb": np.asarray(subject.primary_rgb, np.float32),
      "secondary_rgb": np.asarray(subject.secondary_rgb, np.float32),
      "pattern": np.int32(subject.pattern),
      "pattern_params": subject.pattern_params,
      "size": np.float32(subject.size),
      "aspect": np.float32(subject.aspect),
      "direction": np.int32(direction),
      "background": np.int32(background),
      "background_rgb": bg.reshape(-1, 3).mean(0).astype(np.float32),
      "track": track.astype(np.float32),
      "reference_background": np.int32(ref_background),
      "reference_track": ref_track.astype(np.float32),
  }
  example.update(captions(subject, direction, background, config.max_caption_words))
  return example


def iterate(config: SyntheticConfig, split: str, start: int = 0,
            stop: int | None = None) -> Iterator[dict[str, Any]]:
  """Examples ``start..stop-1`` of ``split`` in index order (no TF)."""
  stop = config.num_examples(split) if stop is None else stop
  for i in range(start, stop):
    yield render_example(config, split, i)


def config_from_name(name: str, **overrides) -> SyntheticConfig:
  """``'tiny'`` or ``'persvid_synthetic/tiny'`` -> its ``SyntheticConfig`` (with overrides)."""
  short = name.split("/", 1)[1] if "/" in name else name
  if name.startswith("persvid_synthetic") and "/" not in name:
    short = "tiny"
  if short not in CONFIGS:
    raise ValueError(f"unknown persvid_synthetic config {name!r}; known: "
                     f"{sorted(CONFIGS)}")
  changes = {k: v for k, v in overrides.items() if v is not None}
  return CONFIGS[short].replace(**changes)
