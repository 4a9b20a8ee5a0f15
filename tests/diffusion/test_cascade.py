"""Tests of persvid_jax/diffusion/cascade.py: oracles, then the real tiny UNets."""

from __future__ import annotations

import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax.diffusion import cascade, guidance, samplers, schedules
from persvid_jax.models.unet3d import UNet3D
from tests.diffusion import oracle

# The base shape and step count of test_samplers.py: its programs are reused.
BASE = (2, 3, 4, 4, 3)    # [B, T, H, W, C]
SR = (2, 3, 8, 8, 3)      # [B, T, 2H, 2W, C]
SCHEDULE = schedules.make_schedule("linear", 1000)
STEPS = 4


def _targets():
  rng = np.random.default_rng(0)
  base = rng.uniform(-0.5, 0.5, BASE).astype(np.float32)
  residual = rng.uniform(-0.3, 0.3, SR).astype(np.float32)
  return jnp.asarray(base), jnp.asarray(residual)


def test_upsample_video_is_per_frame():
  upsample = jax.jit(cascade.upsample_video, static_argnames=("size", "method", "clip"))
  # Frames of different constants stay constant: no mixing across time.
  video = jnp.broadcast_to(jnp.arange(3.0)[None, :, None, None, None] / 3, BASE)
  for method in ("bicubic", "linear"):
    up = upsample(video, (8, 8), method=method)
    assert up.shape == SR
    np.testing.assert_allclose(up, jnp.broadcast_to(video[:, :, :1, :1], SR), atol=1e-6)
  # Bicubic overshoots a step edge; pixel-space callers clip.
  edge = jnp.where(jnp.arange(4)[:, None] < 2, -1.0, 1.0)[None, None, :, :, None] * jnp.ones(BASE)
  assert float(jnp.abs(upsample(edge, (8, 8), method="bicubic")).max()) > 1.0
  assert float(jnp.abs(upsample(edge, (8, 8), method="bicubic", clip=True)).max()) == 1.0


def test_oracle_cascade_returns_the_targets():
  base_x0, residual = _targets()
  sampler = samplers.make_sampler(SCHEDULE, "ddim", STEPS)
  out = cascade.cascade_sample(oracle.eps_oracle, SCHEDULE, oracle.sr_oracle, SCHEDULE,
                               jax.random.key(0), (BASE, SR), {"x0": base_x0},
                               sr_cond={"residual": residual}, sampler=sampler,
                               noise_aug=None)
  assert out.base.shape == BASE and out.video.shape == out.cond_video.shape == SR
  np.testing.assert_allclose(out.base, base_x0, atol=2e-5)
  # Without augmentation the SR network sees exactly the upsampled base ...
  up = cascade.upsample_video(base_x0, SR[2:4], clip=True)   # (eager: a few ops)
  np.testing.assert_allclose(out.cond_video, up, atol=5e-5)
  np.testing.assert_array_equal(out.noise_level, [0, 0])
  # ... and the SR oracle's clean video is that plus the residual.
  np.testing.assert_allclose(out.video, up + residual, atol=1e-4)


def test_noise_augmentation():
  base_x0, residual = _targets()
  level = 400
  sampler = samplers.make_sampler(SCHEDULE, "ddim", STEPS, eta=1.0, clip_x0=False)
  kw = dict(sr_cond={"residual": residual}, sampler=sampler, noise_aug=level)
  args = (oracle.eps_oracle, SCHEDULE, oracle.sr_oracle, SCHEDULE, jax.random.key(1),
          (BASE, SR), {"x0": base_x0})
  out = cascade.cascade_sample(*args, **kw)
  np.testing.assert_array_equal(out.noise_level, [level, level])
  up = cascade.upsample_video(base_x0, SR[2:4])
  a = float(SCHEDULE.sqrt_alphas_cumprod[level])
  s = float(SCHEDULE.sqrt_one_minus_alphas_cumprod[level])
  z = (np.asarray(out.cond_video) - a * np.asarray(up)) / s      # the augmentation noise
  assert abs(z.mean()) < 0.1 and abs(z.std() - 1.0) < 0.1
  np.testing.assert_allclose(out.video, out.cond_video + residual, atol=1e-4)


