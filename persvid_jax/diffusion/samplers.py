"""DDPM ancestral and DDIM sampling: one pure step, two loops.

``step`` maps ``x`` at timestep ``timesteps[i]`` to ``timesteps[i+1]`` (or to
clean data after the last one). ``sample`` runs it over the ``num_steps``
timesteps either inside ``lax.scan`` (one program, the default) or, with
``progress=True``, from a Python loop that calls the *same* step, jitted once,
with a tqdm bar. Both loops draw the step noise as ``fold_in(rng, i)``, so they
agree for a given ``rng``.

The update, with ``abar = abar_t``, ``abar' = abar_{t_prev}`` (1 after the last
step) and ``x0, eps`` the denoiser's estimates::

    ddim: x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z,
          sigma = eta * sqrt((1 - abar') / (1 - abar) * (1 - abar / abar'))
    ddpm: x' = posterior mean of q(x' | x, x0) + sqrt(posterior var) z
             = coef_x0 * x0 + coef_x * x + sqrt(beta~) z

(Song et al. 2021; Ho et al. 2020, generalised to strided timesteps as in
diffusers.) With consistent ``x0`` / ``eps`` DDPM equals DDIM at ``eta = 1``;
the tests check it. When ``clip_x0`` (pixel space) the estimate ``x0`` is
clipped to [-1, 1] and ``eps`` recomputed from it (guided-diffusion), so the
step lands on the clipped estimate; latents are not clipped.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from persvid_jax import xla_options
from persvid_jax.diffusion import schedules
from persvid_jax.diffusion.schedules import Schedule

Array = jax.Array
DenoiseFn = Callable[..., Array]

SAMPLERS = ("ddim", "ddpm")
SPACINGS = ("trailing", "leading", "linspace")


@flax.struct.dataclass
class Sampler:
  """Everything a sampling step needs besides the denoiser (a pytree).

  ``kind``, ``prediction`` and ``clip_x0`` change the program (static);
  the schedule, the timesteps and ``eta`` are arrays, so changing them
  (another schedule of the same length, another eta) reuses the compiled step.
  """
  schedule: Schedule
  timesteps: Array                  # [S] int32, strictly decreasing, in [0, N)
  eta: Array                        # [] float32 DDIM stochasticity (0: deterministic)
  kind: str = flax.struct.field(pytree_node=False)        # 'ddim' | 'ddpm'
  prediction: str = flax.struct.field(pytree_node=False)  # 'eps' | 'v' | 'x0'
  clip_x0: bool = flax.struct.field(pytree_node=False)    # clip x0 to [-1, 1] (pixels)

  @property
  def num_steps(self) -> int:
    """Number of sampling steps (network evaluations per CFG branch)."""
    return self.timesteps.shape[0]


@flax.struct.dataclass
class StepOutput:
  """One sampling step's result."""
  x: Array    # [B, ...] x at the next timestep (clean data after the last step)
  x0: Array   # [B, ...] the step's (clipped) clean-data estimate


