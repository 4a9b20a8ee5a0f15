"""Tests of persvid_jax/diffusion/samplers.py.

An oracle denoiser (it knows x0) makes every sampler land on x0; the scan and
host-loop modes agree; the host loop compiles its step once. All oracle
programs are tiny; each (sampler kind, prediction, clip) compiles once per mode.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax import config_lib
from persvid_jax.diffusion import samplers, schedules
from tests.diffusion import oracle

# The same shape and step count as the cascade tests' base video, so that
# programs compiled here are reused there (and vice versa).
SHAPE = (2, 3, 4, 4, 3)   # [B, T, H, W, C]
STEPS = 4


@pytest.fixture(scope="module")
def x0():
  return jnp.asarray(np.random.default_rng(0).uniform(-0.9, 0.9, SHAPE).astype(np.float32))


def test_make_timesteps():
  np.testing.assert_array_equal(samplers.make_timesteps(1000, 10),
                                [999, 899, 799, 699, 599, 499, 399, 299, 199, 99])
  np.testing.assert_array_equal(samplers.make_timesteps(1000, 4, "leading"), [750, 500, 250, 0])
  np.testing.assert_array_equal(samplers.make_timesteps(10, 4, "linspace"), [9, 6, 3, 0])
  np.testing.assert_array_equal(samplers.make_timesteps(5, 5), [4, 3, 2, 1, 0])
  with pytest.raises(ValueError, match="num_steps"):
    samplers.make_timesteps(10, 11)
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.make_sampler(schedules.make_schedule("linear", 10), "euler", 2)


def test_from_config():
  cfg = config_lib.load_config("tiny").diffusion
  s = samplers.from_config(cfg)
  assert (s.kind, s.prediction, s.clip_x0, s.num_steps) == ("ddim", "eps", True, cfg.sample_steps)
  assert int(s.timesteps[0]) == cfg.num_timesteps - 1


# (kind, eta, prediction, schedule): every sampler, both predictions, every schedule.
ORACLE_CASES = [
    ("ddim", 0.0, "eps", "scaled_linear"),
    ("ddim", 1.0, "v", "linear"),
    ("ddpm", 0.0, "eps", "cosine"),
]


@pytest.mark.parametrize("kind,eta,prediction,schedule_kind", ORACLE_CASES)
def test_oracle_lands_on_x0_in_both_modes(kind, eta, prediction, schedule_kind, x0):
  schedule = schedules.make_schedule(schedule_kind, 1000)
  sampler = samplers.make_sampler(schedule, kind, STEPS, eta=eta, prediction=prediction)
  # The host loop must trace (hence compile) its step once for all steps.
  # (chex counts per underlying function, and other cases wrapped it too.)
  chex.clear_trace_counter()
  denoise = chex.assert_max_traces(oracle.ORACLES[prediction], n=1)
  rng = jax.random.key(3)
  scanned = samplers.sample(oracle.ORACLES[prediction], schedule, rng, SHAPE, sampler=sampler,
                            cond={"x0": x0})
  looped = samplers.sample(denoise, schedule, rng, SHAPE, sampler=sampler, cond={"x0": x0},
                           progress=True)
  assert scanned.shape == looped.shape == SHAPE and scanned.dtype == jnp.float32
  np.testing.assert_allclose(scanned, x0, atol=2e-5)
  np.testing.assert_allclose(looped, x0, atol=2e-5)
  np.testing.assert_allclose(scanned, looped, atol=1e-6)
  # Again, same function: a cache hit, no new trace.
  samplers.sample(denoise, schedule, rng, SHAPE, sampler=sampler, cond={"x0": x0}, progress=True)


# A wrong denoiser that reuses the oracle's compiled programs: the oracle of
# another schedule (params) for a clean video outside [-1, 1] (so clipping acts).
WRONG_PARAMS = schedules.make_schedule("cosine", 1000)


def test_ddpm_is_ddim_with_eta_one_and_clipping_holds(x0):
  # With x0 clipped and eps recomputed from it, DDPM's posterior sample equals
  # DDIM's at eta = 1, step by step, for any denoiser.
  schedule = schedules.make_schedule("linear", 1000)
  rng = jax.random.key(7)
  outs = {}
  for kind, eta in (("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.0)):
    sampler = samplers.make_sampler(schedule, kind, STEPS, eta=eta)
    outs[kind, eta] = np.asarray(samplers.sample(oracle.eps_oracle, WRONG_PARAMS, rng, SHAPE,
                                                 sampler=sampler, cond={"x0": 3 * x0}))
  # Same math, other float32 rounding, accumulated over the steps.
  np.testing.assert_allclose(outs["ddpm", 0.0], outs["ddim", 1.0], atol=5e-4)
  assert not np.allclose(outs["ddim", 0.0], outs["ddim", 1.0], atol=1e-2)
  for out in outs.values():
    assert np.all(np.abs(out) <= 1.0) and np.isfinite(out).all()
    assert np.abs(out).max() == 1.0   # the estimate is clipped


def test_deterministic_given_rng_and_no_clipping_for_latents(x0):
  schedule = schedules.make_schedule("linear", 1000)
  sampler = samplers.make_sampler(schedule, "ddim", STEPS, eta=1.0, clip_x0=False)
  a, b, c = (np.asarray(samplers.sample(oracle.eps_oracle, WRONG_PARAMS, jax.random.key(k),
                                        SHAPE, sampler=sampler, cond={"x0": 3 * x0}))
             for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert np.abs(a).max() > 1.0   # latents are not clipped
