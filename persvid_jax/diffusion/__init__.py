"""Diffusion math as pure functions of ``(denoise_fn, params, x, t)``.

Shared by both scales of the cascade. A denoiser is any
``denoise_fn(params, x_t, t, **cond) -> prediction`` (``x_t [B, T, H, W, C]``,
``t [B]`` int32, ``cond`` batch-leading keyword arrays), e.g.
``lambda p, x, t, **c: unet.apply({'params': p}, x, t, **c)``.

``schedules`` (linear / scaled-linear / cosine tables, ``q_sample``, eps/v/x0
conversions, SNR), ``losses`` (denoising loss with Min-SNR-gamma and frame
masks), ``samplers`` (DDPM / DDIM: one pure step; ``lax.scan`` or a host loop),
``guidance`` (classifier-free guidance with separate text and detail scales),
``cascade`` (base -> upsample + noise augmentation -> SR).
"""

from persvid_jax.diffusion import cascade, guidance, losses, samplers, schedules  # noqa: F401
from persvid_jax.diffusion.cascade import CascadeOutput, cascade_sample  # noqa: F401
from persvid_jax.diffusion.guidance import guided_denoise_fn  # noqa: F401
from persvid_jax.diffusion.losses import LossOutput, diffusion_loss  # noqa: F401
from persvid_jax.diffusion.samplers import Sampler, make_sampler, sample  # noqa: F401
from persvid_jax.diffusion.schedules import Schedule, make_schedule, q_sample  # noqa: F401
