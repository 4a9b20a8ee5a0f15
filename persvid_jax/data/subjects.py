"""The subjects of ``persvid_synthetic``: seeded identities and their geometry, pure numpy.

A subject is a parameter vector (``Subject``): one of ``SHAPES``, two
continuous RGB colours, one of ``PATTERNS`` with a continuous scale / angle /
phase, a continuous size and aspect ratio, drawn from
``np.random.default_rng([seed, _SUBJECT_STREAM, subject_id])``: a subject id
*is* an identity. Train ids are ``[0, TEST_ID_OFFSET)``, test ids above, so
test subjects are never seen in training. ``inside_shape`` and
``secondary_pattern`` answer, in subject-local coordinates, where the subject
and its second colour are; ``synthetic.render_subject`` draws with them.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np

# ----------------------------------------------------------------------------
# Vocabulary of the world. Every caption word is in
# persvid_jax.concepts.tokens.DEFAULT_WORDS (tests/data check: no <unk>).
# ----------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "heart")
PATTERNS = ("plain", "striped", "dotted", "checkered")
DIRECTIONS = ("left", "right", "up", "down", "towards", "away")

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


def check_split(split: str) -> str:
  """``split`` if it is one of ``SPLITS``; else ValueError."""
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
  return i if check_split(split) == "train" else TEST_ID_OFFSET + i


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
