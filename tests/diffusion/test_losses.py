"""Tests of persvid_jax/diffusion/losses.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax.diffusion import losses, schedules
from tests.diffusion import oracle

SCHEDULE = schedules.make_schedule("scaled_linear", 1000)
SHAPE = (4, 3, 4, 4, 2)

# One compiled program per (denoiser, prediction, gamma) instead of op-by-op
# dispatch (cheaper to compile on CPU, and how training calls it).
loss_fn = jax.jit(losses.diffusion_loss, static_argnums=0,
                  static_argnames=("prediction", "min_snr_gamma"))


def _zero(params, x_t, t):
  return jnp.zeros_like(x_t)


@pytest.fixture(scope="module")
def x0():
  return jnp.asarray(np.random.default_rng(0).uniform(-1, 1, SHAPE).astype(np.float32))


@pytest.mark.parametrize("prediction", schedules.PREDICTIONS)
def test_oracle_loss_is_zero(prediction, x0):
  out = loss_fn(oracle.ORACLES[prediction], SCHEDULE, x0, jax.random.key(0),
                              {"x0": x0}, schedule=SCHEDULE, prediction=prediction,
                              min_snr_gamma=5.0)
  assert out.loss.shape == () and out.per_example.shape == out.t.shape == (SHAPE[0],)
  assert out.t.dtype == jnp.int32 and np.all((out.t >= 0) & (out.t < 1000))
  # eps from x0 amplifies float32 error by 1/sqrt(1 - abar) at small t.
  assert float(out.loss) < 1e-6, float(out.loss)


def test_wrong_denoiser_loss_is_the_target_energy(x0):
  # A zero prediction: the per-example loss is the mean squared target.
  t = jnp.array([0, 10, 500, 999], jnp.int32)
  noise = jax.random.normal(jax.random.key(1), SHAPE)
  for prediction in ("eps", "v"):
    out = loss_fn(_zero, None, x0, jax.random.key(0), schedule=SCHEDULE,
                                prediction=prediction, t=t, noise=noise)
    target = schedules.prediction_target(SCHEDULE, x0, t, noise, prediction)
    want = np.mean(np.square(np.asarray(target)).reshape(4, -1), axis=1)
    np.testing.assert_allclose(out.mse, want, rtol=1e-5)
    np.testing.assert_allclose(out.per_example, want, rtol=1e-5)   # no gamma: weight 1
    np.testing.assert_allclose(out.loss, want.mean(), rtol=1e-5)
    np.testing.assert_array_equal(out.t, t)


def test_min_snr_weights():
  t = np.arange(0, 1000, 37, dtype=np.int32)
  abar = np.cumprod(1 - np.asarray(SCHEDULE.betas, np.float64))[t]
  snr = abar / (1 - abar)
  gamma = 5.0
  want = {"eps": np.minimum(snr, gamma) / snr, "v": np.minimum(snr, gamma) / (snr + 1),
          "x0": np.minimum(snr, gamma)}
  for prediction, w in want.items():
    np.testing.assert_allclose(losses.min_snr_weight(SCHEDULE, t, gamma, prediction), w,
                               rtol=1e-4)
  eps_w = np.asarray(losses.min_snr_weight(SCHEDULE, t, gamma, "eps"))
  assert np.all(eps_w[snr <= gamma] == 1.0) and np.all(eps_w[snr > gamma] < 1.0)
  np.testing.assert_array_equal(losses.min_snr_weight(SCHEDULE, t, None, "v"), np.ones(len(t)))
  # The loss applies it per example.
  x0 = jnp.zeros((3, 1, 2, 2, 1))
  tt = jnp.array([0, 300, 999], jnp.int32)
  out = loss_fn(_zero, None, x0, jax.random.key(0),
                              schedule=SCHEDULE, prediction="v", min_snr_gamma=gamma, t=tt)
  np.testing.assert_allclose(out.weight, losses.min_snr_weight(SCHEDULE, tt, gamma, "v"))
  np.testing.assert_allclose(out.per_example, out.weight * out.mse, rtol=1e-6)


def test_frame_mask_and_example_weights(x0):
  # Exact on real frames, garbage on padded ones: masked, the loss is zero.
  frame_mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)   # [B, T]

  def padded_garbage(params, x_t, t, *, x0):
    eps = oracle.eps_oracle(SCHEDULE, x_t, t, x0=x0)
    return jnp.where(frame_mask[:, :, None, None, None], eps, 100.0)

  out = loss_fn(padded_garbage, None, x0, jax.random.key(0), {"x0": x0},
                              schedule=SCHEDULE)
  assert float(out.loss) > 1.0
  out = loss_fn(padded_garbage, None, x0, jax.random.key(0), {"x0": x0},
                              schedule=SCHEDULE, frame_mask=frame_mask)
  assert float(out.loss) < 1e-6
  np.testing.assert_array_equal(out.valid, [1, 1, 1, 0])   # no frame: does not count

  # Per-example mean over valid frames; examples weighted by example_weight.
  t = jnp.array([100, 200, 300, 400], jnp.int32)
  noise = jax.random.normal(jax.random.key(2), SHAPE)
  weights = np.array([1.0, 0.0, 2.0, 5.0], np.float32)
  out = loss_fn(_zero, None, x0, jax.random.key(0), schedule=SCHEDULE, t=t,
                              noise=noise, frame_mask=frame_mask, example_weight=weights)
  sq = np.square(np.asarray(noise)).mean(axis=(2, 3, 4))                       # [B, T]
  mse = [sq[b][frame_mask[b]].mean() if frame_mask[b].any() else 0.0 for b in range(4)]
  np.testing.assert_allclose(out.mse, mse, rtol=1e-5)
  np.testing.assert_allclose(out.loss, (mse[0] + 2 * mse[2]) / 3.0, rtol=1e-5)


def test_grad_and_jit(x0):
  # Differentiable in the params and jittable as a training step would use it.
  def denoise(scale, x_t, t, *, x0):
    return scale * oracle.eps_oracle(SCHEDULE, x_t, t, x0=x0)

  @jax.jit
  def loss_and_grad(scale, rng):
    return jax.value_and_grad(lambda s: losses.diffusion_loss(
        denoise, s, x0, rng, {"x0": x0}, schedule=SCHEDULE, min_snr_gamma=5.0).loss)(scale)

  loss, grad = loss_and_grad(jnp.float32(1.0), jax.random.key(0))
  assert float(loss) < 1e-6 and abs(float(grad)) < 1e-3        # the minimum
  loss, grad = loss_and_grad(jnp.float32(0.5), jax.random.key(0))
  assert float(loss) > 1e-3 and float(grad) < 0                 # pushes the scale up


def test_pixel_weight_is_a_weighted_mean_per_frame(x0):
  """``pixel_weight``: each frame's error is sum(w * err) / sum(w); all-ones == none."""
  t = jnp.array([100, 200, 300, 400], jnp.int32)
  noise = jax.random.normal(jax.random.key(3), SHAPE)
  frame_mask = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], bool)
  kw = dict(schedule=SCHEDULE, t=t, noise=noise, frame_mask=frame_mask)
  plain = loss_fn(_zero, None, x0, jax.random.key(0), **kw)
  ones = loss_fn(_zero, None, x0, jax.random.key(0),
                 pixel_weight=np.ones(SHAPE[:-1] + (1,), np.float32), **kw)
  np.testing.assert_allclose(ones.mse, plain.mse, rtol=1e-6)

  rng = np.random.default_rng(0)
  w = np.where(rng.random(SHAPE[:-1] + (1,)) < 0.2, 5.0, 1.0).astype(np.float32)
  out = loss_fn(_zero, None, x0, jax.random.key(0), pixel_weight=w, **kw)
  sq = np.square(np.asarray(noise, np.float64))
  wb = np.broadcast_to(w, SHAPE)
  per_frame = (sq * wb).sum(axis=(2, 3, 4)) / wb.sum(axis=(2, 3, 4))            # [B, T]
  mse = [per_frame[b][frame_mask[b]].mean() for b in range(SHAPE[0])]
  np.testing.assert_allclose(out.mse, mse, rtol=1e-5)
  assert not np.allclose(out.mse, plain.mse)
