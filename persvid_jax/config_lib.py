"""Config files and their variants.

A config is a Python file ``configs/NAME.py`` with ``get_config(arg=None)``
returning an ``ml_collections.ConfigDict`` (the big_vision convention). The
string after a colon selects a variant and is handed to ``get_config`` as is;
``parse_arg`` turns it into a ``ConfigDict`` of options::

    configs/tiny.py                     -> get_config(None)
    configs/tiny.py:sr                  -> get_config("sr")
    configs/modelscope.py:bf16,detail=0 -> get_config("bf16,detail=0")

``load_config`` also accepts a bare name (``tiny``), looked up in the folders
of the search path (``set_search_path``). The library knows no folder of its
own: ``launch/_common.py`` puts the repository's ``configs/`` there, and a
config builds on its siblings relative to its own file (``import_sibling``).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re
from typing import Any

import ml_collections

# Folders where a bare config name is looked up, first match first; empty until
# a program (launch/_common.py, tests/conftest.py) names its configs folder.
_search_path: list[pathlib.Path] = []
SEED_MAX = 2**32 - 1      # jax.random.key takes a uint32 seed


class ConfigError(ValueError):
  """A config path, variant or override that cannot be used (a user error)."""


def _literal(value: str) -> Any:
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def _parse_bool(key: str, value: str) -> bool:
  # bool("false") is True: the words are read, never Python's truthiness.
  word = value.strip().strip("'\"").lower()
  if word in _TRUE:
    return True
  if word in _FALSE:
    return False
  raise ConfigError(f"config option {key!r} is true or false, got {value!r}; "
                    f"write {key}=true|false|yes|no|1|0 (or {key} alone for true)")


def _typed(key: str, value: str, default: Any) -> Any:
  """``value`` (as written) read as the type of ``default``; ConfigError if it is not."""
  if isinstance(default, bool):
    return _parse_bool(key, value)
  new = _literal(value)
  if isinstance(default, int):
    if isinstance(new, int):   # bools too: detail=True is detail=1
      return int(new)
    raise ConfigError(f"config option {key!r} takes an integer, got {value!r}")
  if isinstance(default, float):
    if isinstance(new, (int, float)) and not isinstance(new, bool):
      return float(new)
    raise ConfigError(f"config option {key!r} takes a number, got {value!r}")
  if isinstance(default, str):
    # The text itself: stage=1 is the word '1', for the config to refuse by name.
    return new if isinstance(new, str) else value
  return new


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``"a,b=2,c=x"`` into ``{a: True, b: 2, c: 'x'}`` over ``defaults``.

  Bare words become ``True``; a value is read as its default's type
  (booleans: true/false/yes/no/1/0, any case; integers; numbers; strings as
  written) and ``ConfigError`` names the option when it does not parse.
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
    default = out[key]
    if not sep:
      if not isinstance(default, (bool, int)) and default is not None:
        raise ConfigError(f"config option {key!r} needs a value: {key}=...")
      new = True if isinstance(default, bool) or default is None else 1   # detail -> detail=1
    else:
      new = _typed(key, value.strip(), default)
    try:
      out[key] = new
    except (TypeError, ValueError) as e:   # a typed field of another kind (None defaults)
      raise ConfigError(f"config option {key!r}: {e}") from None
  return out


def positive_int_options(arg: ml_collections.ConfigDict, *keys: str) -> None:
  """Raises ``ConfigError`` unless each variant option ``keys`` of ``arg`` is >= 1.

  For sizes such as ``sr_kernel`` that the model would refuse later, with a
  traceback, after the config was accepted.
  """
  for key in keys:
    if arg[key] < 1:
      raise ConfigError(f"config option {key}={arg[key]} must be >= 1")


def choice_option(arg: ml_collections.ConfigDict, key: str, choices: tuple) -> None:
  """Raises ``ConfigError`` unless variant option ``key`` of ``arg`` is one of ``choices``."""
  if arg[key] not in choices:
    raise ConfigError(f"config option {key}={arg[key]!r}; use one of {', '.join(choices)}")


def set_search_path(*dirs: str | os.PathLike) -> None:
  """Makes ``dirs`` the folders where bare config names (``tiny``) are looked up.

  The first folder holding ``NAME.py`` wins. Replaces the previous search path;
  no arguments: bare names are refused and configs are given by path.
  """
  _search_path[:] = [pathlib.Path(d) for d in dirs]


def _named(name: str) -> pathlib.Path | None:
  """``NAME.py`` in the first folder of the search path that has it, else None."""
  for folder in _search_path:
    if (folder / f"{name}.py").is_file():
      return folder / f"{name}.py"
  return None


def known_configs() -> list[str]:
  """The names of the configs (files with a ``get_config``) in the search path's folders.

  A file without one is a schema its siblings import (``configs/common.py``).
  """
  return sorted({p.stem for folder in _search_path for p in folder.glob("*.py")
                 if re.search(r"^def get_config\(", p.read_text(errors="replace"), re.M)})


def resolve_path(spec: str) -> tuple[pathlib.Path, str | None]:
  """Splits ``path[:variant]`` and finds the file (bare names: the search path).

  Raises ``ConfigError`` saying what is wrong: no such file (with the path or
  name that was probably meant), a directory, or a file that is no ``.py``.
  """
  path_str, _, variant = spec.partition(":")
  path = pathlib.Path(path_str)
  known = known_configs()
  if not path_str.strip():
    raise ConfigError(f"--config is empty; give configs/NAME.py or a name from {known}")
  if not path.suffix and len(path.parts) == 1:
    named = _named(path_str)
    if named is not None:
      return named, (variant or None)
    if not path.exists():
      if not _search_path:
        raise ConfigError(f"no config named {path_str!r}: no configs folder is set to look "
                          f"names up in; give the config's path (configs/{path_str}.py)")
      raise ConfigError(f"no config named {path_str!r}; known configs: {known}")
  if path.is_dir():
    raise ConfigError(f"config {path_str!r} is a directory, not a config file; give "
                      f"configs/NAME.py or a name from {known}")
  if path.is_file():
    if path.suffix != ".py":
      raise ConfigError(f"config {path_str!r} is not a .py config file (a Python file with "
                        f"get_config); known configs: {known}")
    return path, (variant or None)
  hint = ""
  if path.with_suffix(".py").is_file() and path.suffix != ".py":
    hint = f"; did you mean {str(path.with_suffix('.py'))!r}"
  elif path.stem in known:
    hint = f"; did you mean {os.path.relpath(_named(path.stem))!r}"
  if hint and path.stem in known:
    hint += f" or the name {path.stem!r}"
  raise ConfigError(f"config file {path_str!r} not found"
                    + (f"{hint}?" if hint else f"; known configs: {known}"))


def _one_line(e: BaseException, limit: int = 300) -> str:
  text = " ".join(f"{type(e).__name__}: {e}".split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def import_config_module(spec: str):
  """Imports the config file ``spec`` (a path or a bare name) as a new module."""
  path, _ = resolve_path(spec)
  module_name = f"_persvid_config_{path.stem}_{abs(hash(os.fspath(path)))}"
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except ConfigError:
    raise
  except Exception as e:
    # A config file is user input: a syntax error in it is one line, not a traceback.
    raise ConfigError(f"config file {str(path)!r} failed to load: {_one_line(e)}") from e
  return module


def import_sibling(config_file: str | os.PathLike, name: str):
  """Imports config ``name`` from the folder of ``config_file`` (a config's ``__file__``).

  How configs build on each other (``common = config_lib.import_sibling(__file__,
  "common")``): relative to their own file, so a configs folder works wherever
  it lies, on the search path or not.
  """
  return import_config_module(os.fspath(pathlib.Path(config_file).resolve().with_name(
      f"{name}.py")))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``configs/NAME.py[:variant]`` and returns its ``ConfigDict``."""
  path, variant = resolve_path(spec)
  module = import_config_module(os.fspath(path))
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} has no get_config(arg) function")
  try:
    config = module.get_config(variant)
  except ConfigError:
    raise
  except Exception as e:
    raise ConfigError(f"{path}: get_config({variant!r}) failed: {_one_line(e)}") from e
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
    for depth, p in enumerate(parents):
      if p not in node:
        raise ConfigError(f"override {item!r}: no config field {key!r}")
      node = node[p]
      if not isinstance(node, ml_collections.ConfigDict):
        # A key below a plain value (total_steps.x): 'in' on an int is a TypeError.
        raise ConfigError(f"override {item!r}: config field "
                          f"{'.'.join(parents[:depth + 1])!r} is a value "
                          f"({type(node).__name__}), not a group of fields; drop "
                          f"{'.' + '.'.join(parents[depth + 1:] + [leaf])!r}")
    if leaf not in node:
      raise ConfigError(f"override {item!r}: no config field {key!r}")
    try:
      node[leaf] = _literal(value)
    except (TypeError, ValueError) as e:
      # ConfigDict is typed: a float field refuses 'x' with a TypeError.
      raise ConfigError(f"override {item!r}: {e}") from None
  return config


