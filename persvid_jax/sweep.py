"""Sweeps: one run per point of a grid of config overrides, then one table.

  python -m launch.sweep --config configs/tiny.py:micro --workdir DIR \\
      --grid 'train.learning_rate=1e-3,3e-3;seed=0,1' [--config.train.total_steps=50]

A grid is ``key=v1,v2;other=a,b``: config fields (dotted, as after
``--config.``) with values as Python literals, as on the command line.
Commas inside brackets or quotes belong to the value
(``variants=('method',),('removed',)`` is two values). The points are the
product of the axes in the order given; each gets its own workdir
``DIR/<key>=<value>,...`` (characters outside ``[A-Za-z0-9._=,+-]`` become
``_`` and a hash of the point is appended).

Modes: ``run`` runs the points one after another as subprocesses of the
``launcher`` the caller gives (``launch/sweep.py``: ``python -m launch.train``
or ``python -m launch.evaluate``, each writing its run record), skipping
points that are complete and resuming the rest; ``print`` prints one command
per point (to start on a pod) and runs nothing;
``collect`` only gathers. ``run`` and ``collect`` write ``DIR/sweep.json``
and ``DIR/sweep.md``: one row per point (train: the final metrics of
``result.json``; evaluate: one row per variant of ``results.json``).

Subprocesses rather than calls in this process: each point starts as it
would alone (fresh devices, its own SIGTERM handling, memory returned), and
the persistent compilation cache makes repeated compiles cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import time
from typing import Any, Callable, Sequence

from persvid_jax import atomic, config_lib

KINDS = ("train", "evaluate")
MODES = ("run", "print", "collect")
RESULT_FILE = {"train": "result.json", "evaluate": "results.json"}
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 100


class SweepError(ValueError):
  """A grid, key or sweep directory that cannot be used (a user error)."""


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep."""
  index: int                            # 0-based, in grid order
  values: tuple[tuple[str, str], ...]   # (dotted key, value as written), axis order
  name: str                             # the workdir's name under the sweep's DIR

  @property
  def overrides(self) -> list[str]:
    """``key=value`` strings for ``config_lib.apply_overrides`` / ``--config.``."""
    return [f"{k}={v}" for k, v in self.values]

  @property
  def label(self) -> str:
    """The point's overrides joined by commas (the table's row label)."""
    return ",".join(self.overrides)


# ---- Grid ---------------------------------------------------------------------------

def split_top(text: str, sep: str) -> list[str]:
  """Splits ``text`` at ``sep`` outside brackets and quotes.

  ``"(1, 2),3"`` -> ``["(1, 2)", "3"]``; ``"'a,b',c"`` -> ``["'a,b'", "c"]``.
  """
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(text):
    if quote:
      if ch == quote and text[i - 1] != "\\":
        quote = None
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == sep and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if quote or depth:
    raise SweepError(f"--grid {text!r}: unbalanced brackets or quotes")
  parts.append(text[start:])
  return parts


def parse_grid(grid: str) -> list[tuple[str, list[str]]]:
  """``'key=v1,v2;other=a,b'`` -> ``[('key', ['v1', 'v2']), ('other', ['a', 'b'])]``.

  Values stay as written (``config_lib.apply_overrides`` parses them, as it
  does ``--config.KEY=VALUE``). Raises ``SweepError`` on an empty axis, a
  missing ``=``, an empty or repeated value, or a repeated key.
  """
  axes: list[tuple[str, list[str]]] = []
  for axis in split_top(grid, ";"):
    axis = axis.strip()
    if not axis:
      continue
    key, sep, values = axis.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
      raise SweepError(f"--grid axis {axis!r}: write it as key=v1,v2 (keys are config "
                       f"fields such as train.learning_rate)")
    vals = [v.strip() for v in split_top(values, ",")]
    if not values.strip() or any(not v for v in vals):
      raise SweepError(f"--grid axis {axis!r}: empty value; write key=v1,v2")
    if len(set(vals)) != len(vals):
      raise SweepError(f"--grid axis {axis!r}: a value is listed twice")
    if key in (k for k, _ in axes):
      raise SweepError(f"--grid: key {key!r} appears in two axes; list its values once")
    axes.append((key, vals))
  if not axes:
    raise SweepError("--grid is empty; give at least one axis, e.g. 'seed=0,1'")
  return axes


