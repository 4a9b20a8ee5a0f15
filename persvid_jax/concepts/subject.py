"""Subject recognition: find the main subject of a user's photo, without pretrained weights.

A concept is extracted from a reference photo of its subject (the concept database):
the photo is segmented, and a square crop centred on the subject, with its
mask, is what the concept encoder sees. No network is involved, so that
recognition works before any model is trained, on any machine.

**Segmentation** (``segment_subject`` without a ``mask``), at a bounded
working resolution (longest side at most ``_WORK_MAX``; small inputs such as
the 32 px synthetic references are upsampled to ``_WORK_MIN``, so that
GrabCut has pixels to work with and places the boundary between input
pixels):

1. *Letterbox bars* (black or white, on one pair of opposite sides) are
   trimmed: they would be "the border".
2. *Colour contrast*: how far each pixel's colour is from the colours of the
   image border, trusting any two of the four sides (a background reaches
   several sides, whatever its texture; a subject touches at most one).
3. *Contrast candidate*: ``cv2.grabCut`` seeded with that prior (high
   contrast: probable subject; the outer strip: background). Right for a
   subject in colours its surroundings lack, anywhere in the frame -- all the
   synthetic data, studio shots.
4. *Framed candidate*, tried when the contrast candidate is a speck or
   leaves most of the high-contrast area outside (clutter; a pet in the
   colours of its surroundings): classic GrabCut from a centred rectangle
   (photographers frame their subject), retried with a forced centre if the
   cut gives everything away. It replaces the contrast candidate when it
   finds something of a subject's size (``_MIN_SUBJECT``); else the contrast
   candidate stays if it found anything, and a centred ellipse stands in if
   not (a loose crop beats none).
5. *Clean-up* (``concepts.masks``): the main connected component (largest,
   weighted towards the centre) with its holes filled; parts split by a
   background-coloured pattern are joined; back at the input resolution the
   boundary of small inputs is re-decided per pixel (``_refine_edges``). The
   mask is always one 4-connected component without holes.

Deterministic: GrabCut's colour models are seeded (``cv2.setRNGSeed``).

Measured (tests/concepts/test_subject.py): IoU with the renderer's masks
0.97 at 64 px, 0.94 at 32 px. On the 158 DreamBench photos about four in five
masks are the subject; the rest are a part of it (a lid, one lens), take in a
neighbour (the hand holding a clock, a bench slat) or, for a dark subject in
dark clutter, miss it (twice: the ellipse). Colour and edges are all there is.

**Users' files** are read by ``concepts.images`` (``load_image``,
``load_mask``); a hand-made mask (``segment_subject(image, mask=...)``)
skips segmentation.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from persvid_jax.concepts import masks
from persvid_jax.concepts.images import ImageError, check_mask

# Working resolution (longest side, pixels). Above _WORK_MAX GrabCut gets slow
# for no gain in a mask that is cropped and downsampled anyway; below
# _WORK_MIN its colour models have too few pixels.
_WORK_MAX = 160
_WORK_MIN = 128
_ITERATIONS = 3               # GrabCut iterations (more change little)
_BAR_TOLERANCE = 12           # letterbox bars: uniform within this (uint8, JPEG noise)
# Colour contrast: each border strip's rarest colours (this fraction of its
# pixels: stars, a subject's ears reaching the edge) are ignored; Lab
# distances below _NEAR are noise, above _FAR clearly another colour.
_BORDER_QUANTILE = 0.1
_NEAR, _FAR = 6.0, 30.0
_REACH = 0.02                 # the contrast cut stays this close (of the side) ...
_REACH_PRIOR = 0.25           # ... to where the prior exceeds this
_MIN_CAPTURED = 0.85          # else the framed candidate is tried
_RIVAL = 0.1                  # contrast blobs this big (of the mask) are rivals
_FRAME = 0.08                 # framed candidate: the outer 8% is background
_CORE = 0.1                   # ... and, on retry, the central 10% is subject
_MIN_SUBJECT = 0.025          # a candidate smaller than this found a part at best
_MIN_CANDIDATE = 0.002        # below this a candidate found nothing
_MIN_EDGE_CONTRAST = 20.0     # _refine_edges: RGB distance below which an edge is kept
_FIT_ABS, _FIT_REL = 12.0, 0.1  # ... and the largest misfit of a two-colour mix
_PART_OF_BOX = 0.05           # user masks: components this big (of the largest) widen the box


# ----------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SubjectCrop:
  """The subject found in a photo, and the square crop a concept is made from.

  (Not ``Subject``: that is the synthetic identity in ``data.synthetic``.)
  """
  mask: np.ndarray                      # float32 [H, W] in {0, 1}: the subject in the photo
  box: tuple[int, int, int, int]        # (y0, x0, y1, x1) of the main component, exclusive ends
  crop: np.ndarray                      # uint8 [S, S, 3]: square crop around the subject
  crop_mask: np.ndarray                 # float32 [S, S] in [0, 1]: the mask, cropped the same way
  coverage: float                       # mask area / image area


def _content_box(image: np.ndarray) -> tuple[int, int, int, int]:
  """``(y0, y1, x0, x1)``: the image without letterbox bars.

  Bars would otherwise be "the border" that every colour of the photo differs
  from. A bar: up to a third of the image at an edge, rows (columns) of one
  near-black or near-white colour, then a sharp edge: the next line but one
  (JPEG blurs the edge itself) is unlike the bar in 80% of its pixels. A plain
  or graded backdrop is not a bar: it fades, or the line where a subject
  starts is still mostly backdrop (a synthetic subject spans < 75% of a line).
  """
  img = image.astype(np.int16)
  H, W = img.shape[:2]

  def bar(lines: np.ndarray) -> int:
    # lines: [n, length, 3], from the edge inwards.
    colour = np.median(lines[0], axis=0)
    if not (colour.max() <= 40 or colour.min() >= 215):
      return 0
    if np.mean(np.abs(lines[:2] - colour).max(-1) > _BAR_TOLERANCE) > 0.01:
      return 0                # the common case, decided on two lines
    off = np.abs(lines - colour).max(-1)
    uniform = np.mean(off > _BAR_TOLERANCE, axis=1) <= 0.01
    n = int(np.argmin(uniform)) if not uniform.all() else len(uniform)
    if n < 2 or n + 1 >= len(uniform) or np.mean(off[n + 1] > _BAR_TOLERANCE) < 0.8:
      return 0
    return n

  limit_h, limit_w = max(1, H // 3), max(1, W // 3)
  top = bar(img[:limit_h])
  bottom = bar(img[::-1][:limit_h])
  left = bar(img[:, :limit_w].transpose(1, 0, 2))
  right = bar(img[:, ::-1][:, :limit_w].transpose(1, 0, 2))
  return top, H - bottom, left, W - right


def _side_distance(lab: np.ndarray, width: int) -> np.ndarray:
  """``[h, w]``: each pixel's Lab distance to the border's colours, trusting any two sides.

  Per border strip (top, bottom, left, right, ``width`` pixels), the
  distance to the nearest colour of that strip, its rarest colours
  (``_BORDER_QUANTILE`` of its pixels: stars in a night sky, ears reaching the edge)
  left out. A background, whatever its texture, reaches at least two sides
  (sky: top, left, right; floor: bottom, left, right); a subject usually
  touches at most one (a pet standing on the bottom edge). So the second
  smallest of the four distances is small on background, large on the
  subject. Colours are quantised to 4 Lab units.
  """
  h, w = lab.shape[:2]
  step = 4
  q = lab.astype(np.int32) // step
  key = (q[..., 0] * 64 + q[..., 1]) * 64 + q[..., 2]
  i_keys, inverse = np.unique(key.ravel(), return_inverse=True)
  strips = (key[:width], key[-width:], key[:, :width], key[:, -width:])
  side_keys = []
  for strip in strips:
    keys, counts = np.unique(strip, return_counts=True)
    order = np.argsort(counts, kind="stable")              # rarest first
    rare = np.cumsum(counts[order]) <= _BORDER_QUANTILE * counts.sum()
    side_keys.append(keys[order[~rare]])
  b_keys = np.unique(np.concatenate(side_keys))
  member = np.stack([np.isin(b_keys, k) for k in side_keys])

  def centres(keys):
    return np.stack([keys // 4096, (keys // 64) % 64, keys % 64], -1).astype(np.float32) * step

  i_col, b_col = centres(i_keys), centres(b_keys)
  d = np.empty((4, len(i_keys)), np.float32)
  for start in range(0, len(i_keys), 512):               # bounded memory
    diff = i_col[start:start + 512, None] - b_col[None]
    dist = np.sqrt(np.sum(diff * diff, -1))
    for side in range(4):
      d[side, start:start + 512] = dist[:, member[side]].min(1)
  return np.sort(d, axis=0)[1][inverse].reshape(h, w)


def _working_copy(image: np.ndarray) -> tuple[np.ndarray, float]:
  """The image at the working resolution, and the scale factor applied."""
  H, W = image.shape[:2]
  scale = min(_WORK_MAX / max(H, W), max(1.0, _WORK_MIN / max(H, W)))
  h, w = max(1, round(H * scale)), max(1, round(W * scale))
  if (h, w) == (H, W):
    return np.ascontiguousarray(image), 1.0
  interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
  return np.ascontiguousarray(cv2.resize(image, (w, h), interpolation=interp)), scale


def _colour_contrast(work: np.ndarray) -> np.ndarray:
  """``[h, w]`` in [0, 1]: how unlike the border's colours each pixel is."""
  blurred = cv2.GaussianBlur(work, (0, 0), 1.0)       # texture and JPEG noise
  lab = cv2.cvtColor(blurred, cv2.COLOR_RGB2LAB)
  d = _side_distance(lab, max(2, round(0.05 * max(work.shape[:2]))))
  return np.clip((d - _NEAR) / (_FAR - _NEAR), 0.0, 1.0)


