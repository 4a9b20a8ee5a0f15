"""The denoising loss, shared by the base and SR stages.

``denoise_fn(params, x_t, t, **cond) -> prediction`` is any denoiser: ``x_t``
``[B, T, H, W, C]`` (or any ``[B, ...]``), ``t [B]`` int32, ``cond`` keyword
arrays with a leading batch axis (text states, detail tokens, the SR network's
``cond_video`` and ``noise_level``, ...). Images are 1-frame videos; when a batch
pads them (or short clips) to ``T`` frames, ``frame_mask [B, T]`` says which
frames are real and only those count.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import chex
import flax.struct
import jax
import jax.numpy as jnp

from persvid_jax.diffusion import schedules
from persvid_jax.diffusion.schedules import Schedule

Array = jax.Array
DenoiseFn = Callable[..., Array]


@flax.struct.dataclass
class LossOutput:
  """What ``diffusion_loss`` returns (vdm-style; everything float32 unless said)."""
  loss: Array          # [] weighted mean of per_example over the examples that count
  per_example: Array   # [B] min-SNR weight * masked MSE
  mse: Array           # [B] masked MSE of the prediction, unweighted (for logging)
  weight: Array        # [B] min-SNR weight (1 without gamma)
  t: Array             # [B] int32 sampled timesteps
  valid: Array         # [B] weight of each example in `loss` (example_weight, 0 if no frame)


def min_snr_weight(schedule: Schedule, t: Array, gamma: float | None,
                   prediction: str) -> Array:
  """Min-SNR-gamma loss weight (Hang et al. 2023) per example, ``[B]``.

  Clamping the effective weight at ``gamma`` keeps the many easy low-noise
  timesteps from dominating the gradient. Expressed in each parameterisation's
  own loss (the MSE of an eps / v / x0 output):

    eps: min(SNR, gamma) / SNR     (eps-MSE already carries a factor SNR)
    v:   min(SNR, gamma) / (SNR + 1)
    x0:  min(SNR, gamma)

  ``gamma=None`` gives 1 (the plain "simple" loss).
  """
  t = jnp.asarray(t, jnp.int32)
  if gamma is None:
    return jnp.ones(t.shape, jnp.float32)
  s = schedules.snr(schedule, t)
  clamped = jnp.minimum(s, gamma)
  if prediction == "eps":
    return clamped / s
  if prediction == "v":
    return clamped / (s + 1.0)
  if prediction == "x0":
    return clamped
  raise ValueError(f"unknown prediction {prediction!r}; known: {schedules.PREDICTIONS}")


def diffusion_loss(denoise_fn: DenoiseFn, params: Any, x0: Array, rng: Array,
                   cond: Mapping[str, Any] | None = None, *,
                   schedule: Schedule,
                   prediction: str = "eps",
                   min_snr_gamma: float | None = None,
                   frame_mask: Array | None = None,
                   example_weight: Array | None = None,
                   pixel_weight: Array | None = None,
                   t: Array | None = None,
                   noise: Array | None = None) -> LossOutput:
  """Denoising loss at uniformly sampled timesteps.

  Args:
    denoise_fn: ``(params, x_t, t, **cond) -> [B, ...]`` prediction.
    params: the denoiser's params (differentiate the loss w.r.t. them).
    x0: ``[B, T, H, W, C]`` clean videos (or any ``[B, ...]``).
    rng: key for the timesteps and the noise.
    cond: keyword inputs of ``denoise_fn``.
    schedule: the noise schedule.
    prediction: what the denoiser outputs: 'eps', 'v' or 'x0'.
    min_snr_gamma: Min-SNR-gamma clamp, or None for uniform weights.
    frame_mask: optional ``[B, T]`` (bool or 0/1): frames that count; padded
      frames (images as 1-frame videos in a video batch) are excluded from the mean.
    example_weight: optional ``[B]`` non-negative weight of each example
      (0 drops padding examples of a partial batch).
    pixel_weight: optional non-negative weights broadcastable to ``x0``
      (e.g. ``[B, T, H, W, 1]``, larger on the subject): each frame's error
      becomes the weighted mean ``sum(w * err) / sum(w)``, so the loss keeps
      its scale and the weighted pixels count ``w`` times as much.
    t, noise: optional fixed ``[B]`` timesteps / ``[B, ...]`` noise (tests, evals);
      sampled from ``rng`` when None.

  Returns:
    ``LossOutput``. Each example's MSE is a mean over its valid elements, so an
    image counts as much as a video; ``loss`` is the ``valid``-weighted mean of
    ``per_example``.
  """
  # 1. Timesteps and noise.
  x0 = jnp.asarray(x0, jnp.float32)
  b = x0.shape[0]
  t_rng, noise_rng = jax.random.split(rng)
  if t is None:
    t = jax.random.randint(t_rng, (b,), 0, schedule.num_timesteps, dtype=jnp.int32)
  t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))
  if noise is None:
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
  chex.assert_equal_shape([x0, noise])

  # 2. Forward process and prediction.
  x_t = schedules.q_sample(schedule, x0, t, noise)
  pred = jnp.asarray(denoise_fn(params, x_t, t, **dict(cond or {})), jnp.float32)
  chex.assert_equal_shape([pred, x0])
  target = schedules.prediction_target(schedule, x0, t, noise, prediction)
  sq = jnp.square(pred - target)
  if pixel_weight is None:
    mean = lambda e, axis: jnp.mean(e, axis=axis)
  else:
    pw = jnp.broadcast_to(jnp.asarray(pixel_weight, jnp.float32), sq.shape)
    sq_w = sq * pw
    def mean(e, axis):   # e is sq reshaped; the same reshape of the weights
      w = pw.reshape(e.shape)
      return jnp.sum(sq_w.reshape(e.shape), axis=axis) / jnp.maximum(
          jnp.sum(w, axis=axis), 1e-8)

  # 3. Masked per-example mean: frames outside the mask count neither in the
  # numerator nor in the denominator.
  if frame_mask is None:
    mse = mean(sq.reshape(b, -1), axis=-1)
    has_frames = jnp.ones((b,), jnp.float32)
  else:
    chex.assert_shape(frame_mask, x0.shape[:2])
    m = jnp.asarray(frame_mask, jnp.float32)
    per_frame = mean(sq.reshape(sq.shape[:2] + (-1,)), axis=-1)        # [B, T]
    count = jnp.sum(m, axis=1)                                         # [B]
    mse = jnp.sum(per_frame * m, axis=1) / jnp.maximum(count, 1.0)
    has_frames = (count > 0).astype(jnp.float32)

  # 4. Min-SNR weighting and the weighted mean over examples.
  weight = min_snr_weight(schedule, t, min_snr_gamma, prediction)
  per_example = weight * mse
  valid = has_frames if example_weight is None else (
      has_frames * jnp.asarray(example_weight, jnp.float32))
  loss = jnp.sum(valid * per_example) / jnp.maximum(jnp.sum(valid), 1e-8)
  return LossOutput(loss=loss, per_example=per_example, mse=mse, weight=weight, t=t,
                    valid=valid)