def point_name(values: Sequence[tuple[str, str]]) -> str:
  """The workdir name of a point: ``key=value,...`` made safe for file systems."""
  raw = ",".join(f"{k}={v}" for k, v in values)
  safe = _SAFE.sub("_", raw)
  if safe != raw or len(safe) > _MAX_NAME:
    # Different values can sanitise alike ('a b' and 'a_b'): the hash keeps them apart.
    safe = f"{safe[:_MAX_NAME - 9]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
  return safe


def make_points(axes: Sequence[tuple[str, Sequence[str]]]) -> list[Point]:
  """The product of the axes, first axis slowest."""
  keys = [k for k, _ in axes]
  return [Point(index=i, values=tuple(zip(keys, combo)), name=point_name(list(zip(keys, combo))))
          for i, combo in enumerate(itertools.product(*(v for _, v in axes)))]


def resolve(config_spec: str, fixed: Sequence[str], points: Sequence[Point], *,
            kind: str | None = None, check_paths: bool = True) -> list[Any]:
  """Each point's resolved config (the base + ``fixed`` + the point's values).

  Raises ``SweepError`` naming the key when a grid key is not a config field
  or is also fixed with ``--config.``. With ``kind='train'`` each point's
  config must also pass ``config_lib.check_train_config`` (``check_paths``:
  its paths too), so that a bad point is refused before any point runs.
  """
  try:
    base = config_lib.apply_overrides(config_lib.load_config(config_spec), list(fixed))
  except (config_lib.ConfigError, TypeError) as e:
    raise SweepError(str(e)) from None
  fixed_keys = {f.partition("=")[0] for f in fixed}
  configs = []
  for p in points:
    for key, _ in p.values:
      if key in fixed_keys:
        raise SweepError(f"--grid key {key!r} is also set by --config.{key}=...; drop one")
    try:
      configs.append(config_lib.apply_overrides(base, p.overrides))
    except config_lib.ConfigError as e:
      raise SweepError(f"--grid: {e}") from None
    except TypeError as e:   # ConfigDict refuses a value of another type
      raise SweepError(f"--grid point {p.label!r}: {e}") from None
    if kind == "train":
      try:
        config_lib.check_train_config(configs[-1], paths=check_paths)
      except config_lib.ConfigError as e:
        raise SweepError(f"--grid point {p.label!r}: {e}") from None
  return configs


# ---- Commands ---------------------------------------------------------------------------

def command(launcher: Sequence[str], kind: str, config_spec: str, workdir: pathlib.Path,
            overrides: Sequence[str], *, model: str | None = None) -> list[str]:
  """The command line of one point: ``launcher`` and the flags of a ``kind`` run.

  ``launcher`` is the program that runs one point (``[python, '-m',
  'launch.train']``); ``overrides``: the fixed ones, then the point's.
  """
  if kind == "train":
    cmd = [*launcher, "--config", config_spec, "--workdir", str(workdir), "--no-progress"]
  elif kind == "evaluate":
    cmd = [*launcher, "--config", config_spec, "--out", str(workdir / RESULT_FILE["evaluate"])]
    if model:
      cmd += ["--model", model]
  else:
    raise SweepError(f"--kind {kind!r}; use one of {KINDS}")
  return cmd + [f"--config.{o}" for o in overrides]


def _read_result(kind: str, workdir: pathlib.Path) -> dict | None:
  try:
    return json.loads((workdir / RESULT_FILE[kind]).read_text())
  except (OSError, ValueError):
    return None


def status(kind: str, workdir: pathlib.Path, config) -> str:
  """``'ok'`` (complete), ``'incomplete'`` (a train run stopped early) or ``'missing'``."""
  result = _read_result(kind, workdir)
  if result is None:
    return "missing"
  if kind == "train" and (result.get("stopped_by") or
                          int(result.get("step", -1)) < int(config.train.total_steps)):
    return "incomplete"
  return "ok"


# ---- Run / collect ----------------------------------------------------------------------

