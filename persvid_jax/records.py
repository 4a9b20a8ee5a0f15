"""Run records: what a run was, written into its workdir and compared on resume.

A record holds everything that decides a run's numbers besides the data on
disk: the resolved config, the git commit of the source tree the code was
imported from (and whether that tree had uncommitted changes, with a hash of
the diff so two dirty runs can be told apart), the versions of the packages
that compute (jax, jaxlib, flax, optax, orbax-checkpoint, chex,
transformers, numpy, python, and accelerator plugins when installed), the
device kind and count, the process count, the seeds, and the data builder's
name and version (plus a hash of the renderer's source, which is what
``persvid_synthetic`` examples are a function of)::

    WORKDIR/run_record.json         the latest run's record
    WORKDIR/run_records/000.json    every run in this workdir, in order

``launch.train`` and ``launch.evaluate`` call ``record_run`` (process 0
only). When the workdir already holds a record (a resume), each difference
that can change results is logged as one warning line, e.g.
``run record: config.train.learning_rate: 0.001 -> 0.003 (since the last run
in this workdir)``.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import platform
import re
import socket
import subprocess
import sys
from typing import Any, Mapping

import jax

from persvid_jax import atomic, xla_options
from persvid_jax.models import attention

log = logging.getLogger(__name__)

FORMAT = 1
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "transformers",
            "numpy", "ml-collections", "tensorflow", "tensorflow-cpu", "tensorflow-datasets",
            # Accelerator runtimes: their versions change the numerics as much as jaxlib's.
            "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")
# Differences that are expected between a run and its resumption: extending a
# run is the normal way to resume, and timestamps/hosts/commands always differ.
# Where compiled programs are cached changes no result.
IGNORED = frozenset({"config.train.total_steps", "devices.process_index",
                     "xla.compilation_cache_dir", "xla.xla_caches"})
_COMPARED = ("config", "git", "packages", "devices", "xla", "seeds", "data", "extra")

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


# ---- Collect -------------------------------------------------------------------

def git_state(package_dir: pathlib.Path = _PACKAGE_DIR) -> dict[str, Any]:
  """``{'commit', 'dirty', 'diff_sha256'}`` of the git tree ``package_dir`` lies in.

  Only a tree whose top level holds this very package counts (an installed
  copy inside some other repository is not that repository's code); outside
  git everything is ``'unknown'``. Untracked files do not make a tree dirty
  (they are not imported unless added).
  """
  unknown = {"commit": "unknown", "dirty": "unknown", "diff_sha256": "unknown"}

  def git(*args: str) -> str:
    return subprocess.run(["git", "-C", os.fspath(package_dir), *args], check=True,
                          capture_output=True, text=True, timeout=20).stdout

  try:
    top = pathlib.Path(git("rev-parse", "--show-toplevel").strip()).resolve()
    if top / package_dir.name != package_dir:
      return unknown
    commit = git("rev-parse", "HEAD").strip()
    diff = git("diff", "HEAD", "--no-color", "--no-ext-diff")
  except (OSError, subprocess.SubprocessError):
    return unknown
  return {"commit": commit, "dirty": bool(diff),
          "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None}


def package_versions() -> dict[str, str]:
  """Installed versions of ``PACKAGES`` (absent ones left out) and Python's."""
  out = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def device_info() -> dict[str, Any]:
  """Platform, device kind and counts, and whether cuDNN's fused attention runs
  here (what ``attention_impl='auto'`` then picks: the numerics differ slightly).
  Initialises jax's backend: call it after ``jax.distributed.initialize``."""
  devices = jax.devices()
  return {"platform": devices[0].platform, "kind": devices[0].device_kind,
          "count": len(devices), "local_count": jax.local_device_count(),
          "process_count": jax.process_count(), "process_index": jax.process_index(),
          "cudnn_attention": attention.cudnn_available()}


def _sha256_file(path: pathlib.Path) -> str:
  try:
    return hashlib.sha256(path.read_bytes()).hexdigest()
  except OSError:
    return "unknown"


def builder_version() -> str:
  """``persvid_synthetic``'s TFDS ``VERSION``, read from the builder's source.

  Read as text rather than imported: importing the builder loads TensorFlow
  (seconds), and TF must not start before JAX owns the devices.
  """
  try:
    text = (_PACKAGE_DIR / "data" / "synthetic_tfds.py").read_text()
  except OSError:
    return "unknown"
  m = re.search(r"""VERSION\s*=\s*tfds\.core\.Version\(\s*["']([^"']+)["']""", text)
  return m.group(1) if m else "unknown"


def data_info(config) -> dict[str, Any]:
  """The data a run reads: source, builder name and version, renderer hash.

  A config without a ``data`` block (the evaluation suites) renders held-out
  ``persvid_synthetic`` subjects itself, so it gets the renderer's entry.
  """
  data = config.get("data") if hasattr(config, "get") else None
  source = data.get("source", "tfds") if data is not None else "renderer"
  out: dict[str, Any] = {"source": source}
  if source in ("tfds", "renderer"):
    out["name"] = data.get("name") if data is not None else "persvid_synthetic"
    if source == "tfds" and data.get("data_dir"):
      out["data_dir"] = str(data.get("data_dir"))
    if str(out["name"]).startswith("persvid_synthetic"):
      out["builder_version"] = builder_version()
      out["renderer_sha256"] = _sha256_file(_PACKAGE_DIR / "data" / "synthetic.py")
  elif source == "folder":
    out["folder"] = str(data.get("folder"))
    out["captions"] = str(data.get("captions"))
  return out


def config_seeds(config) -> dict[str, Any]:
  """Every config field whose name mentions ``seed`` (``seed``, ``suite.seeds``,
  ``suite.world_seed``, ...), by dotted name."""
  return {k: v for k, v in _flatten(_plain(config)).items() if "seed" in k.rsplit(".", 1)[-1]}


def collect(config, *, seeds: Mapping[str, Any], extra: Mapping[str, Any] | None = None
            ) -> dict[str, Any]:
  """The record of a run of ``config`` on this machine, now.

  Args:
    config: the resolved ``ConfigDict`` (variant and overrides applied).
    seeds: the seeds the run uses (``config_seeds(config)`` for ours).
    extra: what else decides the results (the kind of run, the model
      evaluated, the mode); stored under ``'extra'`` and compared. The command
      line is kept anyway (``argv``).

  Returns:
    A JSON-serialisable dict: ``format, created, host, argv, config, git,
    packages, devices, xla, seeds, data, extra`` (``xla``: the compiler options
    and cache settings, ``xla_options.describe()``).
  """
  return {
      "format": FORMAT,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "host": socket.gethostname(),
      "argv": list(sys.argv),
      "config": _plain(config),
      "git": git_state(),
      "packages": package_versions(),
      "devices": device_info(),
      "xla": xla_options.describe(),
      "seeds": _plain(dict(seeds)),
      "data": data_info(config),
      "extra": _plain(dict(extra or {})),
  }


# ---- Write / read ------------------------------------------------------------------

def _paths(workdir: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
  return workdir / f"{name}.json", workdir / f"{name}s"


def write(workdir, record: Mapping[str, Any], *, name: str = "run_record") -> pathlib.Path:
  """Writes ``workdir/<name>.json`` (atomically) and appends it to the history.

  The history is ``workdir/<name>s/NNN.json``, one file per run in order
  (000 the first). Returns the history file's path.
  """
  workdir = pathlib.Path(workdir)
  latest, history = _paths(workdir, name)
  history.mkdir(parents=True, exist_ok=True)
  numbers = [int(p.stem) for p in history.glob("[0-9][0-9][0-9]*.json") if p.stem.isdigit()]
  entry = history / f"{max(numbers, default=-1) + 1:03d}.json"
  text = json.dumps(record, indent=2, sort_keys=False) + "\n"
  atomic.write_text(entry, text)
  atomic.write_text(latest, text)
  return entry


def read(workdir, *, name: str = "run_record") -> dict[str, Any] | None:
  """The latest record in ``workdir``, or None if there is none (or it is unreadable)."""
  latest, _ = _paths(pathlib.Path(workdir), name)
  try:
    return json.loads(latest.read_text())
  except (OSError, ValueError):
    return None


# ---- Compare ---------------------------------------------------------------------

def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Differences between two records that can change a run's results.

  One line per difference, ``section.key: old -> new`` (``config.*``,
  ``git.*``, ``packages.*``, ``devices.*``, ``xla.*``, ``seeds.*``, ``data.*``,
  ``extra.*``); keys in ``IGNORED`` (``config.train.total_steps``: extending
  a run is how one resumes) and the record's time, host and command line are
  not compared.
  """
  a = _flatten({k: old.get(k) for k in _COMPARED})
  b = _flatten({k: new.get(k) for k in _COMPARED})
  lines = []
  for key in sorted(set(a) | set(b)):
    if key in IGNORED or a.get(key, _MISSING) == b.get(key, _MISSING):
      continue
    if key.startswith("seeds.") and f"config.{key[6:]}" in a.keys() | b.keys():
      continue   # a config field: its config.* line says it already
    lines.append(f"{key}: {_short(a.get(key, _MISSING))} -> {_short(b.get(key, _MISSING))}")
  return lines


def record_run(workdir, config, *, extra: Mapping[str, Any] | None = None,
               name: str = "run_record") -> list[str]:
  """What ``launch.train`` / ``launch.evaluate`` call before they start.

  On process 0 only: collects this run's record, compares it with the one
  already in ``workdir`` (a resume or a rerun) and logs each difference as a
  warning, then writes it (``write``). Other processes do nothing. Returns
  the differences (empty on a first run or another process).
  """
  if jax.process_index() != 0:
    return []
  workdir = pathlib.Path(workdir)
  record = collect(config, seeds=config_seeds(config), extra=extra)
  previous = read(workdir, name=name)
  diffs = compare(previous, record) if previous is not None else []
  for line in diffs:
    log.warning("run record: %s (since the last run in this workdir, %s)", line,
                previous.get("created", "?"))
  workdir.mkdir(parents=True, exist_ok=True)
  write(workdir, record, name=name)
  return diffs


# ---- Helpers -----------------------------------------------------------------------

class _Missing:
  def __repr__(self):
    return "(absent)"


_MISSING = _Missing()


def _plain(value: Any) -> Any:
  """JSON types all the way down (ConfigDicts, tuples, numpy scalars, paths)."""
  if hasattr(value, "to_dict") and callable(value.to_dict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if hasattr(value, "item"):
    return value.item()
  return str(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out: dict[str, Any] = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _short(value: Any, limit: int = 80) -> str:
  text = value if isinstance(value, str) else repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."
