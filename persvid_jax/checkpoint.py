"""Orbax helpers: one manager per workdir, the config saved in the same step.

Every checkpoint step is a directory that Orbax finalises atomically (it is
written under a temporary name and renamed when complete), so a process
killed mid-save leaves the previous step as the latest restorable one. The
config travels as JSON *inside* the step (maxdiffusion's habit): a checkpoint
always says what model it holds.

Layout: ``WORKDIR/checkpoints/<step>/{state,config}``.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  """A JSON-safe dict of a ConfigDict (tuples -> lists)."""
  return json.loads(config.to_json())


def config_from_json(data: dict) -> ml_collections.ConfigDict:
  """Inverse of ``config_to_json`` (lists stay lists where tuples were)."""
  def fix(x):
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(fix(v) for v in x)
    return x
  return ml_collections.ConfigDict(fix(data))


def make_manager(directory: str | pathlib.Path, *, max_to_keep: int = 3,
                 save_interval_steps: int = 1, async_save: bool = True,
                 ) -> ocp.CheckpointManager:
  """A ``CheckpointManager`` over ``directory`` with ``state`` and ``config`` items."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         config: ml_collections.ConfigDict | None = None, *, force: bool = False) -> bool:
  """Saves ``state`` (any pytree of arrays) and the config as JSON at ``step``."""
  items = {"state": ocp.args.StandardSave(state)}
  if config is not None:
    items["config"] = ocp.args.JsonSave(config_to_json(config))
  return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None) -> tuple[int, Any]:
  """Restores ``(step, state)``; ``abstract_state`` carries shapes and shardings.

  Args:
    manager: the manager.
    abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding``
      (from ``jax.eval_shape`` + shardings), so arrays land where they live.
    step: the step, default the latest.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return step, restored["state"]


def restore_to_host(manager: ocp.CheckpointManager, step: int | None = None) -> Any:
  """The saved ``state`` of ``step`` (default the latest) as host numpy arrays.

  Needs no template and no devices: a checkpoint written by a pod or by
  several processes (params sharded over devices this process lacks) reads
  back on one host. Orbax would otherwise put each array back on the saved
  shardings and refuse ("different topology"). The whole state is read
  (params, optimizer, EMA), so expect host memory of about 4x the params.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  checkpointer = ocp.StandardCheckpointer()
  try:
    meta = checkpointer.metadata(pathlib.Path(manager.directory) / str(step) / "state")
  finally:
    checkpointer.close()
  tree = getattr(meta, "item_metadata", meta)
  # numpy leaves as the target: orbax restores numpy arrays, sharding-free.
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), getattr(tree, "tree", tree))
  restored = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return restored["state"]


def restore_config(manager: ocp.CheckpointManager,
                   step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with ``step`` (default the latest)."""
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}")
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return config_from_json(restored["config"])


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct``s of ``tree`` carrying ``shardings`` (for ``restore``)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
