"""What the user-facing entry points share: quiet logs, checked flags, one-line errors.

Every user error (bad image, unknown concept, bad name, unusable model, ...)
is an exception class listed in ``user_errors()``; ``run`` turns it into one
line ``error: ...`` on stderr and exit status 2, never a traceback. Every
numeric flag is parsed by a ``Range`` (``int_range`` / ``float_range``): a
value outside it is a usage error (one line, status 2) while the flags are
parsed, before anything heavy is imported, and ``--help`` shows the range.

Only the launchers know where the repository's ``configs/`` folder lies: this
module puts it on ``config_lib``'s search path, so ``--config tiny`` works.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pathlib
import sys
from typing import Callable

from persvid_jax import config_lib

# Bare names (--config tiny) are looked up here; config_lib itself knows no folder.
CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
config_lib.set_search_path(CONFIGS_DIR)
try:
  from absl import logging as absl_logging
except ImportError:     # absl comes with jax and orbax; without them nothing logs through it
  absl_logging = None


class ArgumentParser(argparse.ArgumentParser):
  """``argparse.ArgumentParser`` whose usage errors follow the house rule.

  argparse prints its usage block (several lines) before the error; here a
  wrong or missing flag is one line, ``error: ... (see PROG --help)``, and
  exit status 2, like every other bad input. Subcommand parsers inherit it.
  """

  def error(self, message):
    self.exit(2, f"error: {message} (see {self.prog} --help)\n")

  def add_argument(self, *args, **kwargs):
    """``argparse``'s, plus the allowed range in the help of a ``Range``-typed flag."""
    kind = kwargs.get("type")
    if isinstance(kind, Range) and kwargs.get("help") != argparse.SUPPRESS:
      help_text = kwargs.get("help")
      kwargs["help"] = f"{help_text} [{kind.describe()}]" if help_text else f"[{kind.describe()}]"
    return super().add_argument(*args, **kwargs)


class Range:
  """An argparse ``type=``: a number (``int`` or finite ``float``) within bounds.

  A value outside is refused while the flags are parsed: argparse's one line
  ``error: argument --steps: 0 must be an integer >= 1 (see ... --help)`` and
  exit status 2, before any model is loaded or program compiled.

  Args:
    kind: ``int`` or ``float``.
    lo, hi: the bounds (None: unbounded on that side).
    lo_open: ``lo`` itself is refused (sizes in MB, TFLOP/s: > 0).
  """

  def __init__(self, kind: type, lo: float | None = None, hi: float | None = None, *,
               lo_open: bool = False):
    self.kind, self.lo, self.hi, self.lo_open = kind, lo, hi, lo_open
    self.__name__ = kind.__name__     # what argparse names in its own messages

  def describe(self) -> str:
    """The range in words, e.g. ``an integer >= 1``, ``a number in [0, 1]``."""
    noun = "an integer" if self.kind is int else "a finite number"
    if self.lo is not None and self.hi is not None and not self.lo_open:
      return f"{noun} in [{self.lo}, {self.hi}]"
    parts = []
    if self.lo is not None:
      parts.append(f"{'>' if self.lo_open else '>='} {self.lo}")
    if self.hi is not None:
      parts.append(f"<= {self.hi}")
    return f"{noun} {' and '.join(parts)}".rstrip()

  def __call__(self, text: str):
    try:
      value = self.kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}") from None
    bad = (self.kind is float and not math.isfinite(value)
           or self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
           or self.hi is not None and value > self.hi)
    if bad:
      raise argparse.ArgumentTypeError(f"{text} must be {self.describe()}")
    return value


def int_range(lo: int | None = None, hi: int | None = None) -> Range:
  """An argparse type: an integer in ``[lo, hi]`` (None: unbounded)."""
  return Range(int, lo, hi)


def float_range(lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False) -> Range:
  """An argparse type: a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
  return Range(float, lo, hi, lo_open=lo_open)


# The ranges several launchers share.
SEED = int_range(0, config_lib.SEED_MAX)
PORT = int_range(1, 65535)


def _quiet_environment() -> None:
  """Libraries that read their log level from the environment at import: set first."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


# At import, so that a launcher's own imports below ``from launch import _common``
# (which sorts before ``persvid_jax``) are quiet already.
_quiet_environment()


