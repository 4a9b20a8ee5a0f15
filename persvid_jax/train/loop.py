"""``train_and_evaluate(config, workdir)``: the training loop of every stage.

Sections as in big_vision's train.py: Mesh, Model, Input, Shard + Init,
Checkpoint (resume), Compile, Loop (metrics, checkpoints, samples).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from persvid_jax import checkpoint as ckpt_lib
from persvid_jax import config_lib
from persvid_jax import sharding as sh
from persvid_jax.concepts import conditioning
from persvid_jax.concepts.tokens import PromptTokenizer
# data.pipeline imports TensorFlow only inside the functions that use it.
from persvid_jax.data import DataError, pipeline
from persvid_jax.diffusion import cascade, samplers, schedules
from persvid_jax.models import stack as stack_lib
from persvid_jax.models.stack import ModelStack
from persvid_jax.pipeline import media
from persvid_jax.pipeline import model as model_lib
from persvid_jax.train import packing as packing_lib
from persvid_jax.train import stages
from persvid_jax.train import state as state_lib
from persvid_jax.train import step as step_lib
from persvid_jax.train import guards, warmstart

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
  """What a finished (or resumed-and-finished) run reports."""
  step: int
  first_step: int               # the step training started from (> 0 on resume)
  last_metrics: dict
  compile_seconds: float         # the train step's trace + lower + XLA compile
  steps_per_second: float
  workdir: str
  stopped_by: str | None = None  # 'SIGTERM' / 'SIGINT' when a signal ended the run early
  compile_from_cache: bool = False   # XLA's part loaded from the persistent cache


class _StopRequest:
  """SIGTERM / SIGINT -> finish the current step, checkpoint, return (preemption).

  The first signal only sets a flag; the loop stops at the next step
  boundary, saves and returns normally (exit status 0), so a scheduler's
  SIGTERM before a kill costs no work. A second signal gets the previous
  handler (Ctrl-C twice still interrupts at once). Handlers exist only in the
  main thread; elsewhere (a notebook's worker thread) this is a no-op.
  """

  def __init__(self):
    self.signal: str | None = None
    self._previous: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signal.Signals(signum).name
    log.warning("%s received: stopping after this step with a checkpoint", self.signal)
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def agreed(self, step: int, every: int) -> bool:
    """Whether to stop now; with several processes, all stop at one step.

    Multi-process: the flags are all-gathered every ``every`` steps (a save is
    a collective, so every process must stop at the same step).
    """
    if jax.process_count() == 1:
      return self.signal is not None
    if step % every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.signal is not None))
    return bool(np.any(flags))


def _device_batch(batch: dict, keys, shardings: dict) -> dict:
  """Host (per-process) numpy arrays -> global jax Arrays on the mesh."""
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k]))
          for k in keys}


def _abstract_batch(batch: dict, keys, global_batch: int) -> dict:
  missing = [k for k in keys if k not in batch]
  if missing:
    raise DataError(f"the training data has no {missing} (this stage and config need "
                    f"them; config.train.subject_loss_weight needs subject masks, which "
                    f"the synthetic data has and a video folder has not)")
  return {k: jax.ShapeDtypeStruct((global_batch,) + np.asarray(batch[k]).shape[1:],
                                  np.asarray(batch[k]).dtype) for k in keys}


class _Writer:
  """TensorBoard event files (tensorboardX: no TensorFlow needed) on process 0."""

  def __init__(self, logdir: pathlib.Path):
    self._w = None
    if jax.process_index() == 0:
      self._w = SummaryWriter(str(logdir))

  def scalars(self, step: int, values: dict):
    if self._w:
      for k, v in values.items():
        self._w.add_scalar(k, float(v), step)
      self._w.flush()

  def close(self):
    if self._w:
      self._w.close()


def _make_preview(stage: str, ctx: stages.StageContext, sampler) -> Any:
  """``preview(params, batch, rng) -> (samples, reference)`` videos in [-1, 1].

  Conditional samples (no guidance) from the EMA params for the first
  examples of a held-out batch: what the stage has learned so far. In latent
  space the samples are decoded by the VAE (pixels, as the targets).
  """
  stack, c = ctx.stack, ctx.config

  base_denoise = stack_lib.base_denoise_fn(stack)
  sr_denoise = stack_lib.sr_denoise_fn(stack)

  @jax.jit
  def preview(params, batch, rng):
    video = batch["video"]
    b, t_frames = video.shape[:2]
    ch = c.video.channels
    to_pixels = functools.partial(conditioning.to_pixel_space, ctx, params)
    base_pixels = conditioning.resize_video(video, *stack_lib.pixel_size(c))
    if stage == "personalize":
      tokens = batch["placeholder_caption_tokens"]
      yes = jnp.ones((b,), bool)
      context, detail = conditioning.personalization_conditions(
          ctx, params, batch["reference"], batch["reference_mask"],
          batch["has_reference"] > 0.5, tokens, use_ref=yes, use_detail=yes)
      cond = dict(context=context, detail_tokens=detail)
      shape = (b, t_frames, c.video.height, c.video.width, ch)
      out = samplers.sample(base_denoise, params["unet"], rng, shape, sampler=sampler,
                            cond=cond)
      return to_pixels(out), base_pixels
    context = conditioning.encode_text(ctx, params, batch["caption_tokens"])
    if stage == "base":
      shape = (b, t_frames, c.video.height, c.video.width, ch)
      out = samplers.sample(base_denoise, params["unet"], rng, shape, sampler=sampler,
                            cond=dict(context=context))
      return to_pixels(out), base_pixels
    f = stack_lib.vae_factor(c)           # the SR scale in diffusion space
    sr_size = (video.shape[2] // f, video.shape[3] // f)
    up = conditioning.low_res_condition(ctx, params, video, sr_size, None)
    cond_video, level = cascade.noise_augment(ctx.schedule, up, c.diffusion.sr_noise_aug,
                                              jax.random.fold_in(rng, 1))
    out = samplers.sample(sr_denoise, params["sr_unet"], rng, (b, t_frames, *sr_size, ch),
                          sampler=sampler, cond=dict(context=context, cond_video=cond_video,
                                                     noise_level=level))
    return to_pixels(out), video

  return preview


@dataclasses.dataclass
class Setup:
  """Everything a run builds before touching data or checkpoints (testable alone)."""
  config: Any
  mesh: Any
  tokenizer: PromptTokenizer
  stack: ModelStack
  ctx: stages.StageContext
  loss_fn: Any                  # (params, batch, rng) -> (loss, metrics)
  tx: Any                       # optax transformation (trainable mask applied)
  train_step: Any               # pure (state, batch, rng) -> (state, metrics)
  init_state: Any               # rng -> TrainState (pure; jit with out_shardings)
  abstract_state: Any           # TrainState of ShapeDtypeStructs
  state_shards: Any             # TrainState of NamedShardings
  batch_keys: tuple
  init_rng: Any
  train_rng: Any
  sample_rng: Any
  # The step's own state form: the trainable vectors in one buffer (train.packing).
  # ``abstract_state`` / ``state_shards`` / ``create_state`` are the saved form
  # (checkpoints, warm starts); ``step_state`` / ``saved_state`` convert.
  packing: packing_lib.Packing
  step_abstract_state: Any      # TrainState of ShapeDtypeStructs, packed
  step_state_shards: Any        # TrainState of NamedShardings, packed

  def create_state(self):
    """The initial TrainState (saved form), sharded on the mesh."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(sh.LOGICAL_RULES):
      return jax.jit(self.init_state, out_shardings=self.state_shards)(self.init_rng)

  def step_state(self, state):
    """A saved-form state -> the form ``train_step`` takes (vectors packed)."""
    return self.packing.pack_state(state)

  def saved_state(self, state):
    """The step's state -> the saved form (what checkpoints hold)."""
    return self.packing.unpack_state(state)


def check_mesh(config, mesh=None):
  """The mesh of ``config`` (or ``mesh``), checked against ``config.train.batch_size``.

  Raises ``ConfigError`` when the mesh does not fit the devices or the batch
  does not split over them. Cheap (no model): ``launch.train`` calls it
  before it records the run.
  """
  if mesh is None:
    try:
      mesh = sh.mesh_from_config(config.mesh)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.mesh: {e} ({jax.device_count()} devices here)"
                                   ) from None
  n_data = mesh.shape[sh.DATA] * mesh.shape[sh.FSDP]
  batch = config.train.batch_size
  if batch % n_data or batch % jax.process_count():
    raise config_lib.ConfigError(
        f"config.train.batch_size={batch} must be divisible by the {n_data} data-parallel "
        f"devices and {jax.process_count()} processes")
  return mesh


