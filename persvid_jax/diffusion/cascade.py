"""The two-scale cascade: a low-res base video, then the SR network.

    base  = sample(base_denoise_fn)                        [B, T, H, W, C]
    up    = resize(base) per frame                         [B, T, H', W', C]
    cond  = q_sample(schedule, up, level, noise)           noise augmentation
    video = sample(sr_denoise_fn, cond_video=cond, noise_level=level)

Both scales run the same ``samplers.sample``. Noise augmentation (Ho et al.
2021, "Cascaded diffusion models") hides the base network's artifacts from the
SR network, which was trained on augmented real low-res videos; the level is
the timestep of the SR schedule at which the upsampled video is noised, and
the SR network is told it (``noise_level``). ``noise_augment`` is also what
the SR training stage applies to its low-res inputs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from persvid_jax.diffusion import samplers, schedules
from persvid_jax.diffusion.samplers import Sampler
from persvid_jax.diffusion.schedules import Schedule

Array = jax.Array
DenoiseFn = Callable[..., Array]


@flax.struct.dataclass
class CascadeOutput:
  """What ``cascade_sample`` returns (float32)."""
  base: Array         # [B, T, H, W, C] low-res video from the base network
  cond_video: Array   # [B, T, H', W', C] upsampled, noise-augmented base (the SR input)
  noise_level: Array  # [B] int32 augmentation timestep handed to the SR network
  video: Array        # [B, T, H', W', C'] high-res video from the SR network


def upsample_video(video: Array, size: tuple[int, int], *, method: str = "bicubic",
                   clip: bool = False) -> Array:
  """Resizes every frame of ``[B, T, H, W, C]`` to ``[B, T, *size, C]``.

  ``jax.image.resize`` with antialiasing; bicubic overshoots, so pixel-space
  callers pass ``clip=True`` to stay in [-1, 1].
  """
  b, t, _, _, c = video.shape
  out = jax.image.resize(jnp.asarray(video, jnp.float32), (b, t, *size, c), method=method)
  return jnp.clip(out, -1.0, 1.0) if clip else out


def noise_augment(schedule: Schedule, video: Array, level: Array | int | None,
                  rng: Array) -> tuple[Array, Array]:
  """Noises ``video [B, ...]`` to timestep ``level`` ([] or [B]; None: no noise).

  Returns ``(augmented [B, ...], level [B] int32)``; without augmentation the
  video is returned unchanged with level 0 (the level of the least noise).
  """
  b = video.shape[0]
  if level is None:
    return jnp.asarray(video, jnp.float32), jnp.zeros((b,), jnp.int32)
  level = jnp.broadcast_to(jnp.asarray(level, jnp.int32), (b,))
  noise = jax.random.normal(rng, video.shape, jnp.float32)
  return schedules.q_sample(schedule, video, level, noise), level


# One program rather than op-by-op dispatch between the two sampling loops.
@functools.partial(jax.jit, static_argnames=("size", "method", "clip"))
def _upsample_and_augment(schedule, base, level, rng, *, size, method, clip):
  up = upsample_video(base, size, method=method, clip=clip)
  return noise_augment(schedule, up, level, rng)


def cascade_sample(base_denoise_fn: DenoiseFn, base_params: Any,
                   sr_denoise_fn: DenoiseFn, sr_params: Any, rng: Array,
                   shapes: tuple[tuple[int, ...], tuple[int, ...]],
                   cond: Mapping[str, Any] | None = None, *,
                   sampler: Sampler, sr_sampler: Sampler | None = None,
                   sr_cond: Mapping[str, Any] | None = None,
                   noise_aug: int | Array | None = None,
                   resize_method: str = "bicubic",
                   progress: bool = False) -> CascadeOutput:
  """Samples a base video and super-resolves it.

  Args:
    base_denoise_fn: ``(params, x_t, t, **cond) -> [B, T, H, W, C]``.
    base_params: its params.
    sr_denoise_fn: ``(params, x_t, t, *, cond_video, noise_level, **sr_cond)
      -> [B, T, H', W', C']`` (a guided denoiser passes ``cond_video`` and
      ``noise_level`` to every branch as shared kwargs).
    sr_params: its params.
    rng: key; the output is a deterministic function of it.
    shapes: ``(base_shape, sr_shape)``: ``[B, T, H, W, C]`` and
      ``[B, T, H', W', C']`` (same B and T; e.g. ``H' = sr_factor * H``).
    cond: kwargs of the base denoiser (text states, detail tokens, or the
      ``uncond/cond/text_only/...`` of a guided one).
    sampler: the base ``Sampler``.
    sr_sampler: the SR ``Sampler`` (default ``sampler``); its schedule also
      noise-augments.
    sr_cond: kwargs of the SR denoiser besides ``cond_video``/``noise_level``
      (default ``cond``).
    noise_aug: augmentation timestep ([] or [B]) of the upsampled video, None for none.
    resize_method: ``jax.image.resize`` method ('bicubic', 'linear', ...).
    progress: host loops with progress bars instead of ``lax.scan`` (see ``sample``).

  Returns:
    ``CascadeOutput``.
  """
  base_shape, sr_shape = (tuple(int(d) for d in s) for s in shapes)
  if len(base_shape) != 5 or len(sr_shape) != 5 or base_shape[:2] != sr_shape[:2]:
    raise ValueError(f"cascade: shapes must be [B, T, H, W, C] with the same B and T, "
                     f"got {base_shape} and {sr_shape}")
  sr_sampler = sampler if sr_sampler is None else sr_sampler
  cond = dict(cond or {})
  sr_cond = dict(cond if sr_cond is None else sr_cond)
  base_rng, aug_rng, sr_rng = jax.random.split(rng, 3)

  # 1. Base video, low res.
  base = samplers.sample(base_denoise_fn, base_params, base_rng, base_shape, sampler=sampler,
                         cond=cond, progress=progress, desc="base")

  # 2. Upsample per frame and noise-augment.
  cond_video, level = _upsample_and_augment(
      sr_sampler.schedule, base, noise_aug, aug_rng, size=sr_shape[2:4],
      method=resize_method, clip=sampler.clip_x0)

  # 3. High-res video, conditioned on the augmented one.
  video = samplers.sample(sr_denoise_fn, sr_params, sr_rng, sr_shape, sampler=sr_sampler,
                          cond={**sr_cond, "cond_video": cond_video, "noise_level": level},
                          progress=progress, desc="super-resolution")
  return CascadeOutput(base=base, cond_video=cond_video, noise_level=level, video=video)
