"""One conversion, end to end: a source directory -> a model directory ``--model`` accepts.

``convert`` is what ``python -m launch.convert`` runs (its docstring has the
command lines): the source's ``config.json`` sets the architecture fields of
our config, the safetensors are converted by ``clip`` / ``unet3d`` / ``vae``,
and the result is written as a workdir-shaped directory (``checkpoints/0``
in Orbax with the config, ``config.json``, ``convert.json``) into a temp
sibling, renamed into place when complete, then read back and checked
against the code once more. ``summary`` is the report a person reads.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import resource
import shutil
import time
from typing import Any, Sequence

import jax
import numpy as np

from persvid_jax import atomic
from persvid_jax import checkpoint as ckpt_lib
from persvid_jax import config_lib
from persvid_jax.concepts.tokens import PromptTokenizer
from persvid_jax.convert import clip, common, unet3d, vae
from persvid_jax.convert.common import ConvertError
from persvid_jax.models.stack import ModelStack
from persvid_jax.pipeline import model as model_lib

KINDS = ("clip", "unet3d", "vae")
GENERATORS = ("unet", "sr_unet")     # what --kind unet3d can become


@dataclasses.dataclass(frozen=True)
class Converted:
  """What ``convert`` wrote (``info`` is ``OUT/convert.json``)."""
  out: pathlib.Path
  src: pathlib.Path         # as given
  info: dict[str, Any]      # kind, src, networks, parameters, new, widened, from_model, ...


def convert(kind: str, src: str | pathlib.Path, out: str | pathlib.Path, *,
            config_spec: str = "configs/modelscope.py", base: str | None = None,
            network: str = "unet", tokenizer: str | None = None,
            overrides: Sequence[str] = ()) -> Converted:
  """Converts the model in ``src`` (``kind``: clip, unet3d or vae) into ``out``.

  Args:
    kind: the source format, one of ``KINDS``.
    src: the source directory (``config.json`` + safetensors).
    out: the model directory to write; must not exist (its parent must).
    config_spec: our config the architecture is written into (ignored with ``base``).
    base: an earlier converted / exported model: its config, and its networks
      for everything not converted here.
    network: ``--kind unet3d``: which generator the UNet becomes (``GENERATORS``).
    tokenizer: ``--kind clip``: a tokenizer directory (default ``src`` if it
      holds ``vocab.json`` + ``merges.txt``).
    overrides: ``KEY=VALUE`` config overrides.

  Raises:
    ConvertError: an unusable source (pickle only, the wrong model class,
      shapes that do not fit), or a result that did not read back as written
      (then nothing is kept).
    config_lib.ConfigError: a bad config or override.
  """
  t0 = time.perf_counter()
  src, out = pathlib.Path(src), pathlib.Path(out)
  if kind not in KINDS or network not in GENERATORS:
    raise ConvertError(f"kind {kind!r} / network {network!r}: use one of {', '.join(KINDS)} "
                       f"/ {', '.join(GENERATORS)}")
  if out.exists():
    raise ConvertError(f"--out {out} exists; give a new directory")
  if not src.is_dir():
    raise ConvertError(f"--src {src} is not a directory")
  if base:
    config = model_lib.collect_networks([base], fill_missing=False)[0]
    config = config.copy_and_resolve_references()
  else:
    config = config_lib.load_config(config_spec)
  config = config_lib.apply_overrides(config, list(overrides))
  params, report = _convert_params(kind, src, config, network, tokenizer)
  config.train.init_from = str(pathlib.Path(base).resolve()) if base else None
  if kind != "vae":      # the VAE is no training stage's network
    config.train.stage = "personalize" if kind == "clip" else (
        "sr" if network == "sr_unet" else "base")
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  with atomic.directory(out) as tmp:
    manager = ckpt_lib.make_manager(tmp / "checkpoints", async_save=False)
    ckpt_lib.save(manager, 0, {"ema_params": params}, config)
    manager.wait_until_finished()
    manager.close()
    (tmp / "config.json").write_text(config.to_json(indent=2))
    info = dict(kind=kind, src=str(src.resolve()), networks=sorted(params),
                parameters=n, new=report.get("new", []), widened=report.get("widened", []),
                from_model=config.train.init_from,
                seconds=round(time.perf_counter() - t0, 1),
                peak_host_memory_gib=round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"))
    (tmp / "convert.json").write_text(json.dumps(info, indent=2))
  # Read back what was written (Orbax round trip), checked against the code again.
  _, written, _ = model_lib.collect_networks([out], fill_missing=False, networks=tuple(params))
  for name in params:
    if jax.tree.map(np.shape, written[name]) != jax.tree.map(np.shape, params[name]):
      shutil.rmtree(out)
      raise ConvertError(f"{out}: {name} did not read back as written; nothing kept")
  return Converted(out=out, src=src, info=info)


def _convert_params(kind: str, src: pathlib.Path, config, network: str,
                    tokenizer: str | None) -> tuple[dict, dict]:
  """``({network: params}, report)`` of the source; writes the architecture into ``config``."""
  hf = common.read_config(src)
  if kind == "clip":
    config.text.update(clip.text_config(hf, num_placeholders=config.concepts.capacity))
    tok_dir = pathlib.Path(tokenizer) if tokenizer else src
    if (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file():
      config.text.tokenizer_dir = str(tok_dir.resolve())
    elif tokenizer:
      raise ConvertError(f"--tokenizer {tok_dir}: no vocab.json + merges.txt there")
    state = common.read_state(src, ("model.safetensors",))
    has_vision = any(k.startswith("vision_model.") for k in state)
    if has_vision:
      config.image.update(clip.image_config(hf, projection=config.image.projection_dim > 0))
    abstract = _abstract(config, ["text_encoder"] + (["image_encoder"] if has_vision else []))
    params = {"text_encoder": clip.text_encoder_params(state, abstract["text_encoder"],
                                                       source=str(src))}
    if has_vision:
      params["image_encoder"] = clip.image_encoder_params(state, abstract["image_encoder"],
                                                          source=str(src))
    return params, {}
  if kind == "vae":
    config.vae = vae.vae_config(hf)
    state = common.read_state(src, vae.WEIGHTS_FILES)
    return {"vae": vae.vae_params(state, config.vae, source=str(src))}, {}
  config[network].update(unet3d.unet_config(hf))
  abstract = _abstract(config, [network])
  state = common.read_state(src, unet3d.WEIGHTS_FILES)
  converted, report = unet3d.unet_params(state, abstract[network], network=network,
                                         source=str(src))
  return {network: converted}, report


def _abstract(config, names: Sequence[str]) -> dict:
  """The abstract params (shapes, no memory) of networks ``names`` under ``config``."""
  try:
    tokenizer = PromptTokenizer.from_config(config)
    stack = ModelStack.from_config(config, eos_token_id=tokenizer.eos_id)
    stack.abstract_variables()     # shape errors surface here, not half-way
  except ValueError as e:
    raise ConvertError(f"the source's architecture does not fit the config: {e}") from None
  variables = stack.abstract_variables(names)
  return {n: common.nn_unbox(variables[n])["params"] for n in names}


def summary(result: Converted, base: str | None = None) -> str:
  """The lines ``launch.convert`` prints: what was converted, what is new, where the rest is."""
  info = result.info
  lines = [f"converted {', '.join(info['networks'])} ({info['parameters']:,} parameters) from "
           f"{result.src} to {result.out} in {info['seconds']:.1f} s, peak host memory "
           f"{info['peak_host_memory_gib']} GiB"]
  if info["new"]:
    lines.append(f"  {len(info['new'])} parameters new in persvid (zero / copied: the "
                 f"checkpoint's function), e.g. {info['new'][0]}")
  if info["widened"]:
    lines.append(f"  {len(info['widened'])} kernels widened with zeros, e.g. "
                 f"{info['widened'][0]}")
  rest = [n for n in model_lib.NETWORKS if n not in info["networks"]]
  lines.append(f"  the other networks ({', '.join(rest)}) come from "
               f"{base or 'the seeded init'} when --model {result.out} loads")
  return "\n".join(lines)
