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
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from persvid_jax import sharding as sh
from persvid_jax import xla_options
from persvid_jax.train import packing as packing_lib
from persvid_jax.train import state as state_lib
from persvid_jax.train.stages import LossFn

log = logging.getLogger(__name__)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    ema_decay: float, frozen: tuple[str, ...] = (),
                    skip_nonfinite: bool = False, *, grad_clip_norm: float | None = None,
                    trainable: Any = None, packing: packing_lib.Packing | None = None
                    ) -> Callable:
  """``train_step(state, batch, rng) -> (state, metrics)`` (pure; jit it).

  ``frozen``: networks no stage trains (the VAE of latent space); their EMA is
  their params exactly (an EMA of a constant drifts by rounding in fused code).

  ``skip_nonfinite``: a step whose loss or gradient norm is NaN/Inf leaves
  params, optimizer state and EMA as they were (the step counter still
  advances: its batch is consumed) and reports ``skipped = 1``; its other
  metrics are the bad step's. Off, such a step is applied and the loop stops
  the run (``config.train.max_nonfinite_skips``).

  ``grad_clip_norm``: the gradients are scaled by ``min(1, clip / |g|)`` before
  ``tx`` (optax's ``clip_by_global_norm``), ``|g|`` the global norm over the
  ``trainable`` leaves (a bool tree like the params; None: all). That norm is
  computed once, for the clip and the ``grad_norm`` metric both; frozen leaves'
  gradients are then never used, so XLA does not compute them.

  ``packing``: the state is in its packed form (``packing.Packing.pack_state``:
  the trainable vectors in one buffer); ``tx`` and ``trainable`` are then those
  of the packed params (``state.make_optimizer(..., packing=)``,
  ``packing.mask``), and ``loss_fn`` still sees the usual params.
  """
  if packing:
    unpacked_loss = loss_fn
    loss_fn = lambda params, batch, rng: unpacked_loss(packing.unpack(params), batch, rng)
  update = make_update(tx, ema_decay, frozen, grad_clip_norm=grad_clip_norm,
                       trainable=trainable)

  def train_step(state: state_lib.TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, rng)
    params, opt_state, ema, grad_norm = update(state, grads)
    metrics = dict(metrics, grad_norm=grad_norm)
    if skip_nonfinite:
      ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      params, opt_state, ema = jax.tree.map(
          lambda new, old: jnp.where(ok, new, old), (params, opt_state, ema),
          (state.params, state.opt_state, state.ema_params))
      metrics["skipped"] = jnp.where(ok, 0.0, 1.0)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  train_step.packing = packing   # the state form it takes (None: unpacked)
  return train_step