def setup(config, mesh=None) -> Setup:
  """Mesh, model, stage loss, optimizer and abstract sharded state of ``config``."""
  tc = config.train
  stage = tc.stage
  if stage not in stages.STAGES:
    raise config_lib.ConfigError(f"config.train.stage is {stage!r}; use one of {stages.STAGES}")
  names = stages.stage_networks(stage, config)
  if (stack_lib.VAE in names and not config.latent.get("random_vae", False)
      and not tc.get("init_from")):
    raise model_lib.ModelError(f"config.latent.enabled needs a VAE: {warmstart.VAE_FIX}")

  # ---- Mesh ---------------------------------------------------------------
  mesh = check_mesh(config, mesh)

  # ---- Model --------------------------------------------------------------
  tokenizer = PromptTokenizer.from_config(config)
  stack = ModelStack.from_config(config, eos_token_id=tokenizer.eos_id)
  schedule = schedules.from_config(config.diffusion)
  ctx = stages.StageContext(stack=stack, schedule=schedule,
                            null_tokens=tokenizer.encode([""])[0],
                            placeholder_start=tokenizer.placeholder_start, config=config)
  loss_fn = stages.make_loss_fn(stage, ctx)

  # ---- Shard + Init (abstract first: nothing is allocated until jit) -------
  rng = jax.random.key(config.seed)
  init_rng, train_rng, sample_rng = jax.random.split(rng, 3)
  boxed_params = jax.eval_shape(lambda r: stack_lib.init_params(stack, names, r), init_rng)
  if stack_lib.VAE in names:
    warmstart.check_vae_frozen(config, boxed_params)
  params = nn.meta.unbox(boxed_params)
  tx = state_lib.make_optimizer(tc, params)
  trainable = state_lib.trainable_mask(params, tc.trainable)
  # The weights packed too where they are not sharded (no FSDP axis).
  packing = packing_lib.Packing.plan(params, trainable, matrices=mesh.shape[sh.FSDP] == 1)

  def init_state(r):
    return state_lib.create_state(nn.meta.unbox(stack_lib.init_params(stack, names, r)), tx)

  abstract_state = jax.eval_shape(init_state, init_rng)
  state_shards = step_lib.state_shardings(abstract_state, boxed_params, mesh)
  step_abstract_state = packing.pack_like(abstract_state, packing.abstract_flat())
  return Setup(config=config, mesh=mesh, tokenizer=tokenizer, stack=stack, ctx=ctx,
               loss_fn=loss_fn, tx=tx,
               train_step=step_lib.make_train_step(
                   loss_fn, state_lib.make_optimizer(tc, params, packing=packing), tc.ema_decay,
                   frozen=tuple(n for n in names if n == stack_lib.VAE),
                   skip_nonfinite=guards.max_skips(tc) > 0, grad_clip_norm=tc.grad_clip_norm,
                   trainable=packing.mask(trainable), packing=packing),
               init_state=init_state, abstract_state=abstract_state,
               state_shards=state_shards, batch_keys=stages.batch_keys(stage, config),
               init_rng=init_rng, train_rng=train_rng, sample_rng=sample_rng,
               packing=packing,
               step_abstract_state=step_abstract_state,
               step_state_shards=step_lib.state_shardings(step_abstract_state, boxed_params,
                                                          mesh, packing=packing))


