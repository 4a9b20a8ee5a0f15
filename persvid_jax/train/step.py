"""The pure train step, its shardings, and ahead-of-time compilation.

``train_step(state, batch, rng) -> (state, metrics)``: ``rng`` is folded with
the step so the same (seed, step) always draws the same noise (exact resume).
It is jitted once with explicit in/out shardings (state per the logical
rules, batch over data x fsdp, metrics replicated) and the state donated, then
lowered and compiled ahead of time so that OOM and sharding errors appear
before any data is read, with the compile time logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from persvid_jax import sharding as sh
from persvid_jax.train import state as state_lib
from persvid_jax.train.stages import LossFn

log = logging.getLogger(__name__)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    ema_decay: float, frozen: tuple[str, ...] = (),
                    skip_nonfinite: bool = False) -> Callable:
  """``train_step(state, batch, rng) -> (state, metrics)`` (pure; jit it).

  ``frozen``: networks no stage trains (the VAE of latent space); their EMA is
  their params exactly (an EMA of a constant drifts by rounding in fused code).

  ``skip_nonfinite``: a step whose loss or gradient norm is NaN/Inf leaves
  params, optimizer state and EMA as they were (the step counter still
  advances: its batch is consumed) and reports ``skipped = 1``; its other
  metrics are the bad step's. Off, such a step is applied and the loop stops
  the run (``config.train.max_nonfinite_skips``).
  """

  def train_step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state_lib.ema_update(state.ema_params, params, ema_decay)
    ema = {**ema, **{name: params[name] for name in frozen}} if frozen else ema
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   update_norm=optax.tree.norm(updates))
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
      params, opt_state, ema = jax.tree.map(
          lambda new, old: jnp.where(ok, new, old), (params, opt_state, ema),
          (state.params, state.opt_state, state.ema_params))
      metrics["skipped"] = jnp.where(ok, 0.0, 1.0)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  return train_step


def _key_str(k) -> str:
  return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def shardings_like_params(tree: Any, params: Any, param_shards: Any, mesh: Mesh) -> Any:
  """Shardings for ``tree`` (e.g. an optimizer state) whose leaves mirror params.

  A leaf whose key path *ends with* a parameter's path and has its shape (Adam
  moments, EMA copies) gets that parameter's sharding; every other leaf (step
  counters, scalars) is replicated. Matching by path suffix works for any
  optax chain, masked or multi-transformed, without knowing its state types.
  """
  table = {}
  for (path, leaf), shard in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(param_shards)):
    table[tuple(_key_str(k) for k in path)] = (tuple(leaf.shape), shard)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = tuple(_key_str(k) for k in path)
    for i in range(len(keys)):
      hit = table.get(keys[i:])
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def state_shardings(abstract_state: state_lib.TrainState, boxed_params: Any,
                    mesh: Mesh) -> state_lib.TrainState:
  """NamedShardings of a TrainState: params (and EMA, moments) per logical rules."""
  param_shards = sh.param_shardings(boxed_params, mesh)
  params = abstract_state.params
  return state_lib.TrainState(
      step=NamedSharding(mesh, P()),
      params=param_shards,
      opt_state=shardings_like_params(abstract_state.opt_state, params, param_shards, mesh),
      ema_params=param_shards)


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
  """Every batch array split on its leading axis over data x fsdp."""
  return {k: sh.batch_sharding(mesh, v.ndim) for k, v in batch.items()}


def compile_train_step(train_step: Callable, abstract_state: Any, state_shards: Any,
                       abstract_batch: dict, mesh: Mesh):
  """Jits with shardings + donation, lowers and compiles; logs the compile time.

  Returns:
    ``(compiled, seconds)``: ``compiled(state, batch, rng)`` runs the step.
  """
  replicated = NamedSharding(mesh, P())
  jitted = jax.jit(
      train_step,
      in_shardings=(state_shards, batch_shardings(abstract_batch, mesh), replicated),
      out_shardings=(state_shards, replicated),
      donate_argnums=(0,))
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  start = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sh.LOGICAL_RULES):
    compiled = jitted.lower(abstract_state, abstract_batch, rng).compile()
  seconds = time.perf_counter() - start
  log.info("train step compiled in %.1f s", seconds)
  return compiled, seconds