def run(config_spec: str, grid: str, workdir, launcher: Sequence[str], *, kind: str = "train",
        mode: str = "run", fixed: Sequence[str] = (), model: str | None = None,
        log: Callable[[str], None] = print, env: dict | None = None) -> dict[str, Any]:
  """Runs, prints or collects a sweep; returns the collected summary.

  Args:
    config_spec: ``configs/NAME.py[:variant]`` of every point.
    grid: ``'key=v1,v2;other=a,b'`` (see ``parse_grid``).
    workdir: the sweep's directory; point ``p`` runs in ``workdir/p.name``.
    launcher: the command that runs one point, before its flags, e.g.
      ``[sys.executable, '-m', 'launch.train']``: a trainer for ``kind='train'``
      (``--config --workdir --no-progress --config.KEY=VALUE``), an evaluator
      for ``'evaluate'`` (``--config --out [--model] --config.KEY=VALUE``).
    kind: ``'train'`` or ``'evaluate'``: the flags and the result file of a point.
    mode: ``'run'``, ``'print'`` or ``'collect'`` (module docstring).
    fixed: ``key=value`` overrides applied to every point (before the grid's).
    model: ``--model`` of the evaluate points.
    log: receives one progress line per point (``print``: the commands).
    env: the subprocesses' environment (default this process's).

  Returns:
    The summary written to ``sweep.json`` (``{'kind', 'config', 'grid',
    'fixed', 'points': [...], 'rows': [...]}``); empty points in print mode.
  """
  if kind not in KINDS:
    raise SweepError(f"--kind {kind!r}; use one of {KINDS}")
  if mode not in MODES:
    raise SweepError(f"--mode {mode!r}; use one of {MODES}")
  if model and kind != "evaluate":
    raise SweepError("--model is for --kind evaluate (a train sweep trains its own)")
  workdir = pathlib.Path(workdir)
  axes = parse_grid(grid)
  points = make_points(axes)
  # Print mode: the paths are those of the machines that will run the commands.
  configs = resolve(config_spec, fixed, points, kind=kind, check_paths=mode != "print")
  if mode != "print":
    # Before any point runs: a file or a read-only path would fail at the first mkdir.
    problem = config_lib.workdir_problem(workdir)
    if problem:
      raise SweepError(problem)

  if mode == "print":
    for p in points:
      log(shlex.join(command(launcher, kind, config_spec, workdir / p.name,
                             [*fixed, *p.overrides], model=model)))
    return {"kind": kind, "config": config_spec, "points": []}

  if mode == "run":
    workdir.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    for p, config in zip(points, configs):
      pdir = workdir / p.name
      head = f"[{p.index + 1}/{len(points)}] {p.label}:"
      if status(kind, pdir, config) == "ok":
        log(f"{head} complete, skipped")
        continue
      pdir.mkdir(parents=True, exist_ok=True)
      cmd = command(launcher, kind, config_spec, pdir, [*fixed, *p.overrides], model=model)
      t0 = time.perf_counter()
      rc = _run_logged(cmd, pdir / "log.txt", env)
      seconds = time.perf_counter() - t0
      if rc != 0 or status(kind, pdir, config) != "ok":
        failed[p.name] = f"exit {rc}"
        log(f"{head} FAILED (exit {rc}) after {seconds:.0f} s: {_last_line(pdir / 'log.txt')}"
            f" (log: {pdir / 'log.txt'})")
      else:
        log(f"{head} ok in {seconds:.0f} s{_headline(kind, pdir)}")
  summary = collect(kind, config_spec, workdir, axes, points, configs, fixed)
  if mode == "run":
    for row in summary["points"]:
      if row["name"] in failed:
        row["status"] = f"failed ({failed[row['name']]})"
  write(workdir, summary)
  return summary


def _run_logged(cmd: list[str], log_path: pathlib.Path, env: dict | None) -> int:
  """Runs ``cmd`` with stdout+stderr appended to ``log_path``; its exit status.

  On Ctrl-C the child (same process group) got the signal too and is saving
  a checkpoint: wait for it, then stop the sweep.
  """
  with open(log_path, "a") as f:
    f.write(f"$ {shlex.join(cmd)}\n")
    f.flush()
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                            env=env if env is not None else os.environ.copy())
    try:
      return proc.wait()
    except KeyboardInterrupt:
      proc.wait()
      raise


def _last_line(path: pathlib.Path) -> str:
  try:
    lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
  except OSError:
    return ""
  return lines[-1][:200] if lines else ""