def make_timesteps(num_timesteps: int, num_steps: int, spacing: str = "trailing") -> np.ndarray:
  """The ``[num_steps]`` int32 decreasing timesteps a sampler visits.

  'trailing' (default) starts at ``N - 1``, the only start where the sample
  matches the training noise level (Lin et al. 2024): ``N=1000, S=10 -> 999,
  899, ..., 99``. 'leading' is diffusers' DDIM default (``900, ..., 0``),
  'linspace' spans ``N - 1 .. 0``.
  """
  n, s = num_timesteps, num_steps
  if not 1 <= s <= n:
    raise ValueError(f"num_steps must be in [1, num_timesteps={n}], got {s}")
  if spacing == "trailing":
    ts = np.round(np.arange(n, 0, -n / s)) - 1
  elif spacing == "leading":
    ts = (np.arange(s) * (n // s))[::-1]
  elif spacing == "linspace":
    ts = np.round(np.linspace(n - 1, 0, s))
  else:
    raise ValueError(f"unknown timestep spacing {spacing!r}; known: {SPACINGS}")
  ts = ts.astype(np.int32)
  assert np.all(np.diff(ts) < 0) and ts[0] < n and ts[-1] >= 0, ts
  return ts


def make_sampler(schedule: Schedule, kind: str = "ddim", num_steps: int = 50, *,
                 eta: float = 0.0, prediction: str = "eps", clip_x0: bool = True,
                 spacing: str = "trailing") -> Sampler:
  """Builds a ``Sampler`` over ``num_steps`` timesteps of ``schedule``."""
  if kind not in SAMPLERS:
    raise ValueError(f"unknown sampler {kind!r}; known: {SAMPLERS}")
  if prediction not in schedules.PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}; known: {schedules.PREDICTIONS}")
  ts = make_timesteps(schedule.num_timesteps, num_steps, spacing)
  return Sampler(schedule=schedule, timesteps=jnp.asarray(ts), eta=jnp.float32(eta),
                 kind=kind, prediction=prediction, clip_x0=bool(clip_x0))


def from_config(diffusion_config, schedule: Schedule | None = None) -> Sampler:
  """``make_sampler`` from ``config.diffusion`` (its schedule unless one is given)."""
  c = diffusion_config
  schedule = schedules.from_config(c) if schedule is None else schedule
  return make_sampler(schedule, c.sampler, c.sample_steps, eta=c.eta,
                      prediction=c.prediction, clip_x0=c.clip_x0,
                      spacing=c.get("timestep_spacing", "trailing"))


# ----------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------

def step(denoise_fn: DenoiseFn, params: Any, x: Array, i: Array, *, sampler: Sampler,
         rng: Array, cond: Mapping[str, Any] | None = None) -> StepOutput:
  """One reverse step from ``timesteps[i]`` to ``timesteps[i + 1]`` (pure).

  Args:
    denoise_fn: ``(params, x_t, t [B], **cond) -> [B, ...]`` prediction of kind
      ``sampler.prediction`` (e.g. a ``guidance.guided_denoise_fn``).
    params: the denoiser's params.
    x: ``[B, ...]`` float32 current sample.
    i: [] int32 step index in ``[0, num_steps)`` (may be traced).
    sampler: the ``Sampler``.
    rng: the sampling key; step ``i`` uses ``fold_in(rng, i)``.
    cond: keyword inputs of ``denoise_fn`` (batch-leading arrays).

  Returns:
    ``StepOutput(x [B, ...], x0 [B, ...])``.
  """
  s, ts = sampler.schedule, sampler.timesteps
  b = x.shape[0]
  t = ts[i]
  # -1 after the last step: abar' = 1, i.e. the step lands on clean data.
  t_prev = jnp.where(i + 1 < ts.shape[0], ts[jnp.minimum(i + 1, ts.shape[0] - 1)], -1)
  t_batch = jnp.full((b,), t, jnp.int32)

  # 1. Denoiser estimates (float32 whatever its compute dtype).
  pred = jnp.asarray(denoise_fn(params, x, t_batch, **dict(cond or {})), jnp.float32)
  x0 = schedules.predict_x0(s, x, t_batch, pred, sampler.prediction)
  eps = schedules.predict_eps(s, x, t_batch, pred, sampler.prediction)
  if sampler.clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = schedules.eps_from_x0(s, x, t_batch, x0)

  # 2. Update. Scalars: the same timestep for the whole batch.
  abar = schedules.alphas_cumprod_at(s, t)
  abar_prev = schedules.alphas_cumprod_at(s, t_prev)
  noise_var = schedules.one_minus_alphas_cumprod_at(s, t)             # 1 - abar
  noise_var_prev = schedules.one_minus_alphas_cumprod_at(s, t_prev)   # 1 - abar'
  # The strided step's beta, 1 - abar / abar', written so that the last step
  # (abar' = 1, 1 - abar' = 0) gives exactly 1 - abar: DDPM's x0 coefficient
  # is then exactly 1 and the sample lands on the (clipped) estimate.
  beta_step = (noise_var - noise_var_prev) / abar_prev
  # Posterior variance of q(x_prev | x_t, x0) (beta~); 0 after the last step.
  posterior_var = noise_var_prev / noise_var * beta_step
  z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
  if sampler.kind == "ddim":
    sigma = sampler.eta * jnp.sqrt(posterior_var)
    direction = jnp.sqrt(jnp.maximum(noise_var_prev - sigma ** 2, 0.0))
    x_prev = jnp.sqrt(abar_prev) * x0 + direction * eps + sigma * z
  elif sampler.kind == "ddpm":
    coef_x0 = jnp.sqrt(abar_prev) * beta_step / noise_var
    coef_x = jnp.sqrt(abar / abar_prev) * noise_var_prev / noise_var
    x_prev = coef_x0 * x0 + coef_x * x + jnp.sqrt(posterior_var) * z
  else:
    raise ValueError(f"unknown sampler {sampler.kind!r}; known: {SAMPLERS}")
  return StepOutput(x=x_prev, x0=x0)


# Host-loop mode: one compiled step for all steps (i is traced), cached per
# denoise_fn (static: build it once, e.g. at module level, not per call).
_jit_step = xla_options.jit(step, program="sample", static_argnums=0)


# ----------------------------------------------------------------------------
# The loops.
# ----------------------------------------------------------------------------

# Jitted so that the host loop does not dispatch its few ops one by one.
@functools.partial(jax.jit, static_argnums=1)
def _initial_noise(rng: Array, shape: tuple[int, ...]) -> tuple[Array, Array]:
  """``x_T [*shape]`` ~ N(0, I) and the key of the steps' noise."""
  init_rng, step_rng = jax.random.split(rng)
  return jax.random.normal(init_rng, shape, jnp.float32), step_rng


def _scan_sample(denoise_fn, params, rng, shape, sampler, cond):
  x, step_rng = _initial_noise(rng, shape)

  def body(x, i):
    return step(denoise_fn, params, x, i, sampler=sampler, rng=step_rng, cond=cond).x, None

  x, _ = jax.lax.scan(body, x, jnp.arange(sampler.num_steps, dtype=jnp.int32))
  return x


_jit_scan_sample = xla_options.jit(_scan_sample, program="sample", static_argnums=(0, 3))


def sample(denoise_fn: DenoiseFn, params: Any, rng: Array, shape: tuple[int, ...], *,
           sampler: Sampler, cond: Mapping[str, Any] | None = None,
           progress: bool = False, desc: str = "sampling") -> Array:
  """Draws ``x ~ N(0, I)`` of ``shape`` and runs every step of ``sampler``.

  Args:
    denoise_fn: ``(params, x_t, t [B], **cond) -> [B, ...]``; a static argument
      of the compiled programs, so reuse one function object across calls.
    params: the denoiser's params.
    rng: key; the output is a deterministic function of it.
    shape: ``[B, T, H, W, C]`` (or any ``[B, ...]``) of the sample.
    sampler: the ``Sampler``.
    cond: keyword inputs of ``denoise_fn`` (batch-leading arrays).
    progress: False: ``lax.scan`` over the steps, one program (use this under
      an outer ``jit``). True: a Python loop over the same jitted step with a
      tqdm bar (needs concrete inputs; not under ``jit``).
    desc: the progress bar's label.

  Returns:
    ``[*shape]`` float32 sample (in [-1, 1] when ``sampler.clip_x0``).
  """
  shape = tuple(int(d) for d in shape)
  cond = dict(cond or {})
  if not progress:
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((params, rng, cond))):
      # Under an outer jit (a training preview): part of that program, whose
      # compiler options are its own (jax takes them at the top level only).
      return _scan_sample(denoise_fn, params, rng, shape, sampler, cond)
    return _jit_scan_sample(denoise_fn, params, rng, shape, sampler, cond)
  x, step_rng = _initial_noise(rng, shape)
  for i in tqdm.trange(sampler.num_steps, desc=desc, leave=False):
    x = _jit_step(denoise_fn, params, x, jnp.int32(i), sampler=sampler, rng=step_rng,
                  cond=cond).x
  return x