# ---- Checks before a run -------------------------------------------------------------
# Bad values are refused before the model is built, the workdir touched or the
# run recorded: a stage that fails after minutes of compiling, or one that
# "trains" 0 steps and exits 0, must not be what tells the user.

# The training stages (persvid_jax.train.stages.STAGES is this tuple); defined
# here so that configs are checked without importing jax.
TRAIN_STAGES = ("base", "sr", "personalize")
# persvid_jax.pipeline.model.WEIGHTS_FILE: what an exported model directory holds.
_MODEL_WEIGHTS = "model.safetensors"
# config.attention_impl (persvid_jax.models.attention.IMPLEMENTATIONS is this tuple).
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# config.norm_impl (persvid_jax.models.attention.GROUP_NORM_IMPLS is this tuple).
NORM_IMPLS = ("auto", "xla", "pallas")


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _train_problems(tc) -> list[str]:
  """What is wrong with the numbers of ``config.train`` (fields it lacks are skipped)."""
  problems = []

  def check(key, ok, want, optional=False):
    if key not in tc or (optional and tc[key] is None):
      return
    value = tc[key]
    if not _number(value) or value != value or not ok(value):   # value != value: NaN
      problems.append(f"config.train.{key}={value!r} must be {want}")

  is_int = lambda v: float(v).is_integer()
  finite = lambda v: abs(v) != float("inf")
  check("batch_size", lambda v: is_int(v) and v >= 1, "an integer >= 1")
  check("total_steps", lambda v: is_int(v) and v >= 1, "an integer >= 1")
  check("schedule_steps", lambda v: is_int(v) and v >= 1, "None or an integer >= 1",
        optional=True)
  check("warmup_steps", lambda v: is_int(v) and v >= 0, "an integer >= 0")
  for key in ("log_every_steps", "checkpoint_every_steps"):
    check(key, lambda v: is_int(v) and v >= 1, "an integer >= 1")
  check("keep_checkpoints", lambda v: is_int(v) and v >= 1, "None or an integer >= 1",
        optional=True)
  check("sample_every_steps", lambda v: is_int(v) and v >= 0, "an integer >= 0 (0: no previews)")
  check("preview_examples", lambda v: is_int(v) and v >= 1, "an integer >= 1")
  check("max_nonfinite_skips", lambda v: is_int(v) and v >= 0, "an integer >= 0")
  check("sr_crop", lambda v: is_int(v) and v >= 1, "None or an integer >= 1", optional=True)
  for key in ("learning_rate", "weight_decay", "subject_loss_weight"):
    check(key, lambda v: finite(v) and v >= 0, "a finite number >= 0")
  check("grad_clip_norm", lambda v: finite(v) and v >= 0, "None, 0 (off) or a finite number > 0",
        optional=True)
  for key in ("lr_min_ratio", "ema_decay", "p_drop_text", "p_drop_ref", "p_drop_detail",
              "p_plain_caption"):
    check(key, lambda v: 0 <= v <= 1, "in [0, 1]")
  for key in ("adam_b1", "adam_b2"):
    check(key, lambda v: 0 <= v < 1, "in [0, 1)")
  return problems


