"""Reading safetensors without a framework, and the strict assembly of params."""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Iterable, Mapping

import numpy as np

from persvid_jax import params as params_lib

# safetensors dtype codes -> numpy (bf16 through ml_dtypes, which jax ships).
_FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
_OTHER_DTYPES = {"I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                 "U8": np.uint8, "BOOL": np.bool_}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ConvertError(ValueError):
  """A source checkpoint that cannot become our params (the message names the tensors)."""


def _numpy_dtype(code: str, name: str, path: pathlib.Path):
  if code == "BF16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  if code in _FLOAT_DTYPES:
    return _FLOAT_DTYPES[code]
  if code in _OTHER_DTYPES:
    return _OTHER_DTYPES[code]
  raise ConvertError(f"{path}: tensor {name!r} has dtype {code}, which we do not read")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """``{name: array}`` of one ``.safetensors`` file, memory-mapped (read-only).

  The format is parsed here (8-byte header length, JSON header, raw buffer) so
  that bf16 tensors load without torch and nothing is copied until used.

  Raises:
    ConvertError: not a safetensors file (bad header, offsets out of range).
  """
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ConvertError(f"{path} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    if n <= 0 or 8 + n > size:
      raise ConvertError(f"{path} is not a safetensors file (bad header length)")
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError):
      raise ConvertError(f"{path} is not a safetensors file (header is not JSON)") from None
  if not isinstance(header, dict):
    raise ConvertError(f"{path} is not a safetensors file (header is not a table)")
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else None
  out = {}
  for name, info in header.items():
    try:
      dtype = _numpy_dtype(info["dtype"], name, path)
      shape = tuple(int(d) for d in info["shape"])
      start, stop = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise ConvertError(f"{path}: malformed header entry for tensor {name!r}") from None
    count = int(np.prod(shape, dtype=np.int64))
    if stop - start != count * np.dtype(dtype).itemsize or data is None or stop > data.size:
      raise ConvertError(f"{path}: tensor {name!r} has data offsets that do not match its "
                         f"shape {shape} (truncated or corrupt file)")
    out[name] = data[start:stop].view(dtype).reshape(shape)
  return out


def find_weights(src: str | os.PathLike, names: Iterable[str] = ()) -> list[pathlib.Path]:
  """The safetensors file(s) of ``src`` (a file, or a directory in HF/diffusers layout).

  Looks for ``names`` first, then any ``*.safetensors`` (a sharded checkpoint's
  ``*.safetensors.index.json`` lists its shards). Pickle checkpoints are refused.
  """
  src = pathlib.Path(src)
  if not src.exists():
    raise ConvertError(f"{src} does not exist")
  if src.is_file():
    if src.suffix in _PICKLE_SUFFIXES:
      raise ConvertError(f"{src} is a pickle checkpoint; we read safetensors only (pickle "
                         f"can run code): save it with safetensors first")
    return [src]
  for name in names:
    if (src / name).is_file():
      return [src / name]
  index = sorted(src.glob("*.safetensors.index.json"))
  if index:
    try:
      shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
    except (KeyError, ValueError):
      raise ConvertError(f"{index[0]} is not a safetensors index (no weight_map)") from None
    missing = [s for s in shards if not (src / s).is_file()]
    if missing:
      raise ConvertError(f"{index[0]} lists shards that are missing: {missing}")
    return [src / s for s in shards]
  found = sorted(src.glob("*.safetensors"))
  if len(found) == 1:
    return found
  if len(found) > 1:
    raise ConvertError(f"{src} holds several .safetensors files ({[f.name for f in found]}) "
                       f"and no index; pass the file itself")
  pickles = sorted(p.name for p in src.iterdir() if p.suffix in _PICKLE_SUFFIXES)
  if pickles:
    raise ConvertError(f"{src} holds only pickle checkpoints ({', '.join(pickles)}); we read "
                       f"safetensors only (pickle can run code): save it with safetensors")
  raise ConvertError(f"{src} holds no .safetensors file")


def read_state(src: str | os.PathLike, names: Iterable[str] = ()) -> dict[str, np.ndarray]:
  """All tensors of ``src``'s safetensors file(s) (see ``find_weights``)."""
  state: dict[str, np.ndarray] = {}
  for f in find_weights(src, names):
    state.update(read_safetensors(f))
  return state


def read_config(src: str | os.PathLike) -> dict:
  """``src/config.json`` (HF / diffusers) as a dict.

  Raises:
    ConvertError: no such file, not JSON, or JSON that is not an object.
  """
  path = pathlib.Path(src) / "config.json"
  if not path.is_file():
    raise ConvertError(f"{path} not found: a transformers/diffusers model directory has one")
  try:
    hf = json.loads(path.read_text())
  except ValueError as e:
    raise ConvertError(f"{path} is not JSON ({e})") from None
  require_object(hf, str(path))
  return hf


def require_object(hf, where: str = "config.json") -> None:
  """Raises ``ConvertError`` unless ``hf`` (a parsed ``config.json``) is a JSON object.

  ``read_config`` checks what it reads; the ``*_config`` readers check again
  for library callers that pass their own parsed JSON.
  """
  if not isinstance(hf, Mapping):
    raise ConvertError(f"{where} holds a JSON {type(hf).__name__}, not an object of "
                       "architecture fields; give the model's own config.json")


# Architecture fields of a source config.json. A missing field takes the
# library's default (as transformers / diffusers do: old files omit newer
# keys); a present one must have the right type, since null, "512" or 1.5
# would otherwise become a TypeError deep in the conversion, or a wrong shape.
# ``section`` names a nested config (CLIP's ``text_config``) in the message.

def _field(section: str, key: str, value) -> str:
  shown = json.dumps(value)
  return f"config.json: {section}{'.' if section else ''}{key}=" + (
      shown if len(shown) <= 60 else shown[:57] + "...")


def config_int(hf: Mapping, key: str, default: int, *, minimum: int = 1,
               section: str = "") -> int:
  """``hf[key]`` as an int >= ``minimum`` (``default`` if absent); else ``ConvertError``."""
  value = hf.get(key, default)
  # 512.0 is what some exporters write for 512; bool is an int in Python, refused.
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConvertError(f"{_field(section, key, value)}: it must be an integer >= {minimum}; "
                       "fix the source's config.json")
  return value


def config_float(hf: Mapping, key: str, default: float | None, *, optional: bool = False,
                 section: str = "") -> float | None:
  """``hf[key]`` as a finite float (``default`` if absent; null too if ``optional``)."""
  value = hf.get(key, default)
  if value is None and optional:
    return None
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not np.isfinite(value)):
    raise ConvertError(f"{_field(section, key, value)}: it must be a finite number; fix the "
                       "source's config.json")
  return float(value)


