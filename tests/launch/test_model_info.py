"""``python -m launch.model_info`` end to end, as a subprocess."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "launch.model_info", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_model_info_tiny_json():
  out = _run("--config", "configs/tiny.py", "--json")
  assert out.returncode == 0, out.stderr
  counts = json.loads(out.stdout)["params"]
  assert set(counts) == {"text_encoder", "image_encoder", "mapper", "extractor", "unet",
                         "sr_unet"}
  assert all(n > 0 for n in counts.values())


def test_model_info_bad_config_is_one_line_exit_2():
  out = _run("--config", "configs/nope.py")
  assert out.returncode == 2
  assert out.stderr.count("\n") == 1 and "not found" in out.stderr
  assert "Traceback" not in out.stderr
  out = _run("--config", "tiny:nonsense=3")
  assert out.returncode == 2 and "unknown config option" in out.stderr