def _grabcut(work: np.ndarray, seeds: np.ndarray, seed: int) -> np.ndarray:
  """bool ``[h, w]``: GrabCut's foreground from the label map ``seeds``."""
  cv2.setRNGSeed(seed)      # GrabCut's GMM initialisation draws from cv2's RNG
  bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
  labels = seeds.copy()
  try:
    cv2.grabCut(work, labels, None, bgd, fgd, _ITERATIONS, cv2.GC_INIT_WITH_MASK)
  except cv2.error:         # degenerate colour models (e.g. a flat image)
    return np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD))
  return (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)


def _clean(fg: np.ndarray) -> np.ndarray:
  """uint8 ``[h, w]``: the subject's component of a raw foreground."""
  # Detach thin bridges to background clutter before picking the component.
  k = max(1, round(0.006 * max(fg.shape)))
  fg = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN,
                        cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
  main = masks.main_component(fg)
  return masks.join_parts(fg, main) if main.any() else main


def _by_contrast(work: np.ndarray, contrast: np.ndarray, seed: int) -> np.ndarray:
  """Candidate 1: GrabCut seeded by the colour-contrast prior -- a subject in
  colours its surroundings lack, anywhere in the frame (all synthetic data,
  studio shots)."""
  h, w = contrast.shape
  prior = contrast * (0.4 + 0.6 * masks.centre_weight(h, w))
  seeds = np.full((h, w), cv2.GC_PR_BGD, np.uint8)
  seeds[prior > 0.5] = cv2.GC_PR_FGD
  strip = max(1, round(0.02 * max(h, w)))
  seeds[:strip], seeds[-strip:], seeds[:, :strip], seeds[:, -strip:] = (cv2.GC_BGD,) * 4
  if not (seeds == cv2.GC_PR_FGD).any():
    return np.zeros((h, w), np.uint8)
  fg = _grabcut(work, seeds, seed)
  # The cut may not claim what the prior calls background well away from the
  # prior's subject (a brick of an unusual tint next to it).
  m = max(1, round(_REACH * max(h, w)))
  near = cv2.dilate((prior > _REACH_PRIOR).astype(np.uint8),
                    cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * m + 1, 2 * m + 1)))
  return _clean(fg & (masks.fill_holes(near) > 0))


