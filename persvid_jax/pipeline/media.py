"""Writing videos: uint8 conversion, batch grids, GIF (Pillow) and MP4 (ffmpeg) files,
contact sheets (PNG).

Videos are ``[T, H, W, 3]`` (or batches ``[B, T, H, W, 3]``) in [-1, 1].
Files are written to a temporary name and renamed, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Sequence

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from persvid_jax import atomic


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
  with atomic.file(path) as tmp:
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                   duration=int(round(1000 / fps)), loop=0)
  return path


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
  return frames.repeat(scale, axis=-3).repeat(scale, axis=-2) if scale > 1 else frames


def save_mp4(path: str | os.PathLike, video, *, fps: float = 8.0, scale: int = 1
             ) -> pathlib.Path:
  """Writes ``[T, H, W, 3]`` (in [-1, 1] or uint8) as an H.264 MP4 (imageio-ffmpeg's ffmpeg).

  ``scale`` enlarges by pixel repetition; odd sizes are padded to even ones
  (yuv420p needs them), so players that ignore the pixel aspect still work.
  """
  frames = np.asarray(video)
  if frames.dtype != np.uint8:
    frames = to_uint8(frames)
  frames = _upscale(frames, scale)
  t, h, w, _ = frames.shape
  frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # ffmpeg picks the container by the extension: the temporary keeps ".mp4".
  with atomic.file(path, suffix=".mp4") as tmp:
    writer = imageio_ffmpeg.write_frames(
        str(tmp), (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
        pix_fmt_out="yuv420p", quality=8, macro_block_size=1, ffmpeg_log_level="error")
    try:
      with warnings.catch_warnings():
        # Python warns on any fork from a multithreaded (JAX) process; subprocess
        # execs ffmpeg right after the fork, which is safe.
        warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
        writer.send(None)
      for f in frames:
        writer.send(np.ascontiguousarray(f))
    finally:
      writer.close()      # ffmpeg exits (and closes tmp) before tmp is renamed or deleted
  return path


def save_video(path: str | os.PathLike, video, *, fps: float = 8.0, scale: int = 1
               ) -> pathlib.Path:
  """``save_mp4`` or ``save_gif`` by the file's suffix (``.mp4`` / ``.gif``)."""
  suffix = pathlib.Path(path).suffix.lower()
  if suffix == ".mp4":
    return save_mp4(path, video, fps=fps, scale=scale)
  if suffix == ".gif":
    return save_gif(path, video, fps=fps, scale=scale)
  raise ValueError(f"unknown video format {suffix!r} of {path}; use .mp4 or .gif")


#: Default pixel repetition and gap of ``contact_sheet`` (the evaluation sheets use
#: them; ``evaluate.figures`` cuts those sheets back into rows with them).
SHEET_SCALE, SHEET_PAD = 4, 2


def contact_sheet(rows, *, scale: int = SHEET_SCALE, pad: int = SHEET_PAD,
                  labels: Sequence[str] | None = None) -> np.ndarray:
  """One row per video: its reference image (or a blank) beside every frame,
  each row under its label (e.g. the mode and the prompt) when ``labels`` is given.

  Args:
    rows: ``[(reference uint8 [R, R, 3] or None, video [T, H, W, 3] in [-1, 1]
      or uint8)]``; the reference is resized (nearest) to the frame height.
    scale: pixel repetition of the images (small videos become visible).
    pad: white gap in pixels (before scaling).
    labels: one line of text per row (``len(rows)``), drawn at the sheet's final
      size in a band above the row; longer lines are cut to fit the width.

  Returns:
    uint8 ``[rows * ((H + pad) * scale + band) + pad * scale,
    ((1 + T) * (W + pad) + 2 * pad) * scale, 3]``, ``band`` the label band's
    height (0 without labels).
  """
  if labels is not None and len(labels) != len(rows):
    raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
  videos = [np.asarray(v) if np.asarray(v).dtype == np.uint8 else to_uint8(v)
            for _, v in rows]
  t = max(v.shape[0] for v in videos)
  h = max(v.shape[1] for v in videos)
  w = max(v.shape[2] for v in videos)
  width = (1 + t) * (w + pad) + 2 * pad
  strips = []
  for (ref, _), v in zip(rows, videos):
    strip = np.full((h + pad, width, 3), 255, np.uint8)
    if ref is not None:
      strip[pad:pad + h, pad:pad + w] = np.asarray(Image.fromarray(
          np.asarray(ref, np.uint8)).resize((w, h), Image.Resampling.NEAREST))
    else:
      strip[pad:pad + h, pad:pad + w] = 230
    for j, frame in enumerate(v):
      x = 2 * pad + (j + 1) * (w + pad)
      strip[pad:pad + frame.shape[0], x:x + frame.shape[1]] = frame
    strips.append(_upscale(strip, scale))
  parts = []
  for i, strip in enumerate(strips):
    if labels is not None:
      parts.append(_label_band(labels[i], strip.shape[1], left=pad * scale))
    parts.append(strip)
  parts.append(np.full((pad * scale, width * scale, 3), 255, np.uint8))
  return np.concatenate(parts, axis=0)


# Label text: Pillow's built-in font at this pixel size (no font files needed).
_LABEL_PX = 12
#: Height of the label band above each contact-sheet row (pixels, final size).
LABEL_BAND_PX = _LABEL_PX + 6


def _label_band(text: str, width: int, *, left: int) -> np.ndarray:
  """uint8 ``[LABEL_BAND_PX, width, 3]``: ``text`` in black on white, cut to fit."""
  font = ImageFont.load_default(size=_LABEL_PX)
  band = Image.new("RGB", (width, LABEL_BAND_PX), (255, 255, 255))
  draw = ImageDraw.Draw(band)
  while text and draw.textlength(text, font=font) > width - 2 * left:
    text = text[:-2] + "…"
  draw.text((left, 3), text, fill=(0, 0, 0), font=font)
  return np.asarray(band)


def save_png(path: str | os.PathLike, image) -> pathlib.Path:
  """Writes uint8 ``[H, W, 3]`` as PNG (atomically)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with atomic.file(path) as tmp:
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp, format="PNG")
  return path
