"""A trained model for inference: config + every network's params, loaded strictly.

Two on-disk forms are accepted wherever a ``--model DIR`` is:

* an **exported model** (``export_model``): ``config.json`` + ``model.safetensors``
  (one flat tensor per parameter, keys ``network/module/.../leaf``) +
  ``model.json`` (provenance). This is what ships in ``persvid_jax/assets/demo``
  (one file, no Orbax directory layout to package, readable from torch too).
* a **training workdir** (``launch.train``): the EMA params of its latest
  Orbax checkpoint. A stage holds only the networks it runs; the others are
  taken from the workdir (or exported model) its ``config.train.init_from``
  names, recursively.

Loading is strict, as in big_vision's checkpoint merging: the tree is checked
against ``jax.eval_shape`` of the current code's init, and any missing,
unexpected or mis-shaped parameter raises ``ModelError`` listing them. So a
shipped model can never go silently stale when the code changes.

A latent-space model (``config.latent.enabled``) also holds its frozen VAE
(network ``vae``): in the workdir of every stage, along ``init_from`` chains
(``launch.convert --kind vae``) and in an export. A model without one loads
only if ``config.latent.random_vae`` (toy and test configs): it then gets the
seeded init training gave it (``models.stack.init_params``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from persvid_jax import atomic
from persvid_jax import checkpoint as ckpt_lib
from persvid_jax import params as params_lib
from persvid_jax import sharding as sharding_lib
from persvid_jax.concepts.tokens import PromptTokenizer
from persvid_jax.models import stack as stack_lib
from persvid_jax.models.stack import NETWORKS, ModelStack

#: The model ``python -m launch.demo`` and every ``--model`` default use.
DEMO_MODEL_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "demo"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
INFO_FILE = "model.json"

# Networks whose params determine a concept's stored features: a database
# built with one model is refused by another (see ``Model.feature_id``).
FEATURE_NETWORKS = ("text_encoder", "image_encoder", "mapper", "extractor")


class ModelError(ValueError):
  """A model directory is missing, incomplete or does not match the code."""


@dataclasses.dataclass
class Model:
  """Everything inference needs.

  Attributes:
    config: the model's config (as trained).
    stack: the six networks (``ModelStack``), built from ``config``.
    tokenizer: the ``PromptTokenizer`` of ``config``.
    params: ``{network: params}`` for all of ``stack.network_names`` (the six
      ``NETWORKS``, plus ``vae`` in latent space; float32 arrays).
    source: where it was loaded from.
    info: provenance (``model.json`` of an export; workdirs + steps otherwise).
  """
  config: ml_collections.ConfigDict
  stack: ModelStack
  tokenizer: PromptTokenizer
  params: dict
  source: str
  info: dict

  @property
  def feature_id(self) -> str:
    """A hash of the params that make concept features (16 hex digits).

    A concept database records it, so that features made by one model are
    never fed to another.
    """
    h = hashlib.sha256()
    for name in FEATURE_NETWORKS:
      for path, leaf in sorted(params_lib.flatten(self.params[name], name, np.asarray).items()):
        h.update(path.encode())
        h.update(np.ascontiguousarray(leaf, np.float32).tobytes())
    h.update(json.dumps(dict(self.config.concepts), sort_keys=True).encode())
    return h.hexdigest()[:16]


def validate_params(stack: ModelStack, params: dict, source: str) -> dict:
  """Checks ``params`` against the code's abstract init; returns float32 numpy params.

  Raises:
    ModelError: listing missing / unexpected / mis-shaped parameters.
  """
  expected = {}
  for name, variables in stack.abstract_variables().items():
    expected.update(params_lib.flatten(nn.meta.unbox(variables)["params"], name,
                                       lambda v: tuple(v.shape)))
  got = {}
  for name in params:
    got.update(params_lib.flatten(params[name], name, np.asarray))
  problems = params_lib.mismatches(expected, {k: v.shape for k, v in got.items()}, limit=5)
  if problems:
    raise ModelError(f"model {source} does not match this code's architecture for its "
                     f"config ({'; '.join(problems)}); re-export or retrain it")
  return params_lib.unflatten({k: np.asarray(v, np.float32) for k, v in got.items()})


def _build(config) -> tuple[ModelStack, PromptTokenizer]:
  tokenizer = PromptTokenizer.from_config(config)
  return ModelStack.from_config(config, eos_token_id=tokenizer.eos_id), tokenizer


def is_exported(path: str | os.PathLike) -> bool:
  """Whether ``path`` is an exported model directory (holds ``model.safetensors``)."""
  return (pathlib.Path(path) / WEIGHTS_FILE).is_file()


def read_exported(d: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """``(config, {network: params}, info)`` of an exported model, unvalidated.

  Params are numpy arrays as stored; ``validate_params`` checks them against
  the code. Raises ``ModelError`` if a file is unreadable.
  """
  d = pathlib.Path(d)
  try:
    config = ckpt_lib.config_from_json(json.loads((d / CONFIG_FILE).read_text()))
    flat = load_file(str(d / WEIGHTS_FILE))
    info = json.loads((d / INFO_FILE).read_text()) if (d / INFO_FILE).is_file() else {}
  except (OSError, ValueError) as e:
    raise ModelError(f"model {d} is unreadable ({e}); re-export it") from None
  return config, params_lib.unflatten(flat), info


def _workdir_params(workdir: pathlib.Path) -> tuple[ml_collections.ConfigDict, dict, int]:
  """``(config, {network: EMA params}, step)`` of a training workdir's latest checkpoint."""
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.is_dir():
    raise ModelError(f"{workdir} is not a training workdir (no checkpoints/) nor an exported "
                     f"model (no {WEIGHTS_FILE})")
  manager = ckpt_lib.make_manager(ckpt_dir, async_save=False)
  try:
    step = manager.latest_step()
    if step is None:
      raise ModelError(f"{workdir} holds no checkpoint yet")
    config = ckpt_lib.restore_config(manager, step)
    state = ckpt_lib.restore_to_host(manager, step)
  finally:
    manager.close()
  params = dict(state["ema_params"])
  return config, params, int(step)


