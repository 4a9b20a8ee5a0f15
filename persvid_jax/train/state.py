"""The train state pytree and the optimizer with per-stage trainable masks.

``TrainState(step, params, opt_state, ema_params)``. ``params`` is a dict
``{network_name: variables['params']}`` holding every network the stage runs
(trainable and frozen alike); which leaves train is decided by regular
expressions over ``'network/path/to/leaf'`` names (``config.train.trainable``),
so that a stage like personalization ("mapper, extractor and the detail
attention of the generator") is one config line. Frozen leaves get
``optax.set_to_zero`` and keep no optimizer state (no Adam moments for a
frozen 1.4 B generator).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (one pytree; Orbax saves it whole)."""
  step: jax.Array          # [] int32, optimizer steps taken
  params: Any              # {network: params tree}
  opt_state: Any           # optax state (moments for trainable leaves only)
  ema_params: Any          # exponential moving average of params (sampling/eval)


def path_names(tree: Any) -> Any:
  """A tree of the same structure holding each leaf's ``'a/b/c'`` path."""
  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  return jax.tree_util.tree_map_with_path(name, tree)


def trainable_mask(params: Any, patterns: Sequence[str]) -> Any:
  """Bool tree: True where the leaf's path matches one of ``patterns``.

  A pattern matches by ``re.search`` on ``'network/module/.../leaf'``, e.g.
  ``'^unet/'`` (the whole generator) or ``'^unet/.*_detail/'`` (its detail
  attention K/V only).
  """
  regexes = [re.compile(p) for p in patterns]
  return jax.tree.map(lambda n: any(r.search(n) for r in regexes), path_names(params))


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine decay to ``lr_min_ratio``.

  The decay spans ``schedule_steps`` when set, else ``total_steps``. A fixed
  ``schedule_steps`` lets a run be extended on resume (a larger
  ``total_steps``) without changing the learning rate of the steps already
  taken, and keeps the compiled train step the same program for any
  ``total_steps`` (the schedule's constants are part of it).
  """
  c = train_config
  warmup = max(int(c.warmup_steps), 0)
  horizon = c.get("schedule_steps") or c.total_steps
  total = max(int(horizon), warmup + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else c.learning_rate, peak_value=c.learning_rate,
      warmup_steps=warmup, decay_steps=total, end_value=c.learning_rate * c.lr_min_ratio)


def make_optimizer(train_config, params: Any, packing: Any = None
                   ) -> optax.GradientTransformation:
  """AdamW on trainable leaves, zero updates elsewhere.

  ``params``: the ``{network: tree}`` params (or their shapes); with ``packing``
  (a ``packing.Packing`` of them) the optimizer is built for their packed form,
  the buffer of trainable vectors trained like the leaves it holds.

  Global-norm clipping (``config.train.grad_clip_norm``) is the train step's
  (``step.make_train_step``), which computes the norm once for the clip and its
  metric. The chain keeps an (empty-state) slot where optax's clip stood, so
  optimizer states saved before that change restore unchanged.
  """
  c = train_config
  mask = trainable_mask(params, c.trainable)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"config.train.trainable={tuple(c.trainable)} matches no parameter")
  if packing:
    mask = packing.mask(mask)
  adamw = optax.chain(
      optax.identity(),
      optax.adamw(learning_rate_schedule(c), b1=c.adam_b1, b2=c.adam_b2,
                  eps=1e-8, weight_decay=c.weight_decay))
  labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
  return optax.multi_transform({"train": adamw, "freeze": optax.set_to_zero()}, labels)


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
  """Step 0: fresh optimizer state, EMA = params (pure, jit-able with shardings)."""
  # A distinct copy: params and EMA are donated separately every step.
  ema = jax.tree.map(jnp.copy, params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=tx.init(params), ema_params=ema)


def ema_update(ema: Any, params: Any, decay: float | jax.Array) -> Any:
  """``decay * ema + (1 - decay) * params`` leaf-wise (in the params' dtype)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(p.dtype), ema, params)