def _by_frame(work: np.ndarray, seed: int, core: bool) -> np.ndarray:
  """Candidate 2: classic GrabCut from a centred rectangle -- a photographed
  subject that shares colours with its surroundings but is framed. With
  ``core``, a small central box is forced into the subject (when the cut
  otherwise gives everything to a cluttered background)."""
  h, w = work.shape[:2]
  seeds = np.full((h, w), cv2.GC_BGD, np.uint8)
  a, b = max(1, round(_FRAME * h)), max(1, round(_FRAME * w))
  seeds[a:h - a, b:w - b] = cv2.GC_PR_FGD
  if core:
    a, b = round((0.5 - _CORE / 2) * h), round((0.5 - _CORE / 2) * w)
    seeds[a:h - a, b:w - b] = cv2.GC_FGD
  return _clean(_grabcut(work, seeds, seed))


def _captured(contrast: np.ndarray, mask: np.ndarray) -> float:
  """The fraction of the high-contrast area that ``mask`` holds.

  Only blobs the mask touches or of at least ``_RIVAL`` of its area count:
  stars in a night sky are not rival subjects, a bright patch of clutter is.
  """
  count, labels, stats = masks.components(contrast > 0.5)
  if count <= 1 or not mask.any():
    return 0.0
  inside = np.bincount(labels.ravel(), weights=(mask > 0).ravel(), minlength=count)
  area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
  keep = (area >= _RIVAL * mask.sum()) | (inside > 0)
  keep[0] = False
  return float(inside[keep].sum() / max(1.0, area[keep].sum()))


