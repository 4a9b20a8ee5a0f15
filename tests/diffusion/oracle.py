"""Oracle denoisers: they know the clean data and answer exactly.

The schedule travels as the ``params`` argument (not closed over), so one
module-level function per parameterisation serves every test and every
schedule of the same length, and compiled programs are reused.
"""

from __future__ import annotations

import jax.numpy as jnp

from persvid_jax.diffusion import schedules


def _answer(schedule, x_t, t, x0, prediction):
  """The exact ``prediction`` for ``x_t`` at ``t`` given the true ``x0``."""
  noise = schedules.eps_from_x0(schedule, x_t, t, x0)
  return schedules.prediction_target(schedule, x0, t, noise, prediction)


def eps_oracle(schedule, x_t, t, *, x0):
  """``(schedule, x_t [B, ...], t [B], x0=[B, ...]) -> eps [B, ...]``."""
  return _answer(schedule, x_t, t, x0, "eps")


def v_oracle(schedule, x_t, t, *, x0):
  """``-> v [B, ...]``."""
  return _answer(schedule, x_t, t, x0, "v")


def x0_oracle(schedule, x_t, t, *, x0):
  """``-> x0 [B, ...]``."""
  return _answer(schedule, x_t, t, x0, "x0")


ORACLES = {"eps": eps_oracle, "v": v_oracle, "x0": x0_oracle}


def sr_oracle(schedule, x_t, t, *, cond_video, noise_level, residual):
  """SR oracle whose clean video is ``cond_video + residual`` (``[B, T, H', W', C]``),
  so the output proves which conditioning video reached the SR network."""
  b = x_t.shape[0]
  assert cond_video.shape == x_t.shape, (cond_video.shape, x_t.shape)
  assert noise_level.shape == (b,) and noise_level.dtype == jnp.int32, noise_level
  return _answer(schedule, x_t, t, cond_video + residual, "eps")
