"""The three training stages as loss functions over the model stack.

(a) ``base``: text-to-video at the base resolution (images are 1-frame
    videos via ``frame_mask``); text encoder + base generator.
(b) ``sr``: the higher-resolution generator, conditioned on the base-size
    video upsampled back and noise-augmented at a random level (so that at
    inference it tolerates the base network's imperfect samples).
(c) ``personalize``: the training recipe's last stage. The caption with the subject's words
    replaced by ``<c0>`` is encoded; the *reference* image (the same subject
    in another pose and background, masked to the subject) goes through the
    image encoder and the mapper, whose K tokens are swapped in for ``<c0>``;
    the extractor's detail tokens from the same masked reference enter the
    generator's decoupled cross-attention; the denoising loss on the target
    video trains mapper + extractor + detail attention (the rest per
    ``config.train.trainable``).

Every stage drops conditions independently (text -> the empty prompt,
reference tokens -> the raw placeholder embedding, detail tokens -> the
extractor's learned null tokens) so that classifier-free guidance works per
condition and the plain-text / text+scene modes are trained, not hoped for.

A loss function has the signature ``loss_fn(params, batch, rng) -> (loss,
metrics)`` with ``params = {network: params}`` and ``batch`` the device-side
arrays of ``persvid_jax.data.pipeline`` (``video, frame_mask,
caption_tokens, placeholder_caption_tokens, reference, reference_mask,
has_reference``).

Latent space (``config.latent.enabled``): every stage also holds the frozen
VAE (network ``vae``, never trained: its params pass through
``stop_gradient`` and no ``trainable`` pattern may name it) and encodes the
pixel batch inside the loss (``to_diffusion_space``), so that the jitted step
runs the VAE sharded with the batch, while data, masks, losses and previews
stay unchanged. Inside the step rather than in the input pipeline because
the data is rendered on the fly by numpy workers without devices (nothing
to cache), and the VAE then follows the mesh like every other network. The
base stage encodes the video downsampled to the base *pixel* size; the SR
stage encodes the full video (its target) and, for its low-res condition,
the downsampled video (the latents the base network learns to generate),
upsampled in latent space as the cascade does at inference. The subject
mask is resized to the latent size (``config.video``).

The conditions themselves (reference and detail tokens, the concept swap, the
diffusion space) are ``concepts.conditioning``'s, shared with generation and
the probe; this module adds what only training does: dropping them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from persvid_jax import config_lib
from persvid_jax.concepts import conditioning
from persvid_jax.concepts.conditioning import (
    encode_text, low_res_condition, personalization_conditions, resize_video,
    to_diffusion_space)
from persvid_jax.diffusion import cascade, losses, schedules
from persvid_jax.models import stack as stack_lib
from persvid_jax.models.stack import base_denoise_fn, sr_denoise_fn

# Defined in config_lib, which checks configs before jax is imported.
STAGES = config_lib.TRAIN_STAGES

# Networks each stage runs (and therefore holds in its TrainState).
STAGE_NETWORKS = {
    "base": ("text_encoder", "unet"),
    "sr": ("text_encoder", "sr_unet"),
    "personalize": ("text_encoder", "image_encoder", "mapper", "extractor", "unet"),
}

# The batch keys each stage reads (the rest stays on the host).
STAGE_BATCH_KEYS = {
    "base": ("video", "frame_mask", "caption_tokens"),
    "sr": ("video", "frame_mask", "caption_tokens"),
    "personalize": ("video", "frame_mask", "caption_tokens", "placeholder_caption_tokens",
                    "reference", "reference_mask", "has_reference"),
}



def stage_networks(stage: str, config) -> tuple[str, ...]:
  """``STAGE_NETWORKS[stage]``, plus the frozen VAE in latent space."""
  return STAGE_NETWORKS[stage] + (
      (stack_lib.VAE,) if stack_lib.latent_enabled(config) else ())


def batch_keys(stage: str, config) -> tuple[str, ...]:
  """The batch keys ``stage`` reads under ``config`` (``STAGE_BATCH_KEYS`` +
  the subject mask when ``config.train.subject_loss_weight`` != 1)."""
  keys = STAGE_BATCH_KEYS[stage]
  if stage in ("base", "personalize") and _subject_weight(config) != 1.0:
    keys += ("mask",)
  return keys


def _subject_weight(config) -> float:
  w = float(config.train.get("subject_loss_weight", 1.0))
  if w < 0:
    raise ValueError(f"config.train.subject_loss_weight is {w}; use a value >= 0 (1 = off)")
  return w


def _pixel_weight(ctx: "StageContext", batch: dict):
  """``[B, T, h, w, 1]`` loss weights at the base scale (``config.video``: latent
  sizes in latent space): ``subject_loss_weight`` on the subject (the renderer's
  mask), 1 elsewhere; None when the weight is 1.

  The subject covers ~5% of a demo frame, so with a plain mean its identity
  (colour, pattern) is a small share of the loss and the background is learnt
  first (measured: the demo model rendered backgrounds from the text but the
  subject as the mean colour, whatever the reference).
  """
  w = _subject_weight(ctx.config)
  if w == 1.0:
    return None
  c = ctx.config
  # Antialiased linear resize of a 0/1 mask: the subject's coverage of each pixel.
  mask = jnp.clip(resize_video(batch["mask"], c.video.height, c.video.width), 0.0, 1.0)
  return 1.0 + (w - 1.0) * mask


LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class StageContext(conditioning.Context):
  """What a stage's loss closes over (static: modules, constants): the
  conditioning's ``stack``, ``config``, ``placeholder_start``, and these."""
  schedule: schedules.Schedule
  null_tokens: np.ndarray       # [L] int32, the empty prompt


