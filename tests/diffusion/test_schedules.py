"""Tests of persvid_jax/diffusion/schedules.py: tables, forward process, conversions."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from persvid_jax import config_lib
from persvid_jax.diffusion import schedules

N = 1000


@pytest.fixture(scope="module")
def tables():
  return {kind: schedules.make_schedule(kind, N) for kind in schedules.SCHEDULES}


@pytest.mark.parametrize("kind", schedules.SCHEDULES)
def test_tables_are_a_valid_diffusion(kind, tables):
  s = tables[kind]
  betas, abar = np.asarray(s.betas, np.float64), np.asarray(s.alphas_cumprod, np.float64)
  assert s.num_timesteps == N and betas.shape == abar.shape == (N,)
  assert np.all((betas > 0) & (betas < 1))
  assert np.all((abar > 0) & (abar < 1))
  assert np.all(np.diff(abar) < 0), "abar must decrease strictly"
  np.testing.assert_allclose(np.asarray(s.sqrt_alphas_cumprod) ** 2, abar, rtol=1e-5)
  # 1 - abar of the float32 abar has absolute (not relative) float32 error.
  np.testing.assert_allclose(np.asarray(s.sqrt_one_minus_alphas_cumprod) ** 2, 1 - abar,
                             rtol=1e-5, atol=1e-7)
  snr = np.asarray(schedules.snr(s, np.arange(N)), np.float64)
  assert np.all(np.diff(snr) < 0), "SNR must decrease strictly"
  # Reference in float64 from the (float32) betas: accurate also at small t.
  abar64 = np.cumprod(1 - betas)
  np.testing.assert_allclose(snr, abar64 / (1 - abar64), rtol=5e-5)
  np.testing.assert_allclose(schedules.one_minus_alphas_cumprod_at(s, np.arange(N)),
                             1 - abar64, rtol=1e-5)


def test_endpoints(tables):
  lin, scaled, cos = (np.asarray(tables[k].betas) for k in schedules.SCHEDULES)
  np.testing.assert_allclose([lin[0], lin[-1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose([scaled[0], scaled[-1]], [0.00085, 0.012], rtol=1e-6)
  # Scaled-linear is linear in sqrt(beta), not in beta.
  assert np.allclose(np.diff(np.sqrt(scaled.astype(np.float64))), np.diff(np.sqrt(scaled))[0],
                     rtol=1e-3)
  # Cosine: the last beta is the clip; abar_0 is cos^2 at (1/N + s)/(1 + s) over cos^2 at s.
  assert cos[-1] == np.float32(0.999)
  f = lambda i: np.cos((i / N + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
  np.testing.assert_allclose(float(tables["cosine"].alphas_cumprod[0]), f(1) / f(0), rtol=1e-6)
  # DDPM's linear schedule ends almost at pure noise.
  assert float(tables["linear"].alphas_cumprod[-1]) < 1e-4
  assert schedules.alphas_cumprod_at(tables["linear"], -1) == 1.0


def test_custom_endpoints_and_errors():
  s = schedules.make_schedule("linear", 10, beta_start=0.1, beta_end=0.2)
  np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [0.1, 0.2], rtol=1e-6)
  with pytest.raises(ValueError, match="unknown diffusion schedule"):
    schedules.make_schedule("sigmoid", 10)
  with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
    schedules.make_schedule("linear", 10, beta_end=1.5)


def test_from_config():
  for name, kind in (("tiny", "linear"), ("modelscope", "scaled_linear")):
    cfg = config_lib.load_config(name).diffusion
    s = schedules.from_config(cfg)
    assert s.num_timesteps == cfg.num_timesteps
    np.testing.assert_array_equal(np.asarray(s.betas),
                                  np.asarray(schedules.make_schedule(kind, 1000).betas))


def test_q_sample_mean_and_variance(tables):
  s = tables["scaled_linear"]
  rng = np.random.default_rng(0)
  t = np.array([0, 250, 999], np.int32)
  x0 = rng.uniform(-1, 1, (3, 1, 2, 2, 1)).astype(np.float32)
  a = np.asarray(s.sqrt_alphas_cumprod)[t].reshape(3, 1, 1, 1, 1)
  sig = np.asarray(s.sqrt_one_minus_alphas_cumprod)[t].reshape(3, 1, 1, 1, 1)
  # Exactly affine in the noise: mean at noise 0, scale = sqrt(1 - abar).
  mean = np.asarray(schedules.q_sample(s, x0, t, np.zeros_like(x0)))
  np.testing.assert_allclose(mean, a * x0, rtol=1e-6)
  ones = np.asarray(schedules.q_sample(s, x0, t, np.ones_like(x0)))
  np.testing.assert_allclose(ones - mean, np.broadcast_to(sig, x0.shape), rtol=1e-5)
  # Monte Carlo over many noise draws.
  noise = rng.standard_normal((4096,) + x0.shape[1:], np.float32)
  for j in range(3):
    xt = np.asarray(schedules.q_sample(s, np.broadcast_to(x0[j], noise.shape),
                                       np.full((4096,), t[j]), noise))
    np.testing.assert_allclose(xt.mean(0), a[j] * x0[j], atol=4 * sig[j, 0, 0, 0, 0] / 64)
    np.testing.assert_allclose(xt.var(0), np.broadcast_to(sig[j] ** 2, x0.shape[1:]),
                               rtol=0.1)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(kind=st.sampled_from(schedules.SCHEDULES), t=st.integers(0, N - 1),
                  seed=st.integers(0, 2**16))
def test_conversions_round_trip(kind, t, seed):
  s = schedules.make_schedule(kind, N)
  rng = np.random.default_rng(seed)
  x0 = rng.uniform(-1, 1, (2, 2, 3, 3, 2)).astype(np.float32)
  eps = rng.standard_normal(x0.shape).astype(np.float32)
  tt = np.full((2,), t, np.int32)
  x_t = schedules.q_sample(s, x0, tt, eps)
  a = float(s.sqrt_alphas_cumprod[t])
  sig = float(s.sqrt_one_minus_alphas_cumprod[t])
  v = np.asarray(schedules.v_target(s, x0, tt, eps))
  np.testing.assert_allclose(v, a * eps - sig * x0, atol=1e-5)
  for p in schedules.PREDICTIONS:
    pred = schedules.prediction_target(s, x0, tt, eps, p)
    # float32 error of x_t, amplified by 1/a (x0 from eps) or 1/sig (eps from x0).
    tol_x0 = 1e-5 + (4e-7 / a if p == "eps" else 0.0) * 10
    tol_eps = 1e-5 + (4e-7 / sig if p == "x0" else 0.0) * 10
    np.testing.assert_allclose(schedules.predict_x0(s, x_t, tt, pred, p), x0, atol=tol_x0)
    np.testing.assert_allclose(schedules.predict_eps(s, x_t, tt, pred, p), eps, atol=tol_eps)
  np.testing.assert_allclose(schedules.eps_from_x0(s, x_t, tt, x0), eps,
                             atol=1e-5 + 4e-6 / sig)