def check_train_config(config: ml_collections.ConfigDict, *, paths: bool = True) -> None:
  """Raises ``ConfigError`` (one line: the field, the value, what it must be) if
  ``config`` cannot train: an unknown ``config.train.stage``, a non-positive
  batch size, step count or cadence, an out-of-range optimizer number.

  With ``paths`` it also checks what must exist on this machine:
  ``config.train.init_from`` (a training workdir or an exported model) and a
  folder data source's ``config.data.folder``. Cheap (no jax, no model): the
  trainer calls it before it records the run or creates its workdir.
  """
  if "train" not in config or not isinstance(config.train, ml_collections.ConfigDict):
    raise ConfigError("the config has no train section (config.train); is it a model config "
                      "such as configs/tiny.py?")
  tc = config.train
  if tc.get("stage") not in TRAIN_STAGES:
    raise ConfigError(f"config.train.stage={tc.get('stage')!r}; use one of {TRAIN_STAGES}")
  for key, choices in (("attention_impl", ATTENTION_IMPLS), ("norm_impl", NORM_IMPLS)):
    if config.get(key) not in choices + (None,):
      raise ConfigError(f"config.{key}={config.get(key)!r}; use one of {', '.join(choices)}")
  problems = _train_problems(tc)
  if problems:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise ConfigError(f"{problems[0]}{more}")
  if not paths:
    return
  init_from = tc.get("init_from")
  if init_from:
    src = pathlib.Path(init_from).expanduser()
    if not src.exists():
      raise ConfigError(f"config.train.init_from={init_from!r} does not exist; give a training "
                        f"workdir or an exported model directory")
    if not (src / "checkpoints").is_dir() and not (src / _MODEL_WEIGHTS).is_file():
      raise ConfigError(f"config.train.init_from={init_from!r} is no training workdir (no "
                        f"checkpoints/) and no exported model (no {_MODEL_WEIGHTS})")
  data = config.get("data")
  if data is not None and data.get("source") == "folder":
    folder = data.get("folder")
    if not folder:
      raise ConfigError("config.data.source is 'folder' but config.data.folder is unset; "
                        "pass --config.data.folder=/path/to/corpus")
    if not pathlib.Path(folder).expanduser().is_dir():
      raise ConfigError(f"config.data.folder={folder!r} does not exist or is not a directory; "
                        f"set it to a folder of videos/images with their captions")


def nearest_existing(path: str | os.PathLike) -> pathlib.Path:
  """``path`` or its closest ancestor that exists (``.`` ends a relative path)."""
  path = pathlib.Path(path)
  while not path.exists() and path.parent != path:
    path = path.parent
  return path


def workdir_problem(workdir, flag: str = "--workdir") -> str | None:
  """Why the directory ``workdir`` cannot be created or written, or None if it can.

  A run writes its record and checkpoints there (and a CLI its outputs): a
  path that is a file, lies under a file or is read-only is reported before
  anything is built. ``launch._common.dir_problem`` is this for the CLIs.
  """
  path = pathlib.Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    return f"{flag} {workdir} is a file; give a directory"
  existing = nearest_existing(path)
  if not existing.is_dir():
    return f"{flag} {workdir} cannot be created: {existing} is a file, not a directory"
  if not os.access(existing, os.W_OK | os.X_OK):
    return f"{flag} {workdir}: directory {existing} is not writable; give a writable directory"
  return None
