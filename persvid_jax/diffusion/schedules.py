"""Noise schedules, forward noising and conversions between parameterisations.

A discrete variance-preserving diffusion with ``N`` timesteps ``t = 0..N-1``::

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,   eps ~ N(0, I)
    abar_t = prod_{s <= t} (1 - beta_s),                SNR(t) = abar_t / (1 - abar_t)

The denoiser predicts one of three equivalent targets, each an affine function
of the others given ``x_t`` (so guidance, a linear combination of predictions,
means the same in all three):

    'eps': eps
    'v':   v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0      (Salimans & Ho 2022)
    'x0':  x0

Timesteps are integer indices into the schedule's arrays; ``t = -1`` stands for
"before the first step" (``abar = 1``, clean data), which is where every
sampler's last step lands.

The tables are computed in float64 with numpy and stored as float32 device
arrays. ``Schedule`` is a pytree whose arrays are leaves, so two schedules of
the same length share every compiled program that takes them as arguments.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")


@flax.struct.dataclass
class Schedule:
  """The per-timestep tables of a discrete diffusion (all ``[N]`` float32)."""
  betas: Array                          # [N] beta_t
  alphas_cumprod: Array                 # [N] abar_t, decreasing in (0, 1)
  sqrt_alphas_cumprod: Array            # [N] sqrt(abar_t): signal scale of x_t
  sqrt_one_minus_alphas_cumprod: Array  # [N] sqrt(1 - abar_t): noise scale of x_t
  num_timesteps: int = flax.struct.field(pytree_node=False)  # N


def _betas(kind: str, n: int, beta_start: float | None, beta_end: float | None,
           cosine_s: float, max_beta: float) -> np.ndarray:
  """``[n]`` float64 betas of a named schedule."""
  if kind == "linear":
    # DDPM (Ho et al. 2020): linear in beta. Not rescaled by 1000 / n (as
    # diffusers), so the endpoints are the named ones for every n.
    return np.linspace(1e-4 if beta_start is None else beta_start,
                       0.02 if beta_end is None else beta_end, n, dtype=np.float64)
  if kind == "scaled_linear":
    # Stable Diffusion / ModelScope: linear in sqrt(beta).
    start = 0.00085 if beta_start is None else beta_start
    end = 0.012 if beta_end is None else beta_end
    return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
  if kind == "cosine":
    # Nichol & Dhariwal 2021: abar(t) = f(t) / f(0), f(t) = cos^2((t/n + s)/(1 + s) * pi/2);
    # betas clipped at max_beta because abar(n) = 0 would make the last beta 1.
    def f(i):
      return math.cos((i / n + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return np.array([min(1.0 - f(i + 1) / f(i), max_beta) for i in range(n)], np.float64)
  raise ValueError(f"unknown diffusion schedule {kind!r}; known: {SCHEDULES}")


def make_schedule(kind: str = "linear", num_timesteps: int = 1000, *,
                  beta_start: float | None = None, beta_end: float | None = None,
                  cosine_s: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """Builds a schedule.

  Args:
    kind: 'linear' (DDPM, betas 1e-4..0.02), 'scaled_linear' (SD/ModelScope,
      linear in sqrt(beta) over 0.00085..0.012) or 'cosine' (Nichol & Dhariwal).
    num_timesteps: N.
    beta_start, beta_end: override the (scaled-)linear endpoints.
    cosine_s, max_beta: the cosine schedule's offset and beta clip.

  Returns:
    A ``Schedule`` with ``[N]`` float32 tables.
  """
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
  betas = _betas(kind, num_timesteps, beta_start, beta_end, cosine_s, max_beta)
  if not (np.all(betas > 0) and np.all(betas < 1)):
    raise ValueError(f"{kind} schedule: betas must lie in (0, 1), got "
                     f"[{betas.min()}, {betas.max()}]")
  abar = np.cumprod(1.0 - betas)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  return Schedule(betas=f32(betas), alphas_cumprod=f32(abar),
                  sqrt_alphas_cumprod=f32(np.sqrt(abar)),
                  sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
                  num_timesteps=num_timesteps)


def from_config(diffusion_config) -> Schedule:
  """``make_schedule`` from ``config.diffusion`` (fields ``schedule``, ``num_timesteps``,
  optional ``beta_start`` / ``beta_end``)."""
  get = diffusion_config.get
  return make_schedule(diffusion_config.schedule, diffusion_config.num_timesteps,
                       beta_start=get("beta_start", None), beta_end=get("beta_end", None))


# ----------------------------------------------------------------------------
# Gathers.
# ----------------------------------------------------------------------------

def _at(table: Array, t: Array, ndim: int) -> Array:
  """``table[t]`` for ``t`` [] or [B], shaped ``[B, 1, ..., 1]`` to broadcast over
  an ``ndim``-rank ``x``."""
  v = jnp.take(table, jnp.asarray(t, jnp.int32))
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def alphas_cumprod_at(schedule: Schedule, t: Array) -> Array:
  """``abar_t`` for ``t`` [] or [B]; ``t < 0`` gives 1 (clean data). Same shape as ``t``."""
  t = jnp.asarray(t, jnp.int32)
  return jnp.where(t >= 0, jnp.take(schedule.alphas_cumprod, jnp.maximum(t, 0)), 1.0)


def one_minus_alphas_cumprod_at(schedule: Schedule, t: Array) -> Array:
  """``1 - abar_t`` for ``t`` [] or [B]; 0 for ``t < 0``. Same shape as ``t``.

  Read from the float64-derived noise-scale table rather than as ``1 - abar``
  in float32, which keeps only ~3 significant digits at small t (abar ~ 1).
  """
  t = jnp.asarray(t, jnp.int32)
  sigma = jnp.take(schedule.sqrt_one_minus_alphas_cumprod, jnp.maximum(t, 0))
  return jnp.where(t >= 0, jnp.square(sigma), 0.0)


def snr(schedule: Schedule, t: Array) -> Array:
  """Signal-to-noise ratio ``abar_t / (1 - abar_t)``, same shape as ``t``, decreasing in t."""
  t = jnp.asarray(t, jnp.int32)
  return (jnp.square(jnp.take(schedule.sqrt_alphas_cumprod, t)) /
          jnp.square(jnp.take(schedule.sqrt_one_minus_alphas_cumprod, t)))


# ----------------------------------------------------------------------------
# Forward process and conversions. x, x0, eps, v: [B, ...]; t: [] or [B].
# ----------------------------------------------------------------------------

def q_sample(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """Samples ``q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I)`` with the given noise.

  ``x0, noise [B, ...]``, ``t [B]`` (or []) -> ``x_t [B, ...]`` float32.
  """
  x0 = jnp.asarray(x0, jnp.float32)
  return (_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0 +
          _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def v_target(schedule: Schedule, x0: Array, t: Array, noise: Array) -> Array:
  """The v-prediction target ``sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` ``[B, ...]``."""
  return (_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise -
          _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def prediction_target(schedule: Schedule, x0: Array, t: Array, noise: Array,
                      prediction: str) -> Array:
  """What a denoiser of the given parameterisation should output for
  ``x_t = q_sample(schedule, x0, t, noise)``: ``[B, ...]``."""
  if prediction == "eps":
    return jnp.asarray(noise, jnp.float32)
  if prediction == "v":
    return v_target(schedule, x0, t, noise)
  if prediction == "x0":
    return jnp.asarray(x0, jnp.float32)
  raise ValueError(f"unknown prediction {prediction!r}; known: {PREDICTIONS}")


def predict_x0(schedule: Schedule, x_t: Array, t: Array, pred: Array,
               prediction: str) -> Array:
  """The clean-data estimate implied by a denoiser output ``pred [B, ...]``."""
  a = _at(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
  s = _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
  pred = jnp.asarray(pred, jnp.float32)
  if prediction == "eps":
    return (x_t - s * pred) / a
  if prediction == "v":
    return a * x_t - s * pred
  if prediction == "x0":
    return pred
  raise ValueError(f"unknown prediction {prediction!r}; known: {PREDICTIONS}")


def predict_eps(schedule: Schedule, x_t: Array, t: Array, pred: Array,
                prediction: str) -> Array:
  """The noise estimate implied by a denoiser output ``pred [B, ...]``."""
  a = _at(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
  s = _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
  pred = jnp.asarray(pred, jnp.float32)
  if prediction == "eps":
    return pred
  if prediction == "v":
    return s * x_t + a * pred
  if prediction == "x0":
    return (x_t - a * pred) / s
  raise ValueError(f"unknown prediction {prediction!r}; known: {PREDICTIONS}")


def eps_from_x0(schedule: Schedule, x_t: Array, t: Array, x0: Array) -> Array:
  """``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``: the noise consistent with ``x0``."""
  return predict_eps(schedule, x_t, t, x0, "x0")
