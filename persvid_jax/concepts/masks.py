"""Binary masks as subject recognition cleans them: connected components, the
main one (largest, weighted towards the centre), holes filled, parts joined.

Masks are ``[h, w]`` arrays of 0/1 (uint8 or bool); components are
4-connected, so that a filled main component is one piece without holes.
"""

from __future__ import annotations

import cv2
import numpy as np

PART_AREA = 0.05              # join_parts: parts this big (of the main one)
PART_GAP = 0.5                # ... and this close (of its size) are joined,
JOIN_GROWTH = 2.0             # ... unless the result is this much larger than its parts


def centre_weight(h: int, w: int, sigma: float = 0.35) -> np.ndarray:
  """``[h, w]`` Gaussian centre prior in (0, 1] (unit = the image side)."""
  y = (np.arange(h) + 0.5) / h - 0.5
  x = (np.arange(w) + 0.5) / w - 0.5
  return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))


def components(fg: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
  """``(count, labels [h, w], stats [count, 5])`` of the 4-connected components of ``fg``
  (label 0: the background)."""
  return cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=4)[:3]


def main_component(fg: np.ndarray) -> np.ndarray:
  """uint8 ``[h, w]``: the main 4-connected component of ``fg``, holes filled.

  Main = largest area weighted by centre-ness (a large background blob at the
  edge loses to a slightly smaller subject in the middle).
  """
  count, labels, stats = components(fg)
  if count <= 1:
    return np.zeros(fg.shape, np.uint8)
  centre = centre_weight(*fg.shape)
  area = stats[1:, cv2.CC_STAT_AREA].astype(np.float64)
  weight = np.bincount(labels.ravel(), weights=centre.ravel(), minlength=count)[1:]
  score = area * (0.5 + 0.5 * weight / area)
  keep = (labels == 1 + int(np.argmax(score))).astype(np.uint8)
  return fill_holes(keep)


def fill_holes(keep: np.ndarray) -> np.ndarray:
  """uint8 ``[h, w]``: ``keep`` with its holes filled.

  Holes are the 4-connected background pieces that do not touch the image
  border (filling them keeps a 4-connected region 4-connected).
  """
  keep = keep.astype(np.uint8).copy()
  _, bg_labels, _ = components(1 - keep)
  edge = np.unique(np.concatenate([bg_labels[0], bg_labels[-1], bg_labels[:, 0], bg_labels[:, -1]]))
  keep[(keep == 0) & ~np.isin(bg_labels, edge)] = 1
  return keep


def join_parts(fg: np.ndarray, main: np.ndarray) -> np.ndarray:
  """uint8 ``[h, w]``: ``main`` joined with the sizeable parts of ``fg`` just beside it.

  A subject whose pattern shares a colour with the background (white stripes
  on snow) comes out of the cut as several parts separated by narrow gaps.
  When such parts exist (each at least ``PART_AREA`` of the main one's area,
  at most ``PART_GAP`` of its size away), the gaps are closed with a disc
  just wide enough to bridge them, and holes filled. A subject in one piece
  is left as it is (closing would blunt its corners).
  """
  count, labels, stats = components(fg)
  area = float(main.sum())
  gap = cv2.distanceTransform((1 - main).astype(np.uint8), cv2.DIST_L2, 3)
  widest = 0.0
  for i in range(1, count):
    if stats[i, cv2.CC_STAT_AREA] < PART_AREA * area:
      continue
    d = float(gap[labels == i].min())
    if 0 < d <= PART_GAP * np.sqrt(area):
      widest = max(widest, d)
  if widest == 0.0:
    return main
  r = int(np.ceil(widest / 2)) + 1
  disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
  # Padded with background, so that the closing cannot glue parts to the frame.
  padded = cv2.copyMakeBorder(fg.astype(np.uint8), r, r, r, r, cv2.BORDER_CONSTANT, value=0)
  closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disc)[r:-r, r:-r]
  _, labels, _ = components(closed)
  joined = fill_holes(np.isin(labels, np.unique(labels[main > 0])))
  # Bridging gaps adds little area; a join that balloons has swallowed background.
  if joined.sum() > JOIN_GROWTH * (fg & (joined > 0)).sum():
    return main
  return joined
