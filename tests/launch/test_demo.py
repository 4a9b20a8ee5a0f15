"""``python -m launch.demo`` end to end on the shipped model (few sampler steps)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_main_job(tmp_path):
  flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  out = subprocess.run([sys.executable, "-m", "launch.demo", "--out", str(tmp_path), "--steps",
                        "2", "--sr-steps", "1", "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  modes = {r["mode"] for r in summary["rows"]}
  assert modes == {"concept", "concept+target", "target", "concept+scene", "text", "text+scene"}
  for label, files in summary["files"].items():
    for f in files:
      assert pathlib.Path(f).is_file() and pathlib.Path(f).stat().st_size > 500, f
  assert (tmp_path / "contact_sheet.png").is_file()
  assert (tmp_path / "concepts_db" / "concepts.json").is_file()
  for name in ("sub1", "sub2"):
    c = summary["personalization"][name]
    for kind in ("personalized", "removed"):
      assert 0.0 <= c[kind]["shape_iou"] <= 1.0 and c[kind]["colour_error"] >= 0.0
  assert "subject fidelity" in out.stdout and "contact sheet" in out.stdout
