"""Reading users' image files safely: photos and hand-made subject masks.

``load_image`` / ``load_mask`` read a photo / a hand-made mask
(``subject.segment_subject(image, mask=...)`` then skips segmentation). A file
that cannot be used (missing, a directory, empty, not an image, truncated,
tiny, over ``_MAX_PIXELS`` -- refused from its header, before any pixel is
decoded --, an empty mask) raises ``ImageError`` with one line naming it and
what to do. ``flat_range`` tells a photo of one flat colour (a blank frame, a
grey test card), which registering a concept refuses unless a mask is given.
Of an animated GIF/WebP/APNG the first frame is used.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

MIN_SIDE = 8                  # smallest image side load_image accepts
# Largest image load_image decodes (a 108 MP phone photo fits). A header
# claiming more is refused before decoding: a few-KB "decompression bomb"
# can claim gigapixels. (PIL itself only warns up to 2x its own limit.)
_MAX_PIXELS = 120_000_000
_MIN_MASK_FRACTION = 0.005    # a user mask must cover [0.5%, 99.5%] of the image


class ImageError(ValueError):
  """A user-supplied image cannot be used (the message says what is wrong and what to do)."""


def _open(path, what: str) -> Image.Image:
  """The fully decoded PIL image at ``path``, or ``ImageError`` naming it."""
  path = pathlib.Path(os.fspath(path))
  if not path.exists():
    raise ImageError(f"{what} {str(path)!r} does not exist; check the path")
  if path.is_dir():
    raise ImageError(f"{what} {str(path)!r} is a directory; pass an image file "
                     f"(.jpg, .png, ...) inside it")
  if path.stat().st_size == 0:
    raise ImageError(f"{what} {str(path)!r} is an empty file (0 bytes); re-export or "
                     f"re-download it")
  try:
    with warnings.catch_warnings():
      # Our own limit below replaces PIL's warning (which would print a
      # multi-line warning and then decode anyway).
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(path)
  except Image.UnidentifiedImageError:
    raise ImageError(f"{what} {str(path)!r} is not an image PIL can read; pass a "
                     f".jpg, .png, .webp or .bmp file") from None
  except Image.DecompressionBombError as e:
    raise ImageError(f"{what} {str(path)!r} is too large to decode ({e}); "
                     f"downscale it first") from None
  except (OSError, ValueError) as e:
    raise ImageError(f"{what} {str(path)!r} cannot be opened ({e}); check the "
                     f"file and its permissions") from None
  w, h = img.size
  if w * h > _MAX_PIXELS:
    img.close()
    raise ImageError(f"{what} {str(path)!r} claims {w}x{h} pixels ({w * h / 1e6:.0f} "
                     f"megapixels), over the {_MAX_PIXELS / 1e6:.0f}-megapixel limit; "
                     f"downscale it first")
  try:
    # Image.open only parses the header: decode everything now, so that a
    # truncated or corrupt file fails here and not deep inside segmentation.
    img.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    img.close()
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ImageError(f"{what} {str(path)!r} is truncated or corrupt ({reason}); "
                     f"re-export or re-download it") from None
  w, h = img.size
  if min(w, h) < MIN_SIDE:
    img.close()
    raise ImageError(f"{what} {str(path)!r} is {w}x{h} pixels; it needs at least "
                     f"{MIN_SIDE} pixels a side")
  return img


def _gray16(img: Image.Image) -> np.ndarray | None:
  """float ``[H, W]`` in [0, 1] for 16-bit / int / float grayscale, else None."""
  if not img.mode.startswith(("I", "F")):
    return None
  # PIL's convert("L") clips these to 255 instead of rescaling.
  a = np.asarray(img, np.float64)
  if img.mode.startswith("I;16") or (img.mode == "I" and a.max() > 255):
    return np.clip(a / 65535.0, 0, 1)
  if img.mode == "F" and a.max() <= 1.0:
    return np.clip(a, 0, 1)
  return np.clip(a / 255.0, 0, 1)


def _to_rgb(img: Image.Image) -> np.ndarray:
  """uint8 ``[H, W, 3]``; transparency is composited over white."""
  img = ImageOps.exif_transpose(img)   # phone photos: honour the rotation tag
  gray = _gray16(img)
  if gray is not None:
    g = np.round(gray * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)
  if "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info):
    # Transparent pixels often hold arbitrary colours: white is what a viewer
    # shows, and what product photos with cut-out backgrounds intend.
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), np.uint8)
  return np.asarray(img.convert("RGB"), np.uint8)


# A photo whose every channel spans at most this many levels (of 255), its
# brightest and darkest 0.5 % aside, is one flat colour: nothing to segment.
# Above camera noise on a blank card (sigma 2: ~10 levels), far below any photo
# of a thing (the 158 DreamBench photos span 125 levels or more).
FLAT_LEVELS = 12


def flat_range(image: np.ndarray) -> int | None:
  """The level range of a flat-coloured uint8 ``[H, W, 3]`` image, else None.

  Range = the largest over channels of the 99.5th minus the 0.5th percentile,
  on at most ~250k pixels (a regular subsample of large photos). Returns it
  when it is at most ``FLAT_LEVELS``: the image shows no subject.
  """
  step = max(1, int(np.sqrt(image.shape[0] * image.shape[1] / 250_000)))
  px = image[::step, ::step].reshape(-1, image.shape[-1])
  lo, hi = np.percentile(px, [0.5, 99.5], axis=0)
  levels = int(np.ceil((hi - lo).max()))
  return levels if levels <= FLAT_LEVELS else None


def load_image(path) -> np.ndarray:
  """Reads a user's photo as uint8 ``[H, W, 3]`` RGB.

  Grayscale (8/16-bit), palette and CMYK images are converted to RGB; an
  alpha channel is composited over white; the EXIF orientation is applied;
  of an animated image (GIF, WebP, APNG) the first frame is used.

  Raises:
    ImageError: one line naming the file, for a missing file, a directory,
      an empty file, a file that is not an image, a truncated or corrupt
      image (it is fully decoded here), an image under 8 pixels a side, or
      one whose header claims over 120 megapixels (refused before decoding).
  """
  with _open(path, "image") as img:
    return _to_rgb(img)


def load_mask(path, shape) -> np.ndarray:
  """Reads a user's subject mask as float32 ``[H, W]`` in {0, 1}.

  Args:
    path: an image file; white (> half intensity) is the subject. If it has a
      non-constant alpha channel, the alpha is the mask instead (cut-outs).
    shape: ``(H, W)`` of the photo; the mask is resized (nearest) to it.

  Raises:
    ImageError: unreadable file (as ``load_image``), or a mask that is empty
      or full (under 0.5% or over 99.5% of the pixels).
  """
  h, w = int(shape[0]), int(shape[1])
  with _open(path, "mask") as img:
    img = ImageOps.exif_transpose(img)
    alpha = None
    if "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info):
      alpha = np.asarray(img.convert("RGBA"), np.uint8)[..., 3]
      if alpha.min() == alpha.max():
        alpha = None              # an opaque RGBA file: the colour is the mask
    gray = _gray16(img)
    if alpha is not None:
      values = alpha.astype(np.float32) / 255.0
    elif gray is not None:
      values = gray
    else:
      values = np.asarray(img.convert("L"), np.float32) / 255.0
  binary = (values > 0.5).astype(np.uint8)
  if binary.shape != (h, w):
    binary = cv2.resize(binary, (w, h), interpolation=cv2.INTER_NEAREST)
  mask = binary.astype(np.float32)
  check_mask(mask, f"mask {str(path)!r}")
  return mask


def check_mask(mask: np.ndarray, what: str) -> None:
  """Raises ``ImageError`` (naming ``what``) unless a 0/1 float ``[H, W]`` mask covers
  between 0.5% and 99.5% of the pixels."""
  fraction = float(mask.mean())
  if fraction < _MIN_MASK_FRACTION:
    raise ImageError(f"{what} is empty ({100 * fraction:.2f}% of the pixels are "
                     f"subject); paint the subject white on black")
  if fraction > 1 - _MIN_MASK_FRACTION:
    raise ImageError(f"{what} is full ({100 * fraction:.2f}% of the pixels are "
                     f"subject); paint the background black")
