"""``launch.sweep``: grids, print mode, user errors, a real 2-point sweep of ``launch.train``."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import jax
import pytest

from persvid_jax import sweep

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _sweep(*args, timeout=900):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.run([sys.executable, "-m", "launch.sweep", *map(str, args)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def test_grid_parsing_and_point_names():
  axes = sweep.parse_grid("train.learning_rate=1e-3,3e-3; variants=('method',),('a', 'b')")
  assert axes == [("train.learning_rate", ["1e-3", "3e-3"]),
                  ("variants", ["('method',)", "('a', 'b')"])]
  points = sweep.make_points(axes)
  assert [p.overrides for p in points][1] == ["train.learning_rate=1e-3", "variants=('a', 'b')"]
  assert points[0].name.startswith("train.learning_rate=1e-3,variants=__method_,_-")
  assert len({p.name for p in points}) == 4
  assert sweep.make_points([("seed", ["0"])])[0].name == "seed=0"      # safe names stay as is
  for bad, match in [("", "empty"), ("seed", "key=v1,v2"), ("seed=0,,1", "empty value"),
                     ("seed=0;seed=1", "two axes"), ("seed=(0,1", "unbalanced"),
                     ("seed=1,1", "twice")]:
    with pytest.raises(sweep.SweepError, match=match):
      sweep.parse_grid(bad)


def test_print_mode_and_bad_grids_exit_2(tmp_path):
  r = _sweep("--config", "configs/tiny.py:micro", "--grid",
             "seed=0,1;train.learning_rate=1e-3,2e-3", "--workdir", tmp_path, "--mode", "print",
             "--config.train.total_steps=7")
  assert r.returncode == 0, r.stderr
  lines = r.stdout.strip().splitlines()
  assert len(lines) == 4 and not (tmp_path / "sweep.json").exists()   # print runs nothing
  argv = shlex.split(lines[3])
  assert argv[:3] == ["python", "-m", "launch.train"]
  assert argv[argv.index("--config") + 1] == "configs/tiny.py:micro"
  assert argv[argv.index("--workdir") + 1] == str(tmp_path / "seed=1,train.learning_rate=2e-3")
  assert argv[-3:] == ["--config.train.total_steps=7", "--config.seed=1",
                       "--config.train.learning_rate=2e-3"]
  cases = [(["--grid", "sed=0,1"], "no config field 'sed'"),
           (["--grid", "seed=0,,1"], "empty value"),
           (["--grid", "train.learning_rate=1e-3,'fast'"], "train.learning_rate='fast'"),
           (["--grid", "train.total_steps=1,2", "--config.train.total_steps=3"], "drop one"),
           (["--grid", "seed=0", "--model", "/x"], "--kind evaluate")]
  procs = [(subprocess.Popen([sys.executable, "-m", "launch.sweep", "--config",
                              "configs/tiny.py:micro", "--workdir", str(tmp_path), *args],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            args, match) for args, match in cases]
  for p, args, match in procs:
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 2, (args, stderr)
    assert len(stderr.strip().splitlines()) == 1 and match in stderr, (args, stderr)


@pytest.mark.slow
def test_two_point_sweep_table_and_identical_runs_agree(tmp_path):
  """Two launch.train runs at tiny:micro, collected into one table.

  The points differ only in checkpoint cadence, which must not change a
  number: same config and seed on the same machine -> bitwise the same metrics.
  """
  args = ["--config", "configs/tiny.py:micro", "--grid", "train.checkpoint_every_steps=1,2",
          "--workdir", tmp_path, "--config.train.total_steps=2",
          "--config.train.sample_every_steps=0", "--config.mesh.data=1", "--config.mesh.fsdp=1"]
  r = _sweep(*args)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
  progress = [l for l in r.stdout.splitlines() if l.startswith("[")]
  assert progress[0].startswith("[1/2] train.checkpoint_every_steps=1: ok in "), r.stdout
  assert progress[1].startswith("[2/2] train.checkpoint_every_steps=2: ok in "), r.stdout

  summary = json.loads((tmp_path / "sweep.json").read_text())
  assert [row["train.checkpoint_every_steps"] for row in summary["rows"]] == [1, 2]
  assert all(row["status"] == "ok" and row["step"] == 2 for row in summary["rows"])
  table = (tmp_path / "sweep.md").read_text()
  assert len([l for l in table.splitlines() if l.startswith("| train.checkpoint")]) == 2
  a, b = (tmp_path / p["name"] for p in summary["points"])
  # The swept value reached each run (its record and its checkpoints say so).
  rec_a, rec_b = (json.loads((d / "run_record.json").read_text()) for d in (a, b))
  assert rec_a["config"]["train"]["checkpoint_every_steps"] == 1
  assert rec_b["config"]["train"]["checkpoint_every_steps"] == 2
  assert rec_a["seeds"] == rec_b["seeds"] == {"seed": 0}
  assert sorted(p.name for p in (a / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
  assert sorted(p.name for p in (b / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
  # Reproducibility: identical metrics, bit for bit.
  ma, mb = (json.loads((d / "result.json").read_text())["last_metrics"] for d in (a, b))
  assert set(ma) >= {"loss", "grad_norm"} and ma == mb

  again = _sweep(*args, timeout=120)      # complete points are skipped
  assert again.returncode == 0, again.stderr
  assert again.stdout.count("complete, skipped") == 2


def test_collect_evaluate_points_one_row_per_variant(tmp_path):
  """An ablation sweep's table: a row per (point, variant); a missing point is reported."""
  grid = "variants=('method', 'removed');suite.steps=2,4"
  points = sweep.make_points(sweep.parse_grid(grid))
  done = tmp_path / points[0].name
  done.mkdir(parents=True)
  metrics = {"colour_error": {"mean": 0.25, "std": 0.01}, "shape_iou": {"mean": 0.5, "std": 0.0}}
  (done / "results.json").write_text(json.dumps({"variants": {
      "method": {"status": "ok", "metrics": metrics},
      "removed": {"status": "ok", "metrics": metrics}}, "comparison": {}}))
  r = _sweep("--config", "configs/eval.py:size=tiny", "--kind", "evaluate", "--grid", grid,
             "--workdir", tmp_path, "--mode", "collect")
  assert r.returncode == 1, r.stderr                 # one point has no results yet
  summary = json.loads((tmp_path / "sweep.json").read_text())
  assert [(row["suite.steps"], row["status"], row.get("variant")) for row in summary["rows"]] == [
      (2, "ok", "method"), (2, "ok", "removed"), (4, "missing", None)]
  assert summary["rows"][0]["variants"] == ["method", "removed"]
  assert summary["rows"][0]["colour_error"] == 0.25
  assert "| 0.25 ± 0.01 |" in (tmp_path / "sweep.md").read_text()
  p = _sweep("--config", "configs/eval.py:size=tiny", "--kind", "evaluate", "--grid", grid,
             "--workdir", tmp_path, "--mode", "print", "--model", "/m")
  argv = shlex.split(p.stdout.splitlines()[1])
  assert argv[2] == "launch.evaluate" and argv[argv.index("--model") + 1] == "/m"
  assert argv[argv.index("--out") + 1] == str(tmp_path / points[1].name / "results.json")