def collect_networks(paths: Sequence[str | os.PathLike], *, fill_missing: bool = True,
                     networks: Sequence[str] | None = None) -> tuple[Any, dict, list]:
  """``(config, {network: params}, sources)`` from workdirs / exported models.

  Each network comes from the first of ``paths`` that holds it, then along
  their ``config.train.init_from`` chains (a chain ends at an exported model).
  ``fill_missing``: networks found nowhere get the seeded init training gives
  them (inference needs all six); otherwise they are left out (training's
  ``init_from`` keeps its own init for them). The config is the first path's.
  ``networks``: which to collect (default: the first path's config's,
  ``models.stack.network_names``); a converted network outside the six
  (``("vae",)``) is found the same way, and never filled here.
  """
  return _collect([pathlib.Path(p) for p in paths], fill_missing=fill_missing,
                  networks=None if networks is None else tuple(networks))


def _collect(workdirs: Sequence[pathlib.Path], fill_missing: bool = True,
             networks: Sequence[str] | None = None) -> tuple[Any, dict, list]:
  """Networks from ``workdirs`` in order, then along their ``init_from`` chains."""
  config, params, sources = None, {}, []
  queue, seen = [pathlib.Path(w) for w in workdirs], set()
  while queue and (networks is None or len(params) < len(networks)):
    w = queue.pop(0).resolve()
    if w in seen:
      continue
    seen.add(w)
    if is_exported(w):   # e.g. a stage fine-tuned from an exported model: the chain ends
      cfg, found, exported_info = read_exported(w)
      source = dict(model=str(w))
      if exported_info.get("sources"):
        source["from"] = exported_info["sources"]   # its provenance, nested
    else:
      cfg, found, step = _workdir_params(w)
      source = dict(workdir=str(w), step=step, stage=cfg.train.stage)
      if cfg.train.get("init_from"):
        queue.append(pathlib.Path(cfg.train.init_from))
    config = config or cfg
    if networks is None:
      networks = stack_lib.network_names(config)
    taken = [n for n in networks if n in found and n not in params]
    for n in taken:
      params[n] = found[n]
    sources.append(dict(source, networks=taken))
  missing = [n for n in networks or () if n not in params and n in NETWORKS]
  if missing and fill_missing:
    # A network no stage trained (e.g. the image encoder, which no stage
    # updates) keeps its seeded init: re-create it exactly as training did.
    stack, _ = _build(config)
    init = stack_lib.init_params(   # the same keys as training
        stack, missing, jax.random.split(jax.random.key(config.seed), 3)[0])
    for n in missing:
      params[n] = jax.tree.map(np.asarray, nn.meta.unbox(init[n]))
    sources.append(dict(init_seed=int(config.seed), networks=missing))
  return config, params, sources