def train_and_evaluate(config, workdir: str | pathlib.Path, *, progress: bool = True
                       ) -> TrainResult:
  """Trains ``config.train.stage`` for ``config.train.total_steps`` steps in ``workdir``.

  Resumes from the latest checkpoint in ``workdir/checkpoints`` if there is
  one (params, optimizer, EMA, step; the data stream continues where it
  stopped). Writes TensorBoard events to ``workdir/tb`` and preview GIFs to
  ``workdir/samples``.
  """
  workdir = pathlib.Path(workdir)
  tc = config.train
  # Before anything is built or written: a bad number or a missing init_from /
  # data folder would otherwise surface minutes later, after checkpoints/ exists.
  config_lib.check_train_config(config)
  s = setup(config)
  stage, mesh, keys = tc.stage, s.mesh, s.batch_keys
  abstract_state, state_shards = s.abstract_state, s.state_shards
  tokenizer, ctx, schedule = s.tokenizer, s.ctx, s.ctx.schedule
  train_rng, sample_rng = s.train_rng, s.sample_rng
  local_batch = tc.batch_size // jax.process_count()

  # ---- Checkpoint: resume or init -------------------------------------------
  manager = ckpt_lib.make_manager(workdir / "checkpoints", max_to_keep=tc.keep_checkpoints,
                                  async_save=tc.async_checkpoints)
  if manager.latest_step() is not None:
    first_step, state = ckpt_lib.restore(
        manager, ckpt_lib.abstract_with_shardings(abstract_state, state_shards))
    log.info("resumed from step %d", first_step)
  else:
    state = s.create_state()
    if tc.get("init_from"):
      random_vae = stack_lib.latent_enabled(config) and config.latent.get("random_vae", False)
      state = warmstart.init_from(state, tc.init_from, state_shards, random_vae=random_vae,
                         networks=tc.get("init_networks") or None)
    first_step = 0

  # ---- Input ----------------------------------------------------------------
  train_iter = pipeline.make_dataset(config, config.data.train_split, batch_size=local_batch,
                                     start_batch=first_step, tokenize=tokenizer.encode)
  eval_batch = next(pipeline.make_dataset(config, config.data.eval_split,
                                          batch_size=local_batch, tokenize=tokenizer.encode))
  first = next(train_iter)
  abstract_batch = _abstract_batch(first, keys, tc.batch_size)
  batch_shards = step_lib.batch_shardings(abstract_batch, mesh)

  # ---- Compile ----------------------------------------------------------------
  compiled, compile_times = step_lib.compile_train_step(
      s.train_step, ckpt_lib.abstract_with_shardings(s.step_abstract_state,
                                                     s.step_state_shards),
      s.step_state_shards, abstract_batch, mesh)
  state = step_lib.place_state(compiled, s.step_state(state))
  preview = _make_preview(stage, ctx, samplers.from_config(config.diffusion, schedule))

  # ---- Loop -------------------------------------------------------------------
  writer = _Writer(workdir / "tb")
  (workdir / "config.json").write_text(config.to_json(indent=2))
  metrics_host: dict = {}
  bar = tqdm.tqdm(total=tc.total_steps, initial=first_step, desc=f"train[{stage}]",
                  disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
  step = first_step
  batch = first
  t0, steps_timed = time.perf_counter(), 0
  stop = _StopRequest()
  skips = guards.SkipCounter(guards.max_skips(tc))
  checked = None   # the last step's host metrics, once verified (fetched at most once)
  # The signal handlers stay until the run is wholly saved: a SIGTERM during the
  # final asynchronous save (or the result's write) only sets the flag, rather
  # than killing the process with the last checkpoint half-written.
  with stop:
    try:
      while step < tc.total_steps and not stop.agreed(step, tc.log_every_steps):
        device_batch = _device_batch(batch, keys, batch_shards)
        # A compiled executable carries its shardings: no mesh context needed.
        state, metrics = compiled(state, device_batch, train_rng)
        skips.add(metrics)
        checked = None
        step += 1
        steps_timed += 1
        if step % tc.log_every_steps == 0 or step == tc.total_steps:
          metrics_host = checked = guards.verified(metrics, skips, step, manager)
          rate = steps_timed / (time.perf_counter() - t0)
          lr = float(state_lib.learning_rate_schedule(tc)(step))
          writer.scalars(step, dict(metrics_host, steps_per_second=rate, learning_rate=lr))
          bar.set_postfix(loss=f"{metrics_host['loss']:.4f}", steps_s=f"{rate:.2f}")
          if bar.disable and jax.process_index() == 0:
            # No bar (--no-progress: batch jobs, clusters): the log carries the curve.
            log.info("step %d/%d: loss %.4f, %.2f steps/s, lr %.2e", step, tc.total_steps,
                     metrics_host["loss"], rate, lr)
        bar.update(1)
        if step % tc.checkpoint_every_steps == 0 or step == tc.total_steps:
          # A diverged state must never become the newest "good" checkpoint.
          if checked is None:
            checked = guards.verified(metrics, skips, step, manager)
          ckpt_lib.save(manager, step, s.saved_state(state), config)
        if tc.sample_every_steps and (step % tc.sample_every_steps == 0 or step == tc.total_steps):
          # The EMA alone leaves the packed form: the preview reads nothing else.
          _write_preview(preview, s.packing.unpack(state.ema_params), eval_batch, keys,
                         batch_shards, sample_rng, step, workdir, tc.preview_examples)
        if step < tc.total_steps:
          try:
            batch = next(train_iter)
          except Exception:
            if stop.signal is None:
              raise
            break   # the signal reached the input pipeline too: stop here
      if step < tc.total_steps:
        # Stopped early: this step's state is saved (unless it just was).
        if step > first_step:
          # A diverged state must never be force-saved: verified unless this
          # step's metrics already were (logged or saved just now).
          fetched = (checked if checked is not None
                     else guards.verified(metrics, skips, step, manager))
          metrics_host = metrics_host or fetched
        if manager.latest_step() != step:
          ckpt_lib.save(manager, step, s.saved_state(state), config, force=True)
        log.warning("stopped by %s at step %d; checkpoint saved",
                    stop.signal or "a signal to another process", step)
    finally:
      bar.close()
      manager.wait_until_finished()
      manager.close()
      writer.close()
    rate = steps_timed / max(time.perf_counter() - t0, 1e-9)
    # A signal after the last step stopped nothing: the run is complete.
    result = TrainResult(step=step, first_step=first_step, last_metrics=metrics_host,
                         compile_seconds=compile_times.total_s, steps_per_second=rate,
                         workdir=str(workdir), compile_from_cache=compile_times.cache_hit,
                         stopped_by=stop.signal if step < tc.total_steps else None)
    if jax.process_index() == 0:
      (workdir / "result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
  return result


def _write_preview(preview, ema_params, eval_batch, keys, batch_shards, rng, step, workdir, n):
  batch = _device_batch(eval_batch, keys, batch_shards)
  samples, target = jax.device_get(preview(ema_params, batch, rng))
  if jax.process_index() != 0:
    return
  n = min(n, samples.shape[0])
  grid = media.video_grid(np.concatenate([target[:n], samples[:n]]), columns=n)
  media.save_gif(workdir / "samples" / f"step_{step:07d}.gif", grid, scale=4)