def config_bool(hf: Mapping, key: str, default: bool, *, section: str = "") -> bool:
  """``hf[key]`` as a bool (``default`` if absent); else ``ConvertError`` (not truthiness:
  ``"false"`` is truthy)."""
  value = hf.get(key, default)
  if not isinstance(value, bool):
    raise ConvertError(f"{_field(section, key, value)}: it must be true or false; fix the "
                       "source's config.json")
  return value


def config_str(hf: Mapping, key: str, default: str, *, section: str = "") -> str:
  """``hf[key]`` as a str (``default`` if absent); else ``ConvertError``."""
  value = hf.get(key, default)
  if not isinstance(value, str):
    raise ConvertError(f"{_field(section, key, value)}: it must be a string; fix the "
                       "source's config.json")
  return value


def config_list(hf: Mapping, key: str, default: tuple, *, of: type,
                section: str = "") -> tuple:
  """``hf[key]`` as a tuple of ``of`` (ints: each >= 1; ``default`` if absent)."""
  value = hf.get(key, default)
  if (isinstance(value, (list, tuple))
      and all(isinstance(v, of) and not isinstance(v, bool) for v in value)
      and (of is not int or all(v >= 1 for v in value))):
    return tuple(value)
  kind = "positive integers" if of is int else "strings"
  raise ConvertError(f"{_field(section, key, value)}: it must be a list of {kind}; fix the "
                     "source's config.json")


def float_array(name: str, array: np.ndarray) -> np.ndarray:
  """``array`` as float32; a non-float tensor where a weight belongs is an error."""
  if not (np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"):
    raise ConvertError(f"tensor {name!r} has dtype {array.dtype}; a weight must be a float "
                       f"(fp32, fp16 or bf16)")
  return np.asarray(array, np.float32)


def assemble(flat: Mapping[str, np.ndarray], abstract_params: Mapping, *, network: str,
             source: str, sources: Mapping[str, str] | None = None) -> dict:
  """Nested float32 params of ``network`` from ``{our/path: array}``, checked strictly.

  Args:
    flat: converted tensors keyed by our parameter path (``a/b/kernel``).
    abstract_params: ``eval_shape`` of our init's ``params`` for the network.
    network: for messages.
    source: where the tensors came from (messages).
    sources: optional ``{our/path: source tensor name}`` for messages.

  Raises:
    ConvertError: listing missing, unexpected and mis-shaped parameters.
  """
  expected = {k: tuple(v.shape) for k, v in params_lib.flatten(nn_unbox(abstract_params)).items()}
  problems = params_lib.mismatches(expected, {k: tuple(v.shape) for k, v in flat.items()},
                                   names=sources, limit=8)
  if problems:
    raise ConvertError(f"{source} does not convert to our {network} for this config "
                       f"({'; '.join(problems)})")
  return params_lib.unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})


def nn_unbox(tree):
  """Flax partitioning boxes -> plain values (abstract params come boxed)."""
  import flax.linen as nn
  return nn.meta.unbox(tree)


def torch_layout(name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """A torch ``weight`` -> our leaf: ``scale`` (rank 1), dense ``kernel`` ``[in, out]``,
  conv ``kernel`` ``[*taps, in, out]``; other leaves unchanged."""
  if not name.endswith("weight"):
    return name, array
  if array.ndim == 1:
    return name[:-len("weight")] + "scale", array
  array = array.T if array.ndim == 2 else array.transpose(tuple(range(2, array.ndim)) + (1, 0))
  return name[:-len("weight")] + "kernel", array
