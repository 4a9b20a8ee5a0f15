"""``config.train.init_from``: start a stage from the networks another run or model holds.

Also the latent-space checks that go with it: the VAE comes from there (or is
``config.latent.random_vae``'s seeded init) and is never trained.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

from persvid_jax.models import stack as stack_lib
from persvid_jax.pipeline import model as model_lib
from persvid_jax.train import state as state_lib

log = logging.getLogger(__name__)


def check_vae_frozen(config, boxed_params) -> None:
  """Latent space: no ``trainable`` pattern may reach the VAE (raises ValueError)."""
  vae_only = {stack_lib.VAE: nn.meta.unbox(boxed_params[stack_lib.VAE])}
  if any(jax.tree.leaves(state_lib.trainable_mask(vae_only, config.train.trainable))):
    raise ValueError(f"config.train.trainable={tuple(config.train.trainable)} matches VAE "
                     f"params; the VAE of latent space is frozen, leave 'vae/' out")


VAE_FIX = ("set config.train.init_from to a model holding one (python -m launch.convert "
            "--kind vae --src VAE_DIR --out DIR), or config.latent.random_vae=True for a "
            "toy/test config")


def init_from(state: state_lib.TrainState, init_from: str, state_shards, *,
               random_vae: bool = False, networks: Sequence[str] | None = None):
  """Copies params of the networks another run holds into a fresh state.

  ``init_from`` is a training workdir (the EMA params of its latest
  checkpoint, then along its own ``init_from`` chain), an exported model
  directory (``model.safetensors``: fine-tune a shipped model) or a converted
  one (``launch.convert``). Networks the source lacks keep their init; a
  network whose shapes differ is refused. A latent-space stage takes its VAE
  from there too; without one there, only ``config.latent.random_vae`` lets
  it keep its seeded init.

  ``networks`` (``config.train.init_networks``): copy only these (default every
  network this stage holds), e.g. the frozen text encoder alone, so that an SR
  network of another shape starts fresh beside the same conditions.
  """
  path = pathlib.Path(init_from)
  if not model_lib.is_exported(path) and not (path / "checkpoints").is_dir():
    raise FileNotFoundError(f"config.train.init_from={init_from!r} is no training workdir "
                            f"(no checkpoints/) and no exported model (no "
                            f"{model_lib.WEIGHTS_FILE})")
  try:
    # Along the init_from chain (a converted CLIP under a converted UNet, ...).
    unknown = sorted(set(networks or ()) - set(state.params))
    if unknown:
      raise model_lib.ModelError(
          f"config.train.init_networks names {unknown}, which this stage does not hold; "
          f"use some of {sorted(state.params)}")
    wanted = tuple(n for n in state.params if networks is None or n in networks)
    _, source, _ = model_lib.collect_networks([path], fill_missing=False, networks=wanted)
  except model_lib.ModelError as e:
    if "holds no checkpoint" in str(e):
      raise FileNotFoundError(f"config.train.init_from={init_from!r} holds no checkpoint "
                              f"yet") from None
    raise
  params, ema = dict(state.params), dict(state.ema_params)
  if stack_lib.VAE in params and stack_lib.VAE not in source and not random_vae:
    raise model_lib.ModelError(f"config.train.init_from={init_from!r} holds no VAE for "
                               f"latent space: {VAE_FIX}")
  for name in params:
    if name not in source:
      continue
    want = jax.tree.map(lambda a: tuple(a.shape), params[name])
    got = jax.tree.map(lambda a: tuple(np.shape(a)), dict(source[name]))
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
      raise model_lib.ModelError(
          f"config.train.init_from={init_from!r}: network {name!r} there does not match "
          f"this config's {name!r} (other parameter names or shapes); start from a run "
          f"of the same architecture")
    put = lambda old, new, s: jax.device_put(np.asarray(new, old.dtype), s)
    params[name] = jax.tree.map(put, params[name], source[name], state_shards.params[name])
    ema[name] = jax.tree.map(put, ema[name], source[name], state_shards.params[name])
    log.info("init_from %s: %s", init_from, name)
  return state.replace(params=params, ema_params=ema)
