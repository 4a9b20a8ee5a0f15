"""The backgrounds of ``persvid_synthetic``: named scenes drawn resolution-free, pure numpy.

Each ``Background`` renders from frame-relative coordinates ``x, y`` in [0, 1]
and a numpy generator, so the same draw at another resolution shows the same
scene. ``pick_background`` chooses one that contrasts with a subject.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

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


def box_downsample(x: np.ndarray, ss: int) -> np.ndarray:
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
  return box_downsample(np.clip(img, 0, 1), ss).astype(np.float32)


def pick_background(rng: np.random.Generator, subject, exclude: int = -1) -> int:
  """A background contrasting with ``subject.primary_rgb`` (never ``exclude``): an index into ``BACKGROUNDS``."""
  ok = [i for i, b in enumerate(BACKGROUNDS)
        if i != exclude and np.linalg.norm(np.subtract(b.rgb, subject.primary_rgb)) >= _MIN_BACKGROUND_DISTANCE]
  if not ok:
    ok = [i for i in range(len(BACKGROUNDS)) if i != exclude]
  return int(ok[rng.integers(len(ok))])