def _ellipse(h: int, w: int) -> np.ndarray:
  """uint8 ``[h, w]``: the centred ellipse that stands in when nothing is found."""
  out = np.zeros((h, w), np.uint8)
  cv2.ellipse(out, (w // 2, h // 2), (max(1, w // 3), max(1, h // 3)), 0, 0, 360, 1, -1)
  return out


def _resize_mask(mask: np.ndarray, W: int, H: int, scale: float) -> np.ndarray:
  """uint8 ``[H, W]``: a working-resolution mask back at the input size.

  By area coverage, thresholded at half (the rule of a coverage mask
  thresholded at 0.5), then the main component again (resampling can cut a
  thin part off).
  """
  if mask.shape == (H, W):
    return mask
  interp = cv2.INTER_AREA if scale > 1 else cv2.INTER_LINEAR
  soft = cv2.resize(mask.astype(np.float32), (W, H), interpolation=interp)
  out = masks.main_component(soft > 0.5)
  if not out.any():           # the subject vanished in the downsample: keep a pixel
    y, x = np.unravel_index(int(np.argmax(soft)), soft.shape)
    out[y, x] = 1
  return out


def _segment_content(image: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
  """uint8 ``[H, W]`` in {0, 1}: the main subject of uint8 ``[H, W, 3]`` ``image``,
  and which candidate gave it (``'contrast'``, ``'framed'``, ``'framed+core'``,
  ``'ellipse'``)."""
  H, W = image.shape[:2]
  work, scale = _working_copy(image)
  h, w = work.shape[:2]
  if np.ptp(work.reshape(-1, 3), axis=0).max() <= 2:
    # A flat image has nothing to find (and GrabCut's colour models stall on it).
    return _resize_mask(_ellipse(h, w), W, H, scale), "ellipse"
  contrast = _colour_contrast(work)
  main, how = _by_contrast(work, contrast, seed), "contrast"
  # Does the contrast candidate explain the image? If most of what stands out
  # from the border lies elsewhere (clutter, a pet in its surroundings'
  # colours), or it is only a speck (the lid of a jar), the framed candidate
  # is the better bet -- when it finds something of a subject's size.
  if main.mean() < _MIN_SUBJECT or _captured(contrast, main) < _MIN_CAPTURED:
    framed, framed_how = _by_frame(work, seed, core=False), "framed"
    if framed.mean() < _MIN_SUBJECT:
      framed, framed_how = _by_frame(work, seed, core=True), "framed+core"
    if framed.mean() >= _MIN_SUBJECT:
      main, how = framed, framed_how
    elif main.mean() < _MIN_CANDIDATE:
      main, how = _ellipse(h, w), "ellipse"     # a loose crop beats none
  main = _resize_mask(main, W, H, scale)
  if scale >= 1:
    # Only for inputs no larger than the working size: a large input's crop is
    # downsampled anyway, and the cost grows with its perimeter.
    main = masks.main_component(_refine_edges(image, main, 1))
  return main, how


def _segment(image: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
  """``_segment_content`` inside the letterbox bars, if any."""
  y0, y1, x0, x1 = _content_box(image)
  mask = np.zeros(image.shape[:2], np.uint8)
  inner, how = _segment_content(np.ascontiguousarray(image[y0:y1, x0:x1]), seed)
  mask[y0:y1, x0:x1] = inner
  return mask, how


def _refine_edges(image: np.ndarray, mask: np.ndarray, radius: int) -> np.ndarray:
  """uint8 ``[H, W]``: ``mask`` with its boundary re-decided at the input resolution.

  The mask comes from a graph cut that rounds corners, at a resolution where
  an input pixel is several working pixels. Each pixel within ``radius`` of
  the boundary is explained as a mix ``a * f + (1 - a) * b`` of a colour
  ``f`` from well inside the mask and ``b`` from well outside, both sampled
  nearby along the 8 compass directions (the pair that reconstructs it best:
  patterned subjects and textured backgrounds offer several), and kept if
  ``a > 1/2`` -- the rule of a coverage mask thresholded at half. A pixel
  whose best pair is too alike, or that no pair explains (a third colour of a
  pattern), keeps its label.
  """
  box = cv2.getStructuringElement(cv2.MORPH_RECT, (2 * radius + 1, 2 * radius + 1))
  inner = cv2.erode(mask, box, borderType=cv2.BORDER_REPLICATE).astype(bool)
  outer = ~cv2.dilate(mask, box, borderType=cv2.BORDER_REPLICATE).astype(bool)
  band = ~inner & ~outer
  if not band.any() or not inner.any() or not outer.any():
    return mask
  reach = 2 * radius + 1                               # every band pixel sees both sides
  steps = np.array([(k * dy, k * dx) for k in range(1, reach + 1)
                    for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
  colour = cv2.copyMakeBorder(image, reach, reach, reach, reach,
                              cv2.BORDER_REPLICATE).astype(np.float32)
  inner, outer = np.pad(inner, reach), np.pad(outer, reach)
  ys, xs = np.nonzero(band)
  out = mask.copy()
  for start in range(0, len(ys), 2048):                # bounded memory
    y, x = ys[start:start + 2048], xs[start:start + 2048]
    n = len(y)
    cy, cx = y[:, None] + reach + steps[:, 0], x[:, None] + reach + steps[:, 1]
    sample = colour[cy, cx]                             # [n, K, 3]
    c = colour[y + reach, x + reach][:, None, None]     # [n, 1, 1, 3]
    f, b = sample[:, :, None], sample[:, None, :]       # every (inside, outside) pair
    fb = f - b
    norm = np.sum(fb * fb, -1)
    a = np.clip(np.sum((c - b) * fb, -1) / np.maximum(norm, 1e-6), 0.0, 1.0)
    err = np.sum((c - (a[..., None] * f + (1 - a[..., None]) * b)) ** 2, -1)
    valid = inner[cy, cx][:, :, None] & outer[cy, cx][:, None, :]
    valid &= norm > _MIN_EDGE_CONTRAST ** 2
    err = np.where(valid, err, np.inf).reshape(n, -1)
    best = np.argmin(err, axis=1)
    rows = np.arange(n)
    fits = err[rows, best] < np.maximum(_FIT_ABS ** 2, _FIT_REL ** 2 * norm.reshape(n, -1)[rows, best])
    alpha = a.reshape(n, -1)[rows, best]
    out[y[fits], x[fits]] = alpha[fits] > 0.5
  return out


def _box(mask: np.ndarray, others: float = 0.0) -> tuple[int, int, int, int]:
  """``(y0, x0, y1, x1)``, exclusive ends, around the largest 4-connected
  component of ``mask`` and every other one of at least ``others`` of its area."""
  count, _, stats = masks.components(mask > 0.5)
  if count <= 1:
    raise ImageError("the subject mask is empty; paint the subject white on black")
  area = stats[1:, cv2.CC_STAT_AREA]
  if others > 0:
    keep = 1 + np.flatnonzero(area >= others * area.max())
  else:
    keep = np.array([1 + int(np.argmax(area))])
  x0, y0 = int(stats[keep, cv2.CC_STAT_LEFT].min()), int(stats[keep, cv2.CC_STAT_TOP].min())
  x1 = int((stats[keep, cv2.CC_STAT_LEFT] + stats[keep, cv2.CC_STAT_WIDTH]).max())
  y1 = int((stats[keep, cv2.CC_STAT_TOP] + stats[keep, cv2.CC_STAT_HEIGHT]).max())
  return y0, x0, y1, x1


def _crop(image: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int], size: int,
          fill: float) -> tuple[np.ndarray, np.ndarray]:
  """The square window centred on ``box`` with side ``max(box side) / fill``,
  replicate-padded where it leaves the image, resized (antialiased) to ``size``."""
  H, W = mask.shape
  y0, x0, y1, x1 = box
  side = max(1, int(np.ceil(max(y1 - y0, x1 - x0) / fill)))
  top = int(np.floor((y0 + y1 - side) / 2))
  left = int(np.floor((x0 + x1 - side) / 2))
  pad = (max(0, -top), max(0, top + side - H), max(0, -left), max(0, left + side - W))
  # Replicate, not reflect: a reflected subject would show a second copy of
  # it in the crop; a mask is padded with zeros.
  img = cv2.copyMakeBorder(image, *pad, cv2.BORDER_REPLICATE)
  msk = cv2.copyMakeBorder(mask.astype(np.float32), *pad, cv2.BORDER_CONSTANT, value=0.0)
  top, left = top + pad[0], left + pad[2]
  img = img[top:top + side, left:left + side]
  msk = msk[top:top + side, left:left + side]
  interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
  crop = cv2.resize(img, (size, size), interpolation=interp)
  crop_mask = cv2.resize(msk, (size, size),
                         interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
  return crop.astype(np.uint8), np.clip(crop_mask, 0.0, 1.0).astype(np.float32)


def segment_subject(image: np.ndarray, *, mask: np.ndarray | None = None, size: int = 32,
                    fill: float = 0.6, seed: int = 0) -> SubjectCrop:
  """Finds the main subject of a photo and crops a square around it.

  Args:
    image: uint8 ``[H, W, 3]`` RGB (``load_image``).
    mask: optional float ``[H, W]`` user mask (``load_mask``); thresholded at
      0.5 and used as is instead of segmenting. Its box covers its largest
      component and every component of at least 5% of that one's area: stray
      specks do not widen the crop, a subject painted in parts stays whole.
    size: side ``S`` of the output crop.
    fill: fraction of the crop's side that the subject's longer box side spans.
    seed: seeds OpenCV's RNG (GrabCut's colour models): same input, same mask.

  Returns:
    ``SubjectCrop``: ``mask`` float32 ``[H, W]`` in {0, 1} (segmented: one
    4-connected component without holes), ``box`` ``(y0, x0, y1, x1)``,
    ``crop`` uint8 ``[S, S, 3]`` centred on the box (the image's edge pixels
    replicated where the window leaves it), ``crop_mask`` float32 ``[S, S]``
    in [0, 1], ``coverage`` the mask's fraction of the image.

  Raises:
    ImageError: a ``mask`` of another shape than the image, or empty / full.
    ValueError: a malformed ``image``, ``size < 1`` or ``fill`` not in (0, 1].
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
  if min(image.shape[:2]) < 2:
    raise ValueError(f"image must be at least 2x2 pixels, got {image.shape[:2]}")
  if size < 1 or not 0 < fill <= 1:
    raise ValueError(f"need size >= 1 and 0 < fill <= 1, got size={size}, fill={fill}")
  if mask is not None:
    mask = np.asarray(mask, np.float32)
    if mask.shape != image.shape[:2]:
      raise ImageError(f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                       f"{image.shape[1]}x{image.shape[0]}; use load_mask(path, "
                       f"image.shape[:2]) to resize it")
    binary = (mask > 0.5).astype(np.float32)
    check_mask(binary, "the mask")
    box = _box(binary, others=_PART_OF_BOX)
  else:
    binary = _segment(image, seed)[0].astype(np.float32)
    box = _box(binary)
  crop, crop_mask = _crop(image, binary, box, size, fill)
  return SubjectCrop(mask=binary, box=box, crop=crop, crop_mask=crop_mask,
                     coverage=float(binary.mean()))
