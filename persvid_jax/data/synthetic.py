"""Procedurally rendered subject videos, pure numpy: the data of ``persvid_synthetic``.

No TensorFlow here (it must run on a GPU box where TF is absent): the TFDS
builder (``synthetic_tfds.py``) and the numpy pipeline both call
``render_example``.

**Parts.** ``subjects.py`` draws the identities (``Subject``, ``make_subject``)
and their geometry, and splits them by id range (train ids below
``TEST_ID_OFFSET``, test ids above: test subjects are never seen in training);
``scenes.py`` draws the backgrounds; ``captions.py`` words them coarsely ("a
reddish star with bluish stripes"). This module puts them together into
examples, and re-exports their public names: import ``synthetic`` alone.

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
(reference ≠ target: identical pairs teach copy-paste).

**Rendering.** Everything is drawn at ``supersample``× resolution and box-
filtered down (antialiasing); the subject only inside its per-frame bounding
box, so a ``16×32×32`` video costs a few milliseconds. Values are stored as
uint8 (``x / 127.5 - 1`` gives [-1, 1]); masks as uint8 coverage (0..255).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import numpy as np

from persvid_jax.data.captions import (CAPTION_KEYS, DIRECTION_PHRASES, PLACEHOLDER, captions,
                                       colour_name, oracle_phrase)
from persvid_jax.data.scenes import (BACKGROUNDS, Background, box_downsample, pick_background,
                                     render_background)
from persvid_jax.data.subjects import (ASPECT_RANGE, DIRECTIONS, PATTERN_SCALE_RANGE, PATTERNS,
                                       SHAPES, SIZE_RANGE, SPLITS, TEST_ID_OFFSET, Subject,
                                       check_split, inside_shape, make_subject,
                                       secondary_pattern, split_of, subject_id, _VIDEO_STREAM)

__all__ = [
    # The world's parts (subjects, scenes, captions), re-exported: users import ``synthetic``.
    "ASPECT_RANGE", "BACKGROUNDS", "Background", "CAPTION_KEYS", "DIRECTIONS",
    "DIRECTION_PHRASES", "PATTERNS", "PATTERN_SCALE_RANGE", "PLACEHOLDER", "SHAPES",
    "SIZE_RANGE", "SPLITS", "TEST_ID_OFFSET", "Subject", "captions", "colour_name",
    "inside_shape", "make_subject", "oracle_phrase", "pick_background", "render_background",
    "secondary_pattern", "split_of", "subject_id",
    # This module: configs, rendering, examples.
    "CONFIGS", "SyntheticConfig", "config_from_name", "iterate", "render_example",
    "render_subject", "render_video", "subject_mask",
]


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
    subjects = {"train": self.train_subjects, "test": self.test_subjects}[check_split(split)]
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


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

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
    a = box_downsample(inside.astype(np.float32), ss)
    a2 = box_downsample(second.astype(np.float32), ss)
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