def make_update(tx: optax.GradientTransformation, ema_decay: float,
                frozen: tuple[str, ...] = (), *, grad_clip_norm: float | None = None,
                trainable: Any = None) -> Callable:
  """``update(state, grads) -> (params, opt_state, ema_params, grad_norm)``: the
  optimizer's half of ``make_train_step`` (same arguments), without the step counter."""

  def update(state: state_lib.TrainState, grads: Any):
    grad_norm = global_norm(grads, trainable)
    if grad_clip_norm:
      grads = jax.tree.map(lambda g: jnp.where(grad_norm < grad_clip_norm, g,
                                               g / grad_norm * grad_clip_norm), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state_lib.ema_update(state.ema_params, params, ema_decay)
    ema = {**ema, **{name: params[name] for name in frozen}} if frozen else ema
    return params, opt_state, ema, grad_norm

  return update


# Leaves smaller than this are summed as one concatenated vector by global_norm.
_FLAT_ROW = 4096   # row length of a large flat buffer's partial sums
_SMALL_LEAF = 1 << 16


def global_norm(tree: Any, mask: Any = None) -> jax.Array:
  """The L2 norm of all leaves of ``tree`` (float32 ``[]``), or of those whose
  ``mask`` leaf (a bool tree of the same structure) is True.

  Summed in an order that costs a GPU few kernels for a model's ~1500 leaves:
  the small ones (biases, norm scales) squared into one vector, each large one
  to a vector of row sums (a large flat buffer of ``train.packing``: of rows of
  ``_FLAT_ROW``), then one reduction of all of them. A sum per leaf
  (``optax.tree.norm``) is two kernels per leaf, a third of a 1.4 B-parameter
  train step's kernel launches.
  """
  leaves = jax.tree.leaves(tree)
  if mask is not None:
    leaves = [x for x, keep in zip(leaves, jax.tree.leaves(mask), strict=True) if keep]
  parts = []
  for x in leaves:
    sq = jnp.square(x.astype(jnp.float32))
    if x.size < _SMALL_LEAF:
      parts.append(sq.ravel())
    elif x.ndim < 2:
      whole = x.size // _FLAT_ROW * _FLAT_ROW
      parts += [jnp.sum(sq[:whole].reshape(-1, _FLAT_ROW), axis=-1), sq[whole:]]
    else:
      parts.append(jnp.sum(sq.reshape(-1, x.shape[-1]), axis=-1))
  if not parts:
    return jnp.zeros((), jnp.float32)
  # The barrier keeps the concatenation: XLA would rewrite a sum of it as a sum
  # of per-leaf sums, one kernel (and a second stage) per leaf again.
  return jnp.sqrt(jnp.sum(jax.lax.optimization_barrier(jnp.concatenate(parts))))


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
                    mesh: Mesh, packing: packing_lib.Packing | None = None
                    ) -> state_lib.TrainState:
  """NamedShardings of a TrainState: params (and EMA, moments) per logical rules.

  ``boxed_params``: the usual ``{network: tree}`` params with their logical axes;
  with ``packing`` the state is in its packed form, whose buffer of vectors is
  replicated (biases and norm scales: a few MB in all).
  """
  param_shards = sh.param_shardings(boxed_params, mesh)
  if packing:
    param_shards = packing.pack(param_shards, flat=NamedSharding(mesh, P()))
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
  """Jits with shardings + donation, lowers and compiles; logs where the time went.

  The state's memory layouts are XLA's choice (``Layout.AUTO``), the same going
  in and out, so consecutive steps need no conversion: on a GPU it keeps every
  convolution kernel, its Adam moments and its EMA in cuDNN's filter order, where
  the default (row-major ``[kh, kw, in, out]``) costs transposes or copies of all
  four every step. Put a state into those layouts once with ``place_state``.

  Returns:
    ``(compiled, times)``: ``compiled(place_state(compiled, state), batch, rng)``
    runs the step; ``times`` (``xla_options.CompileTimes``) splits the
    ``total_s`` into tracing, lowering and XLA's compile, and says whether that
    came from the persistent compilation cache.
  """
  replicated = NamedSharding(mesh, P())
  state_formats = jax.tree.map(lambda s: Format(Layout.AUTO, s), state_shards)
  jitted = xla_options.jit(
      train_step,
      in_shardings=(state_formats, batch_shardings(abstract_batch, mesh), replicated),
      out_shardings=(state_formats, replicated),
      donate_argnums=(0,))
  rng = jax.eval_shape(jax.random.key, 0)   # no eager op: the device may be compile-only
  with jax.set_mesh(mesh), nn.logical_axis_rules(sh.LOGICAL_RULES):
    compiled, times = xla_options.compile_timed(jitted, abstract_state, abstract_batch, rng)
  log.info("train step ready in %.1f s: %s", times.total_s, times.describe())
  return compiled, times


def place_state(compiled: Any, state: Any) -> Any:
  """``state`` in the shardings and memory layouts ``compiled`` (from
  ``compile_train_step``) takes: a fresh, restored or initialised state, once
  before the first step. Its outputs already are in them."""
  return jax.device_put(state, compiled.input_formats[0][0])