def _drop(rng: jax.Array, p: float, batch: int) -> jax.Array:
  """``[B]`` bool: True where the condition is dropped (probability ``p``)."""
  return jax.random.bernoulli(rng, p, (batch,)) if p > 0 else jnp.zeros((batch,), bool)


def _text_tokens(ctx: StageContext, tokens: jax.Array, drop: jax.Array) -> jax.Array:
  null = jnp.asarray(ctx.null_tokens, jnp.int32)[None]
  return jnp.where(drop[:, None], null, tokens)


def _loss_metrics(out: losses.LossOutput) -> tuple[jax.Array, dict]:
  return out.loss, {"loss": out.loss, "mse": jnp.mean(out.mse)}


def random_crop(videos, size: int, rng: jax.Array):
  """The same random ``size x size`` window of each video, per row.

  Args:
    videos: tuple of ``[B, T, H, W, C_i]`` arrays (same B, H, W).
    size: crop side, ``<= min(H, W)``.
    rng: key; the window of row ``b`` is drawn independently.

  Returns:
    tuple of ``[B, T, size, size, C_i]``.
  """
  b, _, h, w, _ = videos[0].shape
  ky, kx = jax.random.split(rng)
  y0 = jax.random.randint(ky, (b,), 0, h - size + 1)
  x0 = jax.random.randint(kx, (b,), 0, w - size + 1)

  def one(v, y, x):
    return jax.lax.dynamic_slice(v, (0, y, x, 0), (v.shape[0], size, size, v.shape[-1]))
  return tuple(jax.vmap(one)(v, y0, x0) for v in videos)


def _diffusion_kwargs(ctx: StageContext) -> dict:
  d = ctx.config.diffusion
  return dict(schedule=ctx.schedule, prediction=d.prediction, min_snr_gamma=d.min_snr_gamma)


def base_loss(ctx: StageContext) -> LossFn:
  """Stage (a): text -> base-resolution video."""
  stack, c = ctx.stack, ctx.config

  def loss_fn(params, batch, rng):
    rng_drop, rng_loss = jax.random.split(rng)
    video = to_diffusion_space(
        ctx, params, resize_video(batch["video"], *stack_lib.pixel_size(c)), rng)
    b = video.shape[0]
    drop_text = _drop(rng_drop, c.train.p_drop_text, b)
    tokens = _text_tokens(ctx, batch["caption_tokens"], drop_text)
    context = encode_text(ctx, params, tokens)

    out = losses.diffusion_loss(base_denoise_fn(stack), params["unet"], video, rng_loss,
                                dict(context=context), frame_mask=batch["frame_mask"],
                                pixel_weight=_pixel_weight(ctx, batch),
                                **_diffusion_kwargs(ctx))
    return _loss_metrics(out)

  return loss_fn