def load_model(path: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> Model:
  """Loads an exported model or training workdir(s) (default: the shipped demo).

  Raises:
    ModelError: missing directory, no checkpoint, or params not matching the code.
  """
  paths = [DEMO_MODEL_DIR] if path is None else (
      [path] if isinstance(path, (str, os.PathLike)) else list(path))
  paths = [pathlib.Path(p) for p in paths]
  for p in paths:
    if p.exists() and not p.is_dir():
      raise ModelError(f"{p} is a file, not a model directory (give the directory holding "
                       f"{WEIGHTS_FILE}, or a training workdir)")
    if not p.is_dir():
      hint = (" (the demo model ships inside the package; reinstall it)"
              if p == DEMO_MODEL_DIR else "")
      raise ModelError(f"model directory {p} does not exist{hint}")
  if len(paths) == 1 and is_exported(paths[0]):
    config, params, info = read_exported(paths[0])
    source = str(paths[0])
  else:
    config, params, sources = _collect(paths)
    info = dict(sources=sources)
    source = ", ".join(map(str, paths))
  stack, tokenizer = _build(config)
  if stack.vae is not None and stack_lib.VAE not in params:
    params[stack_lib.VAE] = _seeded_vae(stack, source)
    info.setdefault("sources", []).append(dict(init_seed=int(config.seed),
                                               networks=[stack_lib.VAE]))
  params = validate_params(stack, params, source)
  return Model(config=config, stack=stack, tokenizer=tokenizer, params=params,
               source=source, info=info)


def place(model: Model, mesh) -> Model:
  """The model with its params on ``mesh``, each sharded by the networks' logical axes.

  ``load_model`` and the converters read checkpoints on the host (numpy);
  this puts every leaf straight onto the devices with its target sharding
  (``sharding.param_shardings`` of the ``eval_shape`` of our init: kernels
  split over ``fsdp``), so a model larger than one device's memory is never
  gathered on one device. Values are unchanged.

  Args:
    model: a loaded ``Model`` (host params).
    mesh: a ``('data', 'fsdp')`` mesh (``sharding.make_mesh``).

  Returns:
    A ``Model`` whose ``params`` are ``jax.Array``s sharded over ``mesh``.
  """
  names = list(model.params)
  abstract = model.stack.abstract_variables(names)
  params = {}
  for name in names:
    shards = sharding_lib.param_shardings(abstract[name]["params"], mesh)
    params[name] = jax.tree.map(jax.device_put, model.params[name], shards)
  return dataclasses.replace(model, params=params)


def _seeded_vae(stack: ModelStack, source: str) -> dict:
  """The VAE training gave a latent model of a ``random_vae`` config (else ModelError)."""
  config = stack.config
  if not config.latent.get("random_vae", False):
    raise ModelError(f"model {source} is a latent-space model (config.latent.enabled) but "
                     f"holds no VAE; convert one into it (python -m launch.convert --kind vae "
                     f"--src VAE_DIR --out DIR --from MODEL) and load DIR")
  # The same key as training's init (loop.setup: the first of three splits).
  init = stack_lib.init_params(stack, [stack_lib.VAE],
                               jax.random.split(jax.random.key(config.seed), 3)[0])
  return jax.tree.map(np.asarray, nn.meta.unbox(init[stack_lib.VAE]))


def check_export_target(out_dir: str | os.PathLike) -> None:
  """Raises ModelError unless ``export_model`` may write ``out_dir``.

  It may be new, empty, or an exported model (``model.safetensors`` +
  ``model.json``: replaced). Anything else is refused rather than deleted.
  """
  out_dir = pathlib.Path(out_dir)
  if not out_dir.exists():
    return
  if not out_dir.is_dir():
    raise ModelError(f"{out_dir} is a file; give a new directory for the model")
  if any(out_dir.iterdir()) and not ((out_dir / WEIGHTS_FILE).is_file()
                                     and (out_dir / INFO_FILE).is_file()):
    raise ModelError(f"{out_dir} is neither empty nor an exported model (no {WEIGHTS_FILE} + "
                     f"{INFO_FILE}); nothing was written: give a new or empty directory")


def export_model(model: Model, out_dir: str | os.PathLike, **extra_info) -> pathlib.Path:
  """Writes ``model`` as an exported model directory (atomically: temp dir + rename).

  Files: ``config.json``, ``model.safetensors`` (float32), ``model.json``
  (provenance: sources, parameter count, feature id, creation time, ``extra_info``).
  An existing exported model at ``out_dir`` is replaced; any other non-empty
  directory is refused (``check_export_target``), never deleted.
  """
  out_dir = pathlib.Path(out_dir)
  check_export_target(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  flat = {}
  for name in model.stack.network_names:
    flat.update(params_lib.flatten(model.params[name], name, np.asarray))
  info = dict(model.info, created=datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"), parameters=int(sum(v.size for v in flat.values())),
      feature_id=model.feature_id, **extra_info)
  with atomic.directory(out_dir) as tmp:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()},
              str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(ckpt_lib.config_to_json(model.config),
                                              indent=2))
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    for f in tmp.iterdir():   # a model is meant to be shared, whatever the umask
      os.chmod(f, 0o644)
    check_export_target(out_dir)      # again: it may have changed while we wrote
  return out_dir


