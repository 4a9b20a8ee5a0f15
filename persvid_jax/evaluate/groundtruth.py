"""Ground-truth metrics on ``persvid_synthetic`` subjects, no learned judge.

A generated video is scored against what the prompt asked for, which the
renderer knows exactly: the subject's parameters (``synthetic.Subject``), the
prompted motion direction and the prompted background.

Per video (uint8 ``[T, H, W, 3]``), from a weight-free subject segmentation
of every frame (``concepts.subject.segment_subject``, the one the database
uses) and from the subject's true colours:

* ``colour_error`` — distance in RGB [0, 1] between the mean colour of the
  segmented subject and the true subject's mean colour (frame mean);
* ``shape_iou`` — IoU of the segmented silhouette and the true one (both
  normalised to their bounding square: position and scale do not count);
* ``background_correct`` — 1 if the colour around the subject is nearer the
  prompted background's colour than any other background's (``BACKGROUNDS``);
* ``motion_correct`` — 1 if the subject's centroid / area track classifies
  as the prompted direction (``classify_motion``);
* ``pattern_error`` — how far the subject's colours are *spread* unlike the
  true subject's: the sliced Wasserstein-1 distance (RGB [0, 1]) between
  the segmented subject's pixel colours and the true render's, each taken
  about its own mean (``pattern_distance``). Stripes, dots and checks are
  two colours in proportion; a blob of their average colour has the right
  mean colour and silhouette, and only this metric sees it;
* ``temporal_consistency`` — mean shape IoU of consecutive frames' subjects:
  1 when the subject keeps its silhouette from frame to frame;
* ``instances`` / ``single_instance`` — the number of connected components
  of the subject's own colours per frame (``count_instances``), and the
  fraction of frames where it is exactly one. Large frames from a network
  whose receptive field was tuned for small ones show the subject repeated:
  this is the number the cascade with its different SR kernel must win.

Every metric is checked on the renderer's own videos in the tests (the truth
scores perfectly; a frame with two copies counts two).
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from persvid_jax.concepts import subject as subject_lib
from persvid_jax.data import synthetic
from persvid_jax.evaluate import fidelity

METRICS = ("colour_error", "shape_iou", "pattern_error", "background_correct",
           "motion_correct", "temporal_consistency", "instances", "single_instance")
# Which way is better, for tables.
HIGHER_IS_BETTER = dict(colour_error=False, shape_iou=True, pattern_error=False,
                        background_correct=True,
                        motion_correct=True, temporal_consistency=True, instances=None,
                        single_instance=True)

_REFERENCE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class Target:
  """What one generated video should show.

  Attributes:
    subject: the true identity.
    direction: index into ``synthetic.DIRECTIONS``.
    background: index into ``synthetic.BACKGROUNDS``.
  """
  subject: synthetic.Subject
  direction: int
  background: int


def true_colour(subject: synthetic.Subject) -> np.ndarray:
  """``[3]`` mean RGB in [0, 1] of the subject as rendered (pattern included)."""
  alpha, premult = synthetic.render_subject(
      subject, np.array([[0.5, 0.5, 1.0]]), _REFERENCE_SIZE, _REFERENCE_SIZE)
  return premult[0].reshape(-1, 3).sum(0) / max(float(alpha.sum()), 1e-6)


def true_pixels(subject: synthetic.Subject) -> np.ndarray:
  """``[N, 3]`` RGB in [0, 1] of the true subject's fully covered pixels (its
  pattern in proportion; the antialiased rim left out)."""
  alpha, premult = synthetic.render_subject(
      subject, np.array([[0.5, 0.5, 1.0]]), _REFERENCE_SIZE, _REFERENCE_SIZE)
  inside = alpha[0] > 0.99
  return premult[0][inside] / alpha[0][inside][:, None]


# Fixed projection directions of the sliced distance (unit vectors in RGB):
# the axes, the grey diagonal and 12 more, so every score uses the same slices.
_SLICES = np.concatenate([np.eye(3), np.ones((1, 3)) / np.sqrt(3.0),
                          np.random.default_rng(0).normal(size=(12, 3))])
_SLICES = _SLICES / np.linalg.norm(_SLICES, axis=1, keepdims=True)
_QUANTILES = np.linspace(0.0, 1.0, 33)


def pattern_distance(pixels: np.ndarray, truth: np.ndarray) -> float:
  """Sliced Wasserstein-1 distance between two colour sets about their means.

  Args:
    pixels: ``[N, 3]`` RGB in [0, 1] (a generated subject's pixels).
    truth: ``[M, 3]`` RGB in [0, 1] (``true_pixels``).

  Returns:
    The mean over ``_SLICES`` of the 1-D W1 distance (33 quantiles) between
    the projections of ``pixels - mean(pixels)`` and ``truth - mean(truth)``:
    0 for the same spread of colours wherever its mean lies; for a two-colour
    pattern against a plain blob, about the distance between its colours
    weighted by their shares. Mean colour is ``colour_error``'s business.
  """
  a = (pixels - pixels.mean(0)) @ _SLICES.T
  b = (truth - truth.mean(0)) @ _SLICES.T
  qa = np.quantile(a, _QUANTILES, axis=0)
  qb = np.quantile(b, _QUANTILES, axis=0)
  return float(np.mean(np.abs(qa - qb)))


def subject_colours(subject: synthetic.Subject, background: int) -> list[np.ndarray]:
  """The subject's colours that the prompted background does not share.

  The primary colour always contrasts with the background (the renderer
  guarantees it); the secondary may not, and then counting it would count
  the background.
  """
  bg = np.asarray(synthetic.BACKGROUNDS[background].rgb)
  out = [np.asarray(subject.primary_rgb)]
  if np.linalg.norm(np.asarray(subject.secondary_rgb) - bg) >= 0.35 and \
      synthetic.PATTERNS[subject.pattern] != "plain":
    out.append(np.asarray(subject.secondary_rgb))
  return out


def colour_distance(frame: np.ndarray, colours: list[np.ndarray]) -> np.ndarray:
  """``[H, W]`` RGB distance of each pixel to the nearest of the subject's colours.

  (Not to the segment between two colours: mixtures of two saturated colours
  pass through background colours such as wood or brick.)
  """
  x = frame.astype(np.float32) / 255.0
  return np.min([np.linalg.norm(x - np.asarray(c, np.float32), axis=-1) for c in colours],
                axis=0)


def count_instances(frame: np.ndarray, colours: list[np.ndarray], *, min_area: float,
                    tolerance: float = 0.25) -> int:
  """Subject instances in a frame: connected blobs of the subject's colours.

  Args:
    frame: uint8 ``[H, W, 3]``.
    colours: one or two RGB colours in [0, 1] that belong to the subject.
    min_area: blobs smaller than this (pixels) are noise, not instances.
    tolerance: RGB distance within which a pixel has a subject colour.

  Returns:
    The number of 8-connected components of subject-coloured pixels, after a
    3x3 closing (a stripe of an excluded colour must not cut one subject in
    two; copies of a subject lie a subject apart), with at least
    ``min_area`` pixels.
  """
  mask = (colour_distance(frame, colours) < tolerance).astype(np.uint8)
  mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
  n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
  return int(np.sum(stats[1:, cv2.CC_STAT_AREA] >= min_area))


def classify_motion(masks: np.ndarray) -> int | None:
  """The direction (index into ``synthetic.DIRECTIONS``) of a subject's track.

  Args:
    masks: ``[T, H, W]`` subject masks of one video.

  Returns:
    The direction whose signature is strongest: the centroid's displacement
    (fit over all frames, in frame fractions) for left/right/up/down, half
    the log area change (= the log scale change) for towards/away; None when
    the subject is missing from a frame or nothing moves.
  """
  t_len, h, w = masks.shape
  cx, cy, area = [], [], []
  for m in masks:
    ys, xs = np.nonzero(m > 0.5)
    if len(xs) == 0:
      return None
    cx.append(xs.mean() / w)
    cy.append(ys.mean() / h)
    area.append(len(xs))
  t = np.arange(t_len, dtype=np.float64)
  slope = lambda v: np.polyfit(t, np.asarray(v, np.float64), 1)[0] * (t_len - 1)
  dx, dy, ds = slope(cx), slope(cy), 0.5 * slope(np.log(area))
  scores = {"right": dx, "left": -dx, "down": dy, "up": -dy, "towards": ds, "away": -ds}
  name, best = max(scores.items(), key=lambda kv: kv[1])
  if best <= 0.02:        # under a pixel's worth of motion at 32 px
    return None
  return synthetic.DIRECTIONS.index(name)


def classify_background(frame: np.ndarray, mask: np.ndarray) -> int:
  """The background (index into ``BACKGROUNDS``) nearest the colour around the subject.

  Args:
    frame: uint8 ``[H, W, 3]``; mask: ``[H, W]`` subject mask.
  """
  # Dilate the subject away: its antialiased rim is neither colour.
  grown = cv2.dilate((mask > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8))
  outside = grown == 0
  x = frame.astype(np.float32) / 255.0
  colour = x[outside].mean(0) if outside.any() else x.reshape(-1, 3).mean(0)
  nominal = np.asarray([b.rgb for b in synthetic.BACKGROUNDS])
  return int(np.argmin(np.linalg.norm(nominal - colour, axis=-1)))


def segment_video(video: np.ndarray, segment_size: int | None = None) -> np.ndarray:
  """The subject of every frame of uint8 ``video [T, H, W, 3]``: bool ``[T, H, W]``.

  ``segment_size`` is the segmentation's working size (default the frame height).
  """
  video = np.asarray(video)
  return np.stack([subject_lib.segment_subject(f, size=segment_size or video.shape[1]).mask > 0.5
                   for f in video])


def score_video(video: np.ndarray, target: Target, *, segment_size: int | None = None,
                masks: np.ndarray | None = None) -> dict[str, float]:
  """Every metric of ``METRICS`` for one video.

  Args:
    video: uint8 ``[T, H, W, 3]``.
    target: what the prompt asked for.
    segment_size: the segmentation's working size (default the frame size).
    masks: bool ``[T, H, W]``, ``segment_video(video)`` if already computed
      (scoring one video against several targets segments it once).

  Returns:
    ``{metric: float}`` over ``METRICS``.
  """
  video = np.asarray(video)
  t_len, h, w, _ = video.shape
  subject = target.subject
  masks = segment_video(video, segment_size) if masks is None else np.asarray(masks, bool)
  colour = true_colour(subject)
  truth = synthetic.subject_mask(subject, _REFERENCE_SIZE)
  colour_err = [float(np.linalg.norm(fidelity.mean_colour(f, m) - colour))
                for f, m in zip(video, masks)]
  truth_pixels = true_pixels(subject)
  # A frame where segmentation finds no subject is scored on all its pixels
  # (as mean_colour weighs them): missing the subject is no pattern match.
  pattern = [pattern_distance((f[m] if m.sum() >= 4 else f.reshape(-1, 3)) / 255.0,
                              truth_pixels) for f, m in zip(video, masks)]
  ious = [fidelity.shape_iou(m, truth) for m in masks]
  consistency = [fidelity.shape_iou(a, b) for a, b in zip(masks[:-1], masks[1:])]
  bg_hits = [classify_background(f, m) == target.background for f, m in zip(video, masks)]
  # An instance is at least ~1/7 of the subject's area at its smallest
  # ("towards" starts at ~0.36 of its unit-scale area; antialiased rims and
  # a second colour close to the background shave off the rest).
  radius = subject.size * min(h, w)
  min_area = max(3.0, 0.05 * np.pi * radius * radius)
  colours = subject_colours(subject, target.background)
  counts = [count_instances(f, colours, min_area=min_area) for f in video]
  return dict(
      colour_error=float(np.mean(colour_err)),
      shape_iou=float(np.mean(ious)),
      pattern_error=float(np.mean(pattern)),
      background_correct=float(np.mean(bg_hits)),
      motion_correct=float(classify_motion(masks) == target.direction),
      temporal_consistency=float(np.mean(consistency)) if consistency else 1.0,
      instances=float(np.mean(counts)),
      single_instance=float(np.mean([c == 1 for c in counts])))