def quiet() -> None:
  """Only warnings from libraries (absl/orbax/jax INFO lines would drown the output)."""
  _quiet_environment()
  logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
  if absl_logging is not None:
    absl_logging.set_verbosity(absl_logging.ERROR)


def user_errors() -> tuple[type[BaseException], ...]:
  """The exception classes whose message is meant for the user."""
  # Deferred: these modules import jax (~2 s); --help and bad flags answer first.
  from persvid_jax.concepts.database import DatabaseError
  from persvid_jax.concepts.images import ImageError
  from persvid_jax.evaluate.dreambench import DreamBenchError
  from persvid_jax.convert import ConvertError
  from persvid_jax.evaluate.probe import ProbeError
  from persvid_jax.pipeline.generate import GenerationError
  from persvid_jax.pipeline.model import ModelError
  return (config_lib.ConfigError, DatabaseError, ImageError, GenerationError, ModelError,
          DreamBenchError, ProbeError, ConvertError)


def out_dir_problem(out: pathlib.Path, flag: str = "--out") -> str | None:
  """Why ``out``'s directory cannot take the output file, or None if it can.

  Checked before any model is loaded or sampled, not after minutes of work.
  """
  out = pathlib.Path(out)
  if out.is_dir():
    # Writing would fail only at the final rename, after all the work.
    return f"{flag} {out} already exists and is a directory; give another path"
  parent = out.parent
  if not parent.is_dir():
    existing = config_lib.nearest_existing(parent)
    if existing.exists() and not existing.is_dir():
      return f"{flag} {out}: {existing} is a file, not a directory"
    return f"{flag} {out}: directory {parent} does not exist; create it first"
  if not os.access(parent, os.W_OK | os.X_OK):
    return f"{flag} {out}: directory {parent} is not writable"
  return None


def dir_problem(directory: pathlib.Path, flag: str = "--out") -> str | None:
  """Why ``directory`` cannot be created (with its parents) or written into, or None.

  For flags naming an output directory; checked before any model is loaded
  (``config_lib.workdir_problem``, which the trainer and sweeps use too).
  """
  return config_lib.workdir_problem(directory, flag)


def parse_args(parser, argv) -> tuple:
  """``(args, overrides)``: the parser's flags, plus each ``--config.KEY=VALUE`` as
  ``KEY=VALUE`` (for ``config_lib.apply_overrides``); anything else is a usage error."""
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  overrides = []
  for i, item in enumerate(rest):
    previous = rest[i - 1] if i else ""
    if not item.startswith("--config."):
      if previous.startswith("--config.") and "=" not in previous:
        # ``--config.KEY VALUE``: argparse split what is meant as one override.
        parser.error(f"{previous} {item}: use {previous}={item} (--config.KEY=VALUE, "
                     "one argument)")
      parser.error(f"unrecognised argument {item!r}")
    if "=" not in item and (i + 1 == len(rest) or rest[i + 1].startswith("--")):
      parser.error(f"{item} has no value: use {item}=VALUE")
    overrides.append(item[len("--config."):])
  return args, overrides


def fail(message: str) -> int:
  """Prints ``error: message`` to stderr and returns exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  return 2


def run(main: Callable[[], int]) -> int:
  """Calls ``main``; user errors -> one stderr line + exit status 2."""
  quiet()
  errors = user_errors()
  try:
    return main()
  except errors as e:
    return fail(str(e))
  except KeyboardInterrupt:
    return fail("interrupted (the database, if any, is unchanged or fully updated)")


def compilation_cache() -> None:
  """A persistent XLA compilation cache, so a second run skips compilation.

  ``$JAX_COMPILATION_CACHE_DIR`` wins if set; else ``$PERSVID_JAX_CACHE``
  or ``~/.cache/persvid_jax/xla``. Entries are keyed on the program and the
  jax version, so a stale entry is never used; XLA's kernel and autotuning
  caches live there too (``xla_options.enable_cache``).
  """
  # Deferred: a launcher may set JAX_PLATFORMS / XLA flags first (bench --aot).
  import jax
  from persvid_jax import xla_options
  if jax.config.jax_compilation_cache_dir:
    return
  default = os.path.join(os.path.expanduser("~"), ".cache", "persvid_jax", "xla")
  xla_options.enable_cache(os.environ.get("PERSVID_JAX_CACHE", default))