def abstract_model(config, networks: Sequence[str] | None = None) -> Model:
  """A model whose params are ``jax.ShapeDtypeStruct`` leaves: nothing allocated
  (for lowering or compiling its programs for an absent device, ``bench.aot``).

  Args:
    networks: only these get params (default every network of the stack).
  """
  stack, tokenizer = _build(config)
  names = tuple(networks or stack.network_names)
  params = {n: nn.meta.unbox(a)["params"] for n, a in stack.abstract_variables(names).items()}
  return Model(config=config, stack=stack, tokenizer=tokenizer, params=params,
               source="abstract (shapes only)", info=dict(sources=[]))


def random_model(config, seed: int = 0, *, std: float | None = None,
                 networks: Sequence[str] | None = None) -> Model:
  """A model with fresh params (tests, benchmarks, shape checks).

  Args:
    std: None: each network's own initialisation (run eagerly: compiling six init
      programs costs more than running them). A number: every leaf drawn from
      N(0, std) (``params.random_params``): no init program at all, which is what a
      3.6 B-parameter model wants when only timing or shapes matter.
    networks: only these get params (default every network of the stack); e.g.
      adding a concept needs the image encoder, mapper and extractor only.
  """
  rng = jax.random.key(seed)
  if std is not None:
    abstract = abstract_model(config, networks)
    return dataclasses.replace(
        abstract, params=params_lib.random_params(abstract.params, rng, std=std),
        source=f"random N(0, {std}) (seed {seed})",
        info=dict(sources=[dict(init_seed=seed, std=std)]))
  stack, tokenizer = _build(config)
  names = tuple(networks or stack.network_names)
  params = {}
  for i, name in enumerate(names):
    variables = stack.init_fn(name)(jax.random.fold_in(rng, i))
    params[name] = jax.tree.map(np.asarray, nn.meta.unbox(variables)["params"])
  return Model(config=config, stack=stack, tokenizer=tokenizer, params=params,
               source=f"random init (seed {seed})", info=dict(sources=[dict(init_seed=seed)]))
