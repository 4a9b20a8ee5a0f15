"""Subject fidelity of a generated video against the concept's reference, no learned judge.

The subject of every generated frame is found with the same weight-free
subject recognition that builds the database (``concepts.subject``), then
compared with the reference crop's subject:

* **colour error** — Euclidean distance between the mean RGB (in [0, 1]) of
  the generated subject and of the reference subject, averaged over frames
  (0 = same colour; the distance between two random colours is ~0.66);
* **shape IoU** — IoU of the two masks after each is cropped to the square
  around its bounding box and resized to a common size (position and scale do not count, the
  silhouette does), averaged over frames.

These are the coarse, robust measures the demo prints; ``evaluate/`` grows
the ground-truth metrics of ``groundtruth`` on top.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from persvid_jax.concepts import subject as subject_lib

_SHAPE_SIZE = 32


def _normalised_shape(mask: np.ndarray) -> np.ndarray:
  """``[H, W]`` mask -> ``[S, S]`` bool: its bounding box resized to a square."""
  ys, xs = np.nonzero(mask > 0.5)
  if len(ys) == 0:
    return np.zeros((_SHAPE_SIZE, _SHAPE_SIZE), bool)
  # The square around the bounding box keeps the aspect ratio (a subject
  # property) while removing position and scale.
  h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
  side = max(h, w)
  box = np.zeros((side, side), np.uint8)
  oy, ox = (side - h) // 2, (side - w) // 2
  box[oy:oy + h, ox:ox + w] = (mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1] > 0.5) * 255
  return np.asarray(Image.fromarray(box).resize((_SHAPE_SIZE, _SHAPE_SIZE),
                                                Image.Resampling.BILINEAR)) > 127


def shape_iou(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
  """IoU of two ``[H, W]`` masks after bounding-box normalisation (in [0, 1])."""
  a, b = _normalised_shape(mask_a), _normalised_shape(mask_b)
  union = np.sum(a | b)
  return float(np.sum(a & b) / union) if union else 0.0


def mean_colour(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """``[3]`` mean RGB in [0, 1] of uint8 ``image [H, W, 3]`` under ``mask [H, W]``."""
  w = np.asarray(mask, np.float32)[..., None]
  return (np.sum(image.astype(np.float32) / 255.0 * w, axis=(0, 1))
          / max(float(np.sum(w)), 1e-6))


def video_fidelity(video: np.ndarray, reference: np.ndarray, reference_mask: np.ndarray
                   ) -> dict[str, float]:
  """Colour error and shape IoU of a video's subject vs the reference's.

  Args:
    video: uint8 ``[T, H, W, 3]``.
    reference: uint8 ``[R, R, 3]`` crop; reference_mask ``[R, R]`` in [0, 1].

  Returns:
    ``{'colour_error': float, 'shape_iou': float}`` (frame means).
  """
  ref_colour = mean_colour(reference, reference_mask)
  colour, iou = [], []
  for frame in np.asarray(video):
    mask = subject_lib.segment_subject(frame, size=frame.shape[0]).mask
    colour.append(float(np.linalg.norm(mean_colour(frame, mask) - ref_colour)))
    iou.append(shape_iou(mask, reference_mask))
  return dict(colour_error=float(np.mean(colour)), shape_iou=float(np.mean(iou)))