def test_shape_errors():
  sampler = samplers.make_sampler(SCHEDULE, "ddim", 2)
  with pytest.raises(ValueError, match="same B and T"):
    cascade.cascade_sample(oracle.eps_oracle, SCHEDULE, oracle.sr_oracle, SCHEDULE,
                           jax.random.key(0), (BASE, (2, 5, 8, 8, 3)), sampler=sampler)


# ----------------------------------------------------------------------------
# The real tiny generators, guided with separate text and detail scales.
# ----------------------------------------------------------------------------

def _random_params(model, *args, **kwargs):
  """Params of the right tree from ``jax.eval_shape`` (no init compile: a jitted
  init of a tiny UNet takes ~20 s on 2 CPU cores, its many RNG streams dominate),
  drawn with numpy at a 1/sqrt(fan_in) scale."""
  abstract = jax.eval_shape(lambda k: model.init(k, *args, **kwargs), jax.random.key(0))
  rng = np.random.default_rng(0)

  def draw(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in))

  return jax.tree.map(draw, nn.meta.unbox(abstract))


@pytest.mark.slow
def test_real_tiny_unets_cascade_end_to_end(tiny_config):
  cfg = tiny_config
  v = cfg.video
  # Fewer frames and half the config's frame size: the same code, a faster run
  # (any size divisible by 2 ** (levels - 1) works).
  b, frames, h, w = 1, 2, v.height // 2, v.width // 2
  base_shape = (b, frames, h, w, v.channels)
  sr_shape = (b, frames, h * v.sr_factor, w * v.sr_factor, v.channels)
  base_model, sr_model = UNet3D.from_config(cfg.unet), UNet3D.from_config(cfg.sr_unet)

  rng = np.random.default_rng(1)
  length, d = 6, cfg.text.width
  text = jnp.asarray(rng.standard_normal((b, length, d)).astype(np.float32))
  null_text = jnp.zeros((b, length, d))
  detail = jnp.asarray(rng.standard_normal((b, cfg.concepts.detail_tokens,
                                            cfg.extractor.detail_dim)).astype(np.float32))
  null_detail = jnp.zeros_like(detail)
  t0 = jnp.zeros((b,), jnp.int32)
  base_params = _random_params(base_model, jnp.zeros(base_shape), t0, text,
                               detail_tokens=detail)
  sr_params = _random_params(sr_model, jnp.zeros(sr_shape), t0, text, detail_tokens=detail,
                             cond_video=jnp.zeros(sr_shape), noise_level=t0)

  dc = cfg.diffusion.copy_and_resolve_references()
  dc.sample_steps = 2
  sampler = samplers.from_config(dc)
  assert sampler.clip_x0   # pixel space
  assert dc.guidance_detail is not None   # three branches: text and detail scales
  cond = dict(uncond=dict(context=null_text, detail_tokens=null_detail),
              text_only=dict(context=text, detail_tokens=null_detail),
              cond=dict(context=text, detail_tokens=detail),
              text_scale=dc.guidance_text, detail_scale=dc.guidance_detail)
  # Host loops (progress bars): each network's step is traced and compiled
  # once for all steps, and the guided branches are one UNet call per step.
  # (chex tells functions apart by their source, so two defs, not one factory.)
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=1)
  def base_fn(variables, x_t, t, **kwargs):
    return base_model.apply(variables, x_t, t, **kwargs)

  @chex.assert_max_traces(n=1)
  def sr_fn(variables, x_t, t, **kwargs):
    return sr_model.apply(variables, x_t, t, **kwargs)

  start = time.perf_counter()
  out = cascade.cascade_sample(
      guidance.guided_denoise_fn(base_fn), base_params,
      guidance.guided_denoise_fn(sr_fn), sr_params, jax.random.key(0),
      (base_shape, sr_shape), cond, sampler=sampler, noise_aug=dc.sr_noise_aug,
      resize_method=dc.resize_method, progress=True)
  out = jax.device_get(out)
  print(f"tiny cascade (compile + run): {time.perf_counter() - start:.1f} s")
  assert out.base.shape == base_shape and out.video.shape == sr_shape
  for video in (out.base, out.video):
    assert np.isfinite(video).all()
    assert np.abs(video).max() <= 1.0 and video.std() > 0
  np.testing.assert_array_equal(out.noise_level, [dc.sr_noise_aug])
