"""diffusers ``AutoencoderKL`` (Stable Diffusion / ModelScope ``vae/``) -> our ``vae``.

The rename table: ``a.0.b`` -> ``a_0/b`` (``unet3d.diffusers_path``), then
``weight`` -> ``scale`` / ``kernel`` as in ``common.torch_layout``. Checkpoints
written before diffusers 0.14 name the mid-block attention ``query`` / ``key``
/ ``value`` / ``proj_attn``; they are read as ``to_q`` / ``to_k`` / ``to_v`` /
``to_out.0`` (diffusers renames them the same way when it loads them).
Every parameter comes from the checkpoint: anything missing, unexpected,
mis-shaped or non-float raises ``ConvertError`` naming the tensor.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from persvid_jax.convert.common import (ConvertError, assemble, config_bool, config_float,
                                        config_int, config_list, config_str, float_array,
                                        require_object, torch_layout)
from persvid_jax.convert.unet3d import diffusers_path

WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
_LEGACY_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# diffusers' AutoencoderKL.__init__ defaults (old config.json files omit newer keys).
_DEFAULTS = dict(in_channels=3, out_channels=3, block_out_channels=(64,), layers_per_block=1,
                 latent_channels=4, norm_num_groups=32, scaling_factor=0.18215,
                 shift_factor=None, mid_block_add_attention=True, use_quant_conv=True,
                 use_post_quant_conv=True)
# Keys that do not change the network's function.
_IGNORED = {"sample_size", "force_upcast", "down_block_types", "up_block_types", "act_fn",
            "latents_mean", "latents_std"}


def vae_config(hf: Mapping[str, Any]) -> dict:
  """``config.vae`` fields from a diffusers ``AutoencoderKL`` ``config.json``.

  Raises:
    ConvertError: not a JSON object, another model class, an option we do not
      implement, or a field of the wrong type (named).
  """
  require_object(hf)
  if hf.get("_class_name") != "AutoencoderKL":
    raise ConvertError(f"config.json is a {hf.get('_class_name') or 'model without _class_name'}"
                       f", not an AutoencoderKL (diffusers writes _class_name)")
  unsupported = []
  n = len(config_list(hf, "block_out_channels", _DEFAULTS["block_out_channels"], of=int))
  for key, want in (("down_block_types", "DownEncoderBlock2D"),
                    ("up_block_types", "UpDecoderBlock2D")):
    got = config_list(hf, key, (want,) * n, of=str)
    if got != (want,) * n:
      unsupported.append(f"{key}={list(got)} (only {n} x {want} is implemented)")
  act = config_str(hf, "act_fn", "silu")
  if act not in ("silu", "swish"):
    unsupported.append(f"act_fn={act!r} (only silu)")
  for key in ("latents_mean", "latents_std"):
    if hf.get(key) is not None:
      unsupported.append(f"{key} (per-channel latent normalisation)")
  unknown = sorted(k for k in hf if not k.startswith("_") and k not in _DEFAULTS
                   and k not in _IGNORED)
  if unknown:
    unsupported.append(f"unknown options {unknown}")
  if unsupported:
    raise ConvertError(f"AutoencoderKL config.json has options we do not convert: "
                       f"{'; '.join(unsupported)}")
  out = {k: config_int(hf, k, _DEFAULTS[k]) for k in (
      "in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups")}
  out["block_out_channels"] = config_list(hf, "block_out_channels",
                                          _DEFAULTS["block_out_channels"], of=int)
  for k in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
    out[k] = config_bool(hf, k, _DEFAULTS[k])
  out["scaling_factor"] = config_float(hf, "scaling_factor", _DEFAULTS["scaling_factor"])
  out["shift_factor"] = config_float(hf, "shift_factor", None, optional=True)
  return {k: out[k] for k in _DEFAULTS}      # the field order of before


def rename(state: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """``({our/path: float32 array}, {our/path: diffusers name})`` of a diffusers state dict."""
  flat, sources = {}, {}
  for name, array in state.items():
    current = _LEGACY_ATTENTION.sub(lambda m: m.group(1) + _LEGACY_NAMES[m.group(2)] + ".",
                                    name)
    path, array = torch_layout(diffusers_path(current), float_array(name, array))
    flat[path], sources[path] = array, name
  return flat, sources


def vae_params(state: Mapping[str, np.ndarray], vae_cfg, *, source: str = "checkpoint") -> dict:
  """Our ``vae`` params from a diffusers ``AutoencoderKL`` state dict.

  Args:
    state: the checkpoint's tensors (``common.read_state``).
    vae_cfg: ``config.vae`` (a mapping, ConfigDict or ``VAESpec``).
    source: for messages.

  Raises:
    ConvertError: listing missing, unexpected and mis-shaped tensors.
  """
  from persvid_jax.models.vae import AutoencoderKL, VAESpec, abstract_params
  try:
    spec = vae_cfg if isinstance(vae_cfg, VAESpec) else VAESpec.from_config(vae_cfg)
  except ValueError as e:
    raise ConvertError(f"{source}: {e}") from None
  flat, sources = rename(state)
  return assemble(flat, abstract_params(AutoencoderKL(spec)), network="vae", source=source,
                  sources=sources)
