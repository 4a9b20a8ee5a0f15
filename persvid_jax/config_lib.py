"""Config files and their variants.

A config is a Python file ``configs/NAME.py`` with ``get_config(arg=None)``
returning an ``ml_collections.ConfigDict`` (the big_vision convention). The
string after a colon selects a variant and is handed to ``get_config`` as is;
``parse_arg`` turns it into a ``ConfigDict`` of options::

    configs/tiny.py                     -> get_config(None)
    configs/tiny.py:sr                  -> get_config("sr")
    configs/modelscope.py:bf16,detail=0 -> get_config("bf16,detail=0")

``load_config`` also accepts a bare name (``tiny``) that is looked up in the
repository's ``configs/`` folder.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
from typing import Any

import ml_collections

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
  """A config path, variant or override that cannot be used (a user error)."""


def _literal(value: str) -> Any:
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a,b=2,c=x"`` into ``{a: True, b: 2, c: 'x'}`` over ``defaults``.

  Bare words become ``True``; values are Python literals where they parse.
  Keys absent from ``defaults`` are refused, so that a typo in a variant is
  an error and not a silently ignored option.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in out:
      raise ConfigError(
          f"unknown config option {key!r}; known options: {sorted(out.keys())}")
    new = _literal(value.strip()) if sep else True
    default = out[key]
    if isinstance(default, bool) and not isinstance(new, bool):
      new = bool(new)
    elif isinstance(default, int) and not isinstance(default, bool) and isinstance(new, float):
      raise ConfigError(f"config option {key!r} takes an integer, got {value!r}")
    out[key] = new
  return out


def resolve_path(spec: str) -> tuple[pathlib.Path, str | None]:
  """Splits ``path[:variant]`` and finds the file (bare names -> configs/)."""
  path_str, _, variant = spec.partition(":")
  path = pathlib.Path(path_str)
  if not path.suffix:
    path = CONFIGS_DIR / f"{path_str}.py"
  if not path.is_file():
    known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if p.stem != "__init__")
    raise ConfigError(f"config file {str(path)!r} not found; known configs: {known}")
  return path, (variant or None)


def import_config_module(spec: str):
  """Imports a config file as a module (configs build on each other this way)."""
  path, _ = resolve_path(spec)
  module_name = f"_persvid_config_{path.stem}_{abs(hash(os.fspath(path)))}"
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``configs/NAME.py[:variant]`` and returns its ``ConfigDict``."""
  path, variant = resolve_path(spec)
  module = import_config_module(os.fspath(path))
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg) function")
  config = module.get_config(variant)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict")
  return config


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: list[str]) -> ml_collections.ConfigDict:
  """Applies ``dotted.key=value`` strings (command-line ``--set``) to a copy."""
  config = ml_collections.ConfigDict(config.to_dict())
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} must look like key.sub=value")
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise ConfigError(f"override {item!r}: no config field {key!r}")
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"override {item!r}: no config field {key!r}")
    try:
      node[leaf] = _literal(value)
    except (TypeError, ValueError) as e:
      # ConfigDict is typed: a float field refuses 'x' with a TypeError.
      raise ConfigError(f"override {item!r}: {e}") from None
  return config
