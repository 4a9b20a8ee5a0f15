"""``launch.concepts`` and ``launch.generate`` end to end, as subprocesses (micro model).

Every mode of SPEC §1 runs through the CLI; every bad input exits 2 with one
line on stderr and leaves the database byte-for-byte unchanged. The
subprocesses share the test session's persistent compilation cache, so the
one generation graph compiles once for all six modes.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
DREAMBENCH = ROOT.parent / "shared" / "dreambench"


def _env():
  flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)


def _start(module, *args):
  return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=ROOT,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _snapshot(directory: pathlib.Path) -> dict:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
          if p.is_file()}


def _photos(tmp: pathlib.Path) -> list[pathlib.Path]:
  """Two synthetic photos of one held-out subject + one of another."""
  from persvid_jax.data import synthetic
  cfg = synthetic.CONFIGS["tiny"].replace(reference_size=64)
  paths = []
  for i in (0, 1, 2):
    p = tmp / f"photo{i}.png"
    Image.fromarray(synthetic.render_example(cfg, "test", i)["reference"]).save(p)
    paths.append(p)
  return paths


@pytest.fixture(scope="module")
def db_with_concept(tmp_path_factory, micro_model_dir):
  tmp = tmp_path_factory.mktemp("cli")
  photos = _photos(tmp)
  db = tmp / "db"
  out = _run("launch.concepts", "add", "--db", db, "--name", "toy", "--images", *photos[:2],
             "--model", micro_model_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "added <toy>" in out.stdout and "slot 0" in out.stdout
  return db, photos, tmp, micro_model_dir


def test_list_and_remove(db_with_concept, tmp_path):
  db, photos, _, model = db_with_concept
  out = _run("launch.concepts", "list", "--db", db, "--json")
  assert out.returncode == 0, out.stderr
  listing = json.loads(out.stdout)
  assert [c["name"] for c in listing["concepts"]] == ["toy"]
  assert listing["concepts"][0]["images"] == 2
  manifest = json.loads((db / "concepts.json").read_text())
  assert len(manifest["concepts"][0]["images"][0]["sha256"]) == 64

  # remove on a copy (the module's database stays for the other tests)
  import shutil
  copy = tmp_path / "db"
  shutil.copytree(db, copy)
  out = _run("launch.concepts", "remove", "--db", copy, "--name", "toy")
  assert out.returncode == 0 and "removed <toy>" in out.stdout
  out = _run("launch.concepts", "list", "--db", copy)
  assert out.returncode == 0 and "0/" in out.stdout


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason=f"no dreambench photos at {DREAMBENCH}")
def test_concept_from_dreambench_photos(tmp_path, micro_model_dir):
  photos = sorted((DREAMBENCH / "dog").glob("*.jpg"))[:3]
  assert photos, "dreambench/dog has no photos"
  out = _run("launch.concepts", "add", "--db", tmp_path / "db", "--name", "dog",
             "--images", *photos, "--model", micro_model_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  manifest = json.loads((tmp_path / "db" / "concepts.json").read_text())
  images = manifest["concepts"][0]["images"]
  assert [i["file"] for i in images] == [p.name for p in photos]
  assert all(0.02 <= i["coverage"] <= 0.9 for i in images)


@pytest.mark.slow
def test_every_mode_through_the_cli(db_with_concept, tmp_path):
  db, photos, _, model = db_with_concept
  scene = tmp_path / "scene.png"
  Image.fromarray(np.full((40, 60, 3), (200, 90, 40), np.uint8)).save(scene)
  cases = [
      ("concept", ["--prompt", "a <toy> moving left"], "gif"),
      ("concept+target", ["--prompt", "a <toy> moving up", "--image", photos[1]], "mp4"),
      ("target", ["--prompt", "a <image> moving up", "--image", photos[2]], "gif"),
      ("concept+scene", ["--prompt", "a <toy> on grass", "--image", scene,
                         "--image-role", "scene"], "gif"),
      ("text", ["--prompt", "a red star moving left"], "gif"),
      ("text+scene", ["--prompt", "a red star", "--image", scene], "mp4"),
  ]
  # The first compiles (into the shared cache); the rest run concurrently.
  procs = []
  for i, (mode, args, ext) in enumerate(cases):
    out_file = tmp_path / f"{mode.replace('+', '_')}.{ext}"
    cmd = ["launch.generate", "--db", db, *args, "--mode", mode, "--model", model,
           "--steps", 2, "--sr-steps", 1, "--seed", 3, "--out", out_file, "--no-progress",
           "--sheet"]
    if i == 0:
      first = _run(*cmd)
      procs.append((mode, out_file, first.returncode, first.stdout, first.stderr))
    else:
      procs.append((mode, out_file, _start(*cmd)))
  results = []
  for item in procs:
    if len(item) == 3:
      mode, out_file, p = item
      stdout, stderr = p.communicate(timeout=600)
      item = (mode, out_file, p.returncode, stdout, stderr)
    results.append(item)
  for mode, out_file, rc, stdout, stderr in results:
    assert rc == 0, (mode, stderr[-3000:])
    assert f"mode {mode}:" in stdout
    assert out_file.is_file() and out_file.stat().st_size > 500, mode
    sheet = out_file.with_suffix(".png")
    assert sheet.is_file()
    if out_file.suffix == ".gif":
      frames = Image.open(out_file).n_frames
      assert frames == 2, (mode, frames)     # micro: 2 frames


@pytest.mark.slow
def test_bad_input_exits_2_and_leaves_the_database(db_with_concept, tmp_path):
  db, photos, _, model = db_with_concept
  text = tmp_path / "notes.png"
  text.write_text("not an image")
  truncated = tmp_path / "cut.png"
  truncated.write_bytes(photos[0].read_bytes()[: photos[0].stat().st_size // 2])
  before = _snapshot(db)
  add = ["launch.concepts", "add", "--db", db, "--model", model]
  gen = ["launch.generate", "--db", db, "--model", model, "--out", tmp_path / "x.gif",
         "--steps", 1, "--sr-steps", 1, "--no-progress"]
  many = " ".join(["<toy>"] * 20)
  cases = {
      "missing file": (add + ["--name", "new", "--images", tmp_path / "nope.jpg"], "nope.jpg"),
      "not an image": (add + ["--name", "new", "--images", text], "not an image"),
      "truncated": (add + ["--name", "new", "--images", truncated], "cut.png"),
      "directory": (add + ["--name", "new", "--images", tmp_path], "directory"),
      "invalid name": (add + ["--name", "../evil", "--images", photos[0]], "invalid"),
      "reserved name": (add + ["--name", "image", "--images", photos[0]], "reserved"),
      "duplicate name": (add + ["--name", "toy", "--images", photos[0]], "already exists"),
      "remove unknown": (["launch.concepts", "remove", "--db", db, "--name", "cat"],
                         "unknown concept"),
      "unknown concept": (gen + ["--prompt", "a <cat> moving"], "unknown concept <cat>"),
      "no concept in concept mode": (gen + ["--prompt", "a red star", "--mode", "concept"],
                                     "mode 'concept' needs"),
      "<image> without image": (gen + ["--prompt", "a <image>"], "no image"),
      "too many concepts": (gen + ["--prompt", f"{many} moving"], "too long"),
      "bad target image": (gen + ["--prompt", "a <toy>", "--image", truncated], "cut.png"),
      "bad out suffix": (gen[:-7] + ["--out", tmp_path / "x.avi", "--prompt", "a <toy>"],
                         ".mp4 or .gif"),
      "missing out dir": (gen[:-7] + ["--out", tmp_path / "nodir" / "x.gif", "--prompt",
                                      "a <toy>"], "does not exist"),
      "not a database": (["launch.concepts", "list", "--db", tmp_path / "none"],
                         "not a concept database"),
      "bad model": (["launch.generate", "--db", db, "--model", tmp_path, "--out",
                     tmp_path / "x.gif", "--prompt", "a <toy>"], "not a training workdir"),
  }
  procs = {name: (_start(*cmd), expect) for name, (cmd, expect) in cases.items()}
  for name, (p, expect) in procs.items():
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 2, (name, p.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, (name, stderr[-2000:])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, (name, lines)
    assert lines[0].startswith("error: ") and expect in lines[0], (name, lines[0])
  assert _snapshot(db) == before
  assert not (tmp_path / "x.gif").exists()
