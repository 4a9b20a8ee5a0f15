"""Writing videos: uint8 conversion, batch grids, GIF files (Pillow).

Videos are ``[T, H, W, 3]`` (or batches ``[B, T, H, W, 3]``) in [-1, 1].
Files are written to a temporary name and renamed, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image


def to_uint8(video) -> np.ndarray:
  """``[..., 3]`` in [-1, 1] -> uint8 in [0, 255] (clipped)."""
  v = np.asarray(video, np.float32)
  return np.round((np.clip(v, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def video_grid(videos, columns: int | None = None, pad: int = 1) -> np.ndarray:
  """``[B, T, H, W, C] -> [T, rows*(H+pad)-pad, cols*(W+pad)-pad, C]``, white gaps."""
  v = np.asarray(videos)
  b, t, h, w, c = v.shape
  cols = columns or int(np.ceil(np.sqrt(b)))
  rows = int(np.ceil(b / cols))
  fill = np.iinfo(v.dtype).max if v.dtype == np.uint8 else 1.0
  out = np.full((t, rows * (h + pad) - pad, cols * (w + pad) - pad, c), fill, v.dtype)
  for i in range(b):
    r, q = divmod(i, cols)
    out[:, r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = v[i]
  return out


def save_gif(path: str | os.PathLike, video, *, fps: float = 8.0, scale: int = 1) -> pathlib.Path:
  """Writes ``[T, H, W, 3]`` (in [-1, 1] or uint8) as a looping GIF.

  ``scale`` enlarges small videos by pixel repetition (nearest) so that a
  32-pixel sample is visible.
  """
  frames = np.asarray(video)
  if frames.dtype != np.uint8:
    frames = to_uint8(frames)
  if scale > 1:
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  images = [Image.fromarray(f) for f in frames]
  tmp = path.with_name(path.name + ".tmp")
  images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                 duration=int(round(1000 / fps)), loop=0)
  os.replace(tmp, path)
  return path
