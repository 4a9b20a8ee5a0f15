"""diffusers ``UNet3DConditionModel`` (ModelScope / Zeroscope) -> our ``unet`` / ``sr_unet``.

The rename table (``diffusers_path``): ``a.0.b`` -> ``a_0/b``, except the
temporal convs' ``nn.Sequential`` (``temp_convs.0.conv1.0`` is our
``temp_convs_0/conv1/norm``, ``.conv1.2`` / ``.conv1.3`` its ``conv``); then
``weight`` -> ``scale`` / ``kernel`` as in ``common.torch_layout``.

Our networks add parameters the checkpoint cannot have. Each starts so that
the converted network computes exactly the checkpoint's function (ControlNet /
IP-Adapter practice: a new branch adds zero until training opens it):

* ``to_v_detail`` = 0 and ``to_k_detail`` = the text ``to_k`` (zeros if the
  widths differ): the decoupled detail attention adds zero;
* ``noise_level_embedding``: ``linear_1`` = ``time_embedding.linear_1``,
  ``linear_2`` = 0: the SR augmentation level adds zero to the time embedding;
* a conv with **more input channels** (the SR network's ``conv_in`` sees the
  upsampled low-res video too): the checkpoint's kernel fills the first input
  channels, the extra ones are zero;
* a conv with **larger spatial taps** (the SR network's 5x5 kernels: the cascade's kernel change):
  the checkpoint's 3x3 kernel sits at the centre, zeros around -- the same
  function at dilation 1 (with dilation the taps spread: a start, not an
  identity).

No random init is computed, so a full-size conversion holds the checkpoint
and its converted copy, nothing more.
Anything else missing, unexpected or mis-shaped raises ``ConvertError``.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from persvid_jax import params as params_lib
from persvid_jax.convert.common import (ConvertError, assemble, config_float, config_int,
                                        config_list, float_array, require_object, torch_layout)

NEW_PARAMS = re.compile(r"(^|/)(to_k_detail|to_v_detail|noise_level_embedding)(/|$)")
WEIGHTS_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def diffusers_path(name: str) -> str:
  """A diffusers parameter name -> our path (leaf still ``weight`` / ``bias``)."""
  parts, out, i = name.split("."), [], 0
  while i < len(parts):
    part = parts[i]
    if i + 1 < len(parts) and parts[i + 1].isdigit():
      if re.fullmatch(r"conv[1-4]", part) and out and out[-1].startswith("temp_convs_"):
        # nn.Sequential(GroupNorm, SiLU, [Dropout,] Conv3d) -> conv{i}/norm, conv{i}/conv
        out += [part, "norm" if parts[i + 1] == "0" else "conv"]
      else:
        out.append(f"{part}_{parts[i + 1]}")
      i += 2
    else:
      out.append(part)
      i += 1
  return "/".join(out)


def rename(state: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """``({our/path: float32 array}, {our/path: diffusers name})`` of a diffusers state dict."""
  flat, sources = {}, {}
  for name, array in state.items():
    path = diffusers_path(name)
    path, array = torch_layout(path, float_array(name, array))
    flat[path], sources[path] = array, name
  return flat, sources


def _widen(path: str, got: np.ndarray, want: tuple) -> np.ndarray | None:
  """``got`` embedded in zeros of shape ``want`` if only input channels / odd taps grew."""
  if got.ndim != len(want) or got.ndim < 3 or not path.endswith("kernel"):
    return None
  taps_got, taps_want = got.shape[:-2], want[:-2]
  if got.shape[-1] != want[-1] or got.shape[-2] > want[-2]:
    return None
  if any(w < g or (w - g) % 2 for g, w in zip(taps_got, taps_want)):
    return None
  out = np.zeros(want, np.float32)
  index = tuple(slice((w - g) // 2, (w - g) // 2 + g) for g, w in zip(taps_got, taps_want))
  out[index + (slice(0, got.shape[-2]), slice(None))] = got
  return out


def _new_param(path: str, shape: tuple, flat: Mapping[str, np.ndarray]) -> np.ndarray:
  """The start of a parameter only our networks have (see the module docstring)."""
  def same(other):
    a = flat.get(other)
    return np.array(a, np.float32) if a is not None and tuple(a.shape) == shape else None
  if path.endswith("to_k_detail/kernel"):
    copy = same(path.replace("to_k_detail/kernel", "to_k/kernel"))
    return copy if copy is not None else np.zeros(shape, np.float32)
  if "noise_level_embedding/linear_1/" in path:
    copy = same(path.replace("noise_level_embedding/", "time_embedding/"))
    return copy if copy is not None else np.zeros(shape, np.float32)
  return np.zeros(shape, np.float32)       # to_v_detail, noise_level_embedding/linear_2


def unet_params(state: Mapping[str, np.ndarray], abstract_params, *,
                network: str = "unet", source: str = "checkpoint") -> tuple[dict, dict]:
  """Our ``unet`` / ``sr_unet`` params from a diffusers state dict.

  Args:
    state: diffusers ``UNet3DConditionModel`` tensors.
    abstract_params: unboxed ``eval_shape`` params of our network.
    network: for messages.
    source: for messages.

  Returns:
    ``(params, report)``; ``report`` lists the parameters only our network has
    (``new``) and the kernels widened from the checkpoint's (``widened``).
  """
  flat, sources = rename(state)
  expected = {k: tuple(v.shape) for k, v in params_lib.flatten(abstract_params).items()}
  report = {"new": [], "widened": []}
  for path, shape in expected.items():
    if path in flat:
      if tuple(flat[path].shape) != shape:
        wide = _widen(path, flat[path], shape)
        if wide is not None:
          flat[path] = wide
          report["widened"].append(path)
    elif NEW_PARAMS.search(path):
      flat[path] = _new_param(path, shape, flat)
      report["new"].append(path)
  params = assemble(flat, abstract_params, network=network, source=source, sources=sources)
  return params, report


def unet_config(hf: dict) -> dict:
  """``config.unet`` fields from a diffusers ``UNet3DConditionModel`` ``config.json``.

  Raises:
    ConvertError: not a JSON object, another model class, per-block head
      widths, or a field of the wrong type (named).
  """
  require_object(hf)
  if hf.get("_class_name") != "UNet3DConditionModel":
    raise ConvertError(f"config.json is a {hf.get('_class_name') or 'model without _class_name'}"
                       f", not a UNet3DConditionModel (diffusers writes _class_name)")
  if isinstance(hf.get("attention_head_dim"), (list, tuple)):
    raise ConvertError(f"attention_head_dim={hf['attention_head_dim']!r}: only one head width "
                       f"for all blocks is supported")
  head = config_int(hf, "attention_head_dim", 64)
  return dict(in_channels=config_int(hf, "in_channels", 4),
              out_channels=config_int(hf, "out_channels", 4),
              block_out_channels=config_list(hf, "block_out_channels", (320, 640, 1280, 1280),
                                             of=int),
              down_block_types=config_list(hf, "down_block_types", (), of=str),
              up_block_types=config_list(hf, "up_block_types", (), of=str),
              layers_per_block=config_int(hf, "layers_per_block", 2),
              norm_num_groups=config_int(hf, "norm_num_groups", 32),
              norm_eps=config_float(hf, "norm_eps", 1e-5),
              cross_attention_dim=config_int(hf, "cross_attention_dim", 1024),
              head_dim=head, transformer_in_heads=8)   # diffusers hard-codes 8
