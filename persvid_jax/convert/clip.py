"""``transformers`` CLIP checkpoints -> our ``text_encoder`` / ``image_encoder``.

Accepts the state dict of ``CLIPModel``, ``CLIPTextModel``(``WithProjection``)
or ``CLIPVisionModel``(``WithProjection``) -- the layouts differ only in which
of ``text_model.*``, ``vision_model.*``, ``visual_projection``,
``text_projection`` and ``logit_scale`` are present. Our modules use the same
names (``models/clip.py``), so the table is: strip the tower prefix,
``encoder.layers.N`` -> ``encoder/layers_N``, dots -> slashes, ``weight`` ->
``scale`` (LayerNorm), ``kernel`` (dense ``[out, in]`` -> ``[in, out]``; the
patch conv ``[D, 3, p, p]`` -> ``[p, p, 3, D]``) or ``embedding`` (token table).

Not taken: ``text_projection`` and ``logit_scale`` (the generator is
conditioned on the text *states*, as ModelScope and Stable Diffusion are) and
the ``position_ids`` buffers older checkpoints carry.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from persvid_jax.convert.common import (ConvertError, assemble, config_float, config_int,
                                        config_str, float_array, torch_layout)

IGNORED = re.compile(r"^(logit_scale|text_projection\.weight|"
                     r"(text|vision)_model\.embeddings\.position_ids)$")


def _our_path(name: str, tower: str) -> str:
  """A tower-relative transformers name -> our parameter path (leaf still ``weight``)."""
  fixed = {
      "embeddings.token_embedding.weight": "token_embedding/embedding",
      "embeddings.class_embedding": "embeddings/class_embedding",
  }
  if name in fixed:
    return fixed[name]
  if name == "embeddings.position_embedding.weight":
    # A plain param in both towers: at the top of the text encoder, inside
    # ``embeddings`` in the image encoder.
    return "position_embedding" if tower == "text" else "embeddings/position_embedding"
  name = re.sub(r"^encoder\.layers\.(\d+)\.", r"encoder/layers_\1/", name)
  return name.replace(".", "/")


# A key only this tower has: how an unprefixed single-tower checkpoint is recognised.
_MARKER = {"text": "embeddings.token_embedding.weight",
           "vision": "embeddings.class_embedding"}


def _tower(state: Mapping[str, np.ndarray], tower: str, source: str):
  prefix = f"{tower}_model."
  # transformers >= 5 saves CLIPTextModel / CLIPVisionModel without the tower
  # prefix; CLIPModel and checkpoints saved by 4.x have it.
  if not any(k.startswith(prefix) for k in state) and _MARKER[tower] in state:
    prefix = ""
  flat, sources = {}, {}
  for name, array in state.items():
    if IGNORED.match(name) or name == "embeddings.position_ids":
      continue
    if name == "visual_projection.weight" and tower == "vision":
      rel = name
    elif name.endswith("projection.weight"):
      continue
    elif name.startswith(prefix):
      rel = name[len(prefix):]
    else:
      continue
    path = _our_path(rel, tower)
    array = float_array(name, array)
    if path.endswith("/weight"):
      path, array = torch_layout(path, array)
    flat[path], sources[path] = array, name
  if not flat:
    raise ConvertError(f"{source} has no {prefix}* tensors: not a CLIP "
                       f"{'text' if tower == 'text' else 'vision'} checkpoint")
  return flat, sources


def text_encoder_params(state: Mapping[str, np.ndarray], abstract_params, *,
                        source: str = "checkpoint") -> dict:
  """Our ``text_encoder`` params from a CLIP state dict (checked against ``abstract_params``).

  The token table may have more rows than the checkpoint's vocabulary: the
  concept placeholders appended by ``load_clip_tokenizer``. Those rows start as
  the mean of the checkpoint's embeddings (the usual textual-inversion start;
  a swapped concept replaces them anyway).
  """
  flat, sources = _tower(state, "text", source)
  table = flat.get("token_embedding/embedding")
  want = abstract_params.get("token_embedding", {}).get("embedding")
  if table is not None and want is not None:
    rows = int(np.shape(want)[0])
    if rows > table.shape[0] and table.shape[1] == np.shape(want)[1]:
      extra = np.repeat(table.mean(axis=0, keepdims=True), rows - table.shape[0], axis=0)
      flat["token_embedding/embedding"] = np.concatenate([table, extra], axis=0)
  return assemble(flat, abstract_params, network="text_encoder", source=source,
                  sources=sources)


def image_encoder_params(state: Mapping[str, np.ndarray], abstract_params, *,
                         source: str = "checkpoint") -> dict:
  """Our ``image_encoder`` params from a CLIP state dict (checked against ``abstract_params``).

  A config without ``projection_dim`` (features used before the projection)
  does not take the checkpoint's ``visual_projection``.
  """
  flat, sources = _tower(state, "vision", source)
  if "visual_projection" not in abstract_params:
    flat.pop("visual_projection/kernel", None)
  return assemble(flat, abstract_params, network="image_encoder", source=source,
                  sources=sources)


def _sub(hf: dict, key: str, model_type: str) -> tuple[dict, str]:
  """``(tower config, its name in messages)``: ``hf[key]`` or ``hf`` itself."""
  if key in hf:                               # CLIPModel: nested configs
    if not isinstance(hf[key], dict):
      raise ConvertError(f"config.json: {key} is not an object of architecture fields; fix "
                         "the source's config.json")
    return hf[key], key
  if hf.get("model_type") == model_type:      # a single tower's config
    return hf, ""
  raise ConvertError(f"config.json has no {key} and is not a {model_type} config "
                     f"(model_type {hf.get('model_type')!r})")


def text_config(hf: dict, num_placeholders: int = 0) -> dict:
  """``config.text`` fields from a transformers CLIP(Text) ``config.json``.

  ``vocab_size`` includes ``num_placeholders`` concept tokens on top.

  Raises:
    ConvertError: no text config, or a field of the wrong type (named).
  """
  t, where = _sub(hf, "text_config", "clip_text_model")
  num = lambda key, default: config_int(t, key, default, section=where)
  return dict(vocab_size=num("vocab_size", 49408) + num_placeholders,
              max_length=num("max_position_embeddings", 77),
              width=num("hidden_size", 512), layers=num("num_hidden_layers", 12),
              heads=num("num_attention_heads", 8),
              mlp_dim=num("intermediate_size", 2048),
              act=config_str(t, "hidden_act", "quick_gelu", section=where),
              layer_norm_eps=config_float(t, "layer_norm_eps", 1e-5, section=where))


def image_config(hf: dict, projection: bool = True) -> dict:
  """``config.image`` fields from a transformers CLIP(Vision) ``config.json``.

  Raises:
    ConvertError: no vision config, or a field of the wrong type (named).
  """
  v, where = _sub(hf, "vision_config", "clip_vision_model")
  num = lambda key, default: config_int(v, key, default, section=where)
  proj = 0
  if projection:    # CLIPModel keeps it at the top, a vision tower's config in itself
    proj = config_int(hf, "projection_dim", config_int(v, "projection_dim", 0, minimum=0,
                                                       section=where), minimum=0)
  return dict(image_size=num("image_size", 224), patch_size=num("patch_size", 32),
              width=num("hidden_size", 768), layers=num("num_hidden_layers", 12),
              heads=num("num_attention_heads", 12),
              mlp_dim=num("intermediate_size", 3072),
              act=config_str(v, "hidden_act", "quick_gelu", section=where),
              layer_norm_eps=config_float(v, "layer_norm_eps", 1e-5, section=where),
              projection_dim=proj)