def _headline(kind: str, pdir: pathlib.Path) -> str:
  result = _read_result(kind, pdir) or {}
  if kind == "train":
    loss = result.get("last_metrics", {}).get("loss")
    return f", step {result.get('step')}, loss {loss:.4f}" if loss is not None else ""
  return ""


def _lookup(config, key: str) -> Any:
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _json_value(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, tuple):
    return [_json_value(v) for v in value]
  return value


def collect(kind: str, config_spec: str, workdir: pathlib.Path,
            axes: Sequence[tuple[str, Sequence[str]]], points: Sequence[Point],
            configs: Sequence[Any], fixed: Sequence[str]) -> dict[str, Any]:
  """Each point's status, values, result summary and run record -> one summary."""
  out_points, rows = [], []
  for p, config in zip(points, configs):
    pdir = workdir / p.name
    values = {k: _json_value(_lookup(config, k)) for k, _ in p.values}
    st = status(kind, pdir, config)
    result = _read_result(kind, pdir) if st != "missing" else None
    record_name = "run_record" if kind == "train" else "results.run_record"
    try:
      record = json.loads((pdir / f"{record_name}.json").read_text())
      git = record.get("git", {})
      rec = {"commit": git.get("commit"), "dirty": git.get("dirty"),
             "devices": f"{record['devices']['count']} x {record['devices']['kind']}"}
    except (OSError, ValueError, KeyError):
      rec = None
    entry = {"name": p.name, "workdir": str(pdir), "values": values, "status": st,
             "record": rec}
    if kind == "train":
      entry["result"] = ({k: result.get(k) for k in ("step", "last_metrics", "steps_per_second",
                                                     "compile_seconds", "stopped_by")}
                         if result else None)
      rows.append({"point": p.name, **values, "status": st,
                   **({"step": result.get("step"), **result.get("last_metrics", {}),
                       "steps_per_second": result.get("steps_per_second")} if result else {})})
    else:
      entry["result"] = ({"variants": {n: {"status": v.get("status"),
                                           "metrics": v.get("metrics")}
                                       for n, v in result.get("variants", {}).items()},
                          "comparison": result.get("comparison")} if result else None)
      variants = (result or {}).get("variants", {})
      if not variants:
        rows.append({"point": p.name, **values, "status": st})
      for name, v in variants.items():
        row = {"point": p.name, **values, "status": st, "variant": name,
               "variant_status": v.get("status")}
        for metric, stats in (v.get("metrics") or {}).items():
          row[metric] = stats.get("mean")
          row[f"{metric}_std"] = stats.get("std")
        rows.append(row)
    out_points.append(entry)
  return {"kind": kind, "config": config_spec, "grid": {k: list(v) for k, v in axes},
          "fixed": list(fixed), "points": out_points, "rows": rows}


def markdown(summary: dict[str, Any]) -> str:
  """The summary's rows as a markdown table (metrics as 4 significant digits)."""
  rows = summary["rows"]
  keys = list(summary["grid"])
  cols = ["point", *keys, "status"]
  for row in rows:
    cols += [k for k in row if k not in cols and not k.endswith("_std")]
  lines = [f"Sweep of `{summary['config']}` ({summary['kind']}), grid "
           f"`{';'.join(f'{k}=' + ','.join(v) for k, v in summary['grid'].items())}`"
           + (f", fixed `{' '.join(summary['fixed'])}`" if summary["fixed"] else "") + ":", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  for row in rows:
    cells = []
    for c in cols:
      v = row.get(c, "")
      if isinstance(v, float):
        std = row.get(f"{c}_std")
        v = f"{v:.4g}" + (f" ± {std:.2g}" if isinstance(std, float) else "")
      cells.append(str(v) if not isinstance(v, (list, dict)) else json.dumps(v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write(workdir: pathlib.Path, summary: dict[str, Any]) -> None:
  """``workdir/sweep.json`` and ``workdir/sweep.md`` (each atomically)."""
  workdir.mkdir(parents=True, exist_ok=True)
  for name, text in (("sweep.json", json.dumps(summary, indent=2) + "\n"),
                     ("sweep.md", markdown(summary))):
    atomic.write_text(workdir / name, text)