def sr_loss(ctx: StageContext) -> LossFn:
  """Stage (b): base-size video upsampled + noise-augmented -> full resolution."""
  stack, c = ctx.stack, ctx.config

  def loss_fn(params, batch, rng):
    rng_drop, rng_aug, rng_level, rng_loss, rng_crop = jax.random.split(rng, 5)
    video = to_diffusion_space(ctx, params, batch["video"], rng)
    b, _, h, w, _ = video.shape
    up = low_res_condition(ctx, params, batch["video"], (h, w), rng_aug)
    max_level = c.diffusion.sr_noise_aug or 0
    # Train on a range of augmentation levels; inference picks one.
    level = jax.random.randint(rng_level, (b,), 0, 2 * max_level + 1, dtype=jnp.int32)
    cond_video, level = cascade.noise_augment(ctx.schedule, up, level, rng_aug)
    crop = c.train.get("sr_crop")
    if crop and crop < min(h, w):
      # The SR network is convolutional and conditioned on the upsampled
      # video, so it learns on random crops (as Imagen's SR stages do):
      # (h*w / crop^2)x cheaper steps; it samples at the full size.
      video, cond_video = random_crop((video, cond_video), crop, rng_crop)
    drop_text = _drop(rng_drop, c.train.p_drop_text, b)
    tokens = _text_tokens(ctx, batch["caption_tokens"], drop_text)
    context = encode_text(ctx, params, tokens)

    out = losses.diffusion_loss(
        sr_denoise_fn(stack), params["sr_unet"], video, rng_loss,
        dict(context=context, cond_video=cond_video, noise_level=level),
        frame_mask=batch["frame_mask"], **_diffusion_kwargs(ctx))
    return _loss_metrics(out)

  return loss_fn


def personalize_loss(ctx: StageContext) -> LossFn:
  """Stage (c), ``personalize``: see the module docstring."""
  stack, c = ctx.stack, ctx.config

  def loss_fn(params, batch, rng):
    r_text, r_ref, r_detail, r_plain, rng_loss = jax.random.split(rng, 5)
    video = to_diffusion_space(
        ctx, params, resize_video(batch["video"], *stack_lib.pixel_size(c)), rng)
    b = video.shape[0]
    # Rows that keep the plain caption (the subject in words, no placeholder,
    # no reference tokens): the "text" and "text + non-target image" modes
    # stay trained while the generator adapts to the new conditions.
    plain = _drop(r_plain, c.train.get("p_plain_caption", 0.0), b)
    tokens = jnp.where(plain[:, None], batch["caption_tokens"],
                       batch["placeholder_caption_tokens"])
    drop_text = _drop(r_text, c.train.p_drop_text, b)
    tokens = _text_tokens(ctx, tokens, drop_text)
    has_ref = batch["has_reference"] > 0.5
    context, detail = personalization_conditions(
        ctx, params, batch["reference"], batch["reference_mask"], has_ref, tokens,
        use_ref=~_drop(r_ref, c.train.p_drop_ref, b) & ~plain,
        use_detail=~_drop(r_detail, c.train.p_drop_detail, b))

    out = losses.diffusion_loss(base_denoise_fn(stack), params["unet"], video, rng_loss,
                                dict(context=context, detail_tokens=detail),
                                frame_mask=batch["frame_mask"],
                                pixel_weight=_pixel_weight(ctx, batch),
                                **_diffusion_kwargs(ctx))
    return _loss_metrics(out)

  return loss_fn


def make_loss_fn(stage: str, ctx: StageContext) -> LossFn:
  """The loss of ``stage`` (one of ``STAGES``)."""
  if stage not in STAGES:
    raise ValueError(f"config.train.stage is {stage!r}; use one of {STAGES}")
  return {"base": base_loss, "sr": sr_loss, "personalize": personalize_loss}[stage](ctx)
