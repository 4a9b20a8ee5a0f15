"""Bad output places through the CLIs (in-process): refused at once, nothing lost.

An ``--out`` (or ``--sheet``, ``--json``, ``--sheets``, ``--out-dir``,
``--make-photos``, ``--data_dir``) that is a directory where a file is meant,
a file where a directory is meant, or under a file (so it cannot be created)
is refused with one line ``error: ...`` and exit status 2 before any model is
loaded (each case well under 2 s), leaving nothing behind. An existing
folder that is not an exported model is never deleted by ``launch.export``;
an exported one is replaced whole. Failed writes leave no temp file.
"""

import pathlib
import socket
import time

import numpy as np
import pytest

from launch import _common
from launch import app as app_cli
from launch import bench as bench_cli
from launch import demo as demo_cli
from launch import evaluate as evaluate_cli
from launch import export as export_cli
from launch import generate as generate_cli
from persvid_jax.pipeline import media
from persvid_jax.pipeline import model as model_lib


def _tree(directory: pathlib.Path) -> dict:
  """Every file and folder under ``directory`` (files with their bytes)."""
  return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
          for p in sorted(directory.rglob("*"))}


@pytest.fixture
def places(tmp_path):
  """A plain file, a folder named like a file, a folder of user data."""
  (tmp_path / "afile").write_text("not a folder")
  (tmp_path / "isdir.gif").mkdir()
  (tmp_path / "isdir.json").mkdir()
  data = tmp_path / "data"
  data.mkdir()
  (data / "thesis.txt").write_text("years of work")
  return tmp_path


def _refused(capsys, call, words, seconds=2.0):
  """Runs ``call``; asserts exit status 2, one ``error:`` line holding ``words``, quickly."""
  t0 = time.perf_counter()
  try:
    code = call()
  except SystemExit as e:       # argparse and the dataset builder exit themselves
    code = e.code
  took = time.perf_counter() - t0
  _, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2, (code, err)
  assert "Traceback" not in err
  assert lines and words in lines[-1], lines
  assert took < seconds, f"{took:.1f} s: checked after loading?"
  return lines


def _one_line(capsys, call, words):
  lines = _refused(capsys, call, words)
  assert len(lines) == 1 and lines[0].startswith("error: "), lines


# -- out_dir_problem / dir_problem -------------------------------------------------------

def test_out_dir_problem_names_what_is_wrong(places):
  problem = _common.out_dir_problem
  assert problem(places / "v.gif") is None
  assert "already exists and is a directory" in problem(places / "isdir.gif")
  assert f"{places / 'afile'} is a file, not a directory" in problem(places / "afile" / "v.gif")
  assert f"{places / 'afile'} is a file" in problem(places / "afile" / "x" / "v.gif")
  assert "does not exist; create it first" in problem(places / "missing" / "v.gif")
  assert "--json" in problem(places / "isdir.gif", "--json")
  dirs = _common.dir_problem
  assert dirs(places / "data") is None and dirs(places / "new" / "deeper") is None
  assert "is a file; give a directory" in dirs(places / "afile")
  assert "is a file, not a directory" in dirs(places / "afile" / "out")


# -- export: never deletes what is not a model ---------------------------------------------

@pytest.fixture(scope="module")
def shipped_model():
  """The shipped demo model as stored (unvalidated: 0.1 s instead of 5 s to load)."""
  config, params, info = model_lib.read_exported(model_lib.DEMO_MODEL_DIR)
  stack, tokenizer = model_lib._build(config)
  return model_lib.Model(config=config, stack=stack, tokenizer=tokenizer, params=params,
                         source="shipped", info=info)


def test_export_refuses_a_folder_that_is_not_a_model_and_replaces_one_that_is(
    places, capsys, shipped_model):
  before = _tree(places / "data")
  # A missing workdir would fail at loading: the refusal comes first.
  argv = ["--workdir", str(places / "no_workdir"), "--out"]
  _one_line(capsys, lambda: export_cli.main(argv + [str(places / "data")]),
            "neither empty nor an exported model")
  assert _tree(places / "data") == before
  _one_line(capsys, lambda: export_cli.main(argv + [str(places / "afile")]), "is a file")
  _one_line(capsys, lambda: export_cli.main(argv + [str(places / "afile" / "m")]),
            "is a file, not a directory")
  assert (places / "afile").read_text() == "not a folder"
  with pytest.raises(model_lib.ModelError, match="neither empty nor an exported model"):
    model_lib.export_model(shipped_model, places / "data")          # the library too
  assert _tree(places / "data") == before
  # An exported model is replaced whole (no stray file of the old one stays).
  out = model_lib.export_model(shipped_model, places / "m")
  (out / "stray.txt").write_text("from the old model")
  assert model_lib.export_model(shipped_model, out, note="second") == out
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.json",
                                                    "model.safetensors"]
  assert '"note": "second"' in (out / "model.json").read_text()
  assert not [p for p in places.iterdir() if p.name.startswith(".")]  # no temp siblings
  (places / "empty").mkdir()                                          # empty: fine
  model_lib.export_model(shipped_model, places / "empty")
  assert model_lib.is_exported(places / "empty")


def test_model_that_is_a_file_is_named_a_file(places):
  with pytest.raises(model_lib.ModelError, match="is a file, not a model directory"):
    model_lib.load_model(places / "afile")


# -- generate ------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--out", "{tmp}/isdir.gif"], "isdir.gif already exists and is a directory"),
    (["--out", "{tmp}/afile/v.gif"], "afile is a file, not a directory"),
    (["--out", "{tmp}/v.gif", "--sheet", "{tmp}/afile/s.png"], "--sheet"),
    (["--out", "{tmp}/v.gif", "--sheet", "{tmp}/isdir.gif"], "--sheet"),
    (["--out", "{tmp}/v.gif", "--guidance", "inf"],
     "argument --guidance: inf must be a finite number >= 0"),
    (["--out", "{tmp}/v.gif", "--detail-guidance", "inf"], "--detail-guidance: inf must be"),
])
def test_generate_refuses_bad_outputs_before_sampling(places, capsys, argv, words):
  argv = [a.format(tmp=places) for a in argv]
  before = _tree(places)
  _one_line(capsys, lambda: generate_cli.main(["--prompt", "a cat", "--no-progress"] + argv),
            words)
  assert _tree(places) == before


# -- media: a failed write leaves no temp file ---------------------------------------------

@pytest.mark.parametrize("save, name", [
    (lambda p: media.save_gif(p, np.zeros((2, 8, 8, 3), np.uint8)), "v.gif"),
    (lambda p: media.save_mp4(p, np.zeros((2, 8, 8, 3), np.uint8)), "v.mp4"),
    (lambda p: media.save_png(p, np.zeros((8, 8, 3), np.uint8)), "s.png"),
])
def test_failed_media_write_leaves_no_temp_file(tmp_path, save, name):
  (tmp_path / name).mkdir()          # the final rename onto a folder fails
  with pytest.raises(OSError):
    save(tmp_path / name)
  assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# -- evaluate, bench -----------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--out", "{tmp}/isdir.json"], "already exists and is a directory"),
    (["--out", "{tmp}/r.json", "--sheets", "{tmp}/afile"], "--sheets"),
    (["--out", "{tmp}/r.json", "--sheets", "{tmp}/afile/sheets"], "is a file, not a directory"),
])
def test_evaluate_refuses_bad_outputs_before_loading(places, capsys, argv, words):
  argv = [a.format(tmp=places) for a in argv]
  before = _tree(places)
  _one_line(capsys, lambda: evaluate_cli.main(
      ["--config", "configs/eval.py:size=tiny", "--model", str(places / "no_model")] + argv),
            words)
  assert _tree(places) == before


def test_config_override_given_with_a_space_says_use_equals(places, capsys):
  argv = ["--config", "configs/eval.py:size=tiny", "--out", str(places / "r.json")]
  _refused(capsys, lambda: evaluate_cli.main(argv + ["--config.train.total_steps", "5"]),
           "use --config.train.total_steps=5")
  _refused(capsys, lambda: evaluate_cli.main(argv + ["--config.train.total_steps"]),
           "use --config.train.total_steps=VALUE")


@pytest.mark.parametrize("json_out, words", [
    ("{tmp}/afile/b.json", "is a file, not a directory"),
    ("{tmp}/isdir.json", "already exists and is a directory"),
])
def test_bench_refuses_a_bad_json_before_running(places, capsys, json_out, words):
  lines = _refused(capsys, lambda: bench_cli.main(
      ["--config", "tiny", "--which", "train", "--json", json_out.format(tmp=places)]), words)
  assert len(lines) == 1 and lines[0].startswith("error: --json "), lines


# -- demo ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], "argument --steps: 0 must be an integer >= 1"),
    (["--steps", "-3"], "argument --steps: -3 must be an integer >= 1"),
    (["--sr-steps", "0"], "argument --sr-steps: 0 must be an integer >= 1"),
    (["--seed", "-1"], "argument --seed: -1 must be an integer in [0, 4294967295]"),
    (["--out", "{tmp}/afile"], "--out {tmp}/afile is a file"),
    (["--out", "{tmp}/afile/demo"], "is a file, not a directory"),
    (["--make-photos", "{tmp}/afile"], "--make-photos {tmp}/afile is a file"),
])
def test_demo_refuses_bad_flags_before_loading(places, capsys, argv, words):
  argv = [a.format(tmp=places) for a in argv]
  if "--out" not in argv:
    argv += ["--out", str(places / "demo_out")]
  before = _tree(places)
  _one_line(capsys, lambda: demo_cli.main(argv + ["--model", str(places / "no_model")]),
            words.format(tmp=places))
  assert _tree(places) == before                 # no concepts_db, no photos


# -- app -----------------------------------------------------------------------------------

def test_app_refuses_a_bad_out_dir_host_or_busy_port(places, capsys):
  common = ["--model", str(places / "no_model"), "--db", str(places / "db")]
  _one_line(capsys, lambda: app_cli.main(common + ["--out-dir", str(places / "afile")]),
            "--out-dir")
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    _one_line(capsys, lambda: app_cli.main(common + ["--port", str(port)]),
              f"--port {port} is in use")
  # TEST-NET-1 (RFC 5737): a valid address that is no interface of this machine.
  _one_line(capsys, lambda: app_cli.main(common + ["--host", "192.0.2.1"]),
            "--host 192.0.2.1 is not an address of this machine")
  assert not (places / "db").exists()


# -- dataset builder -----------------------------------------------------------------------

@pytest.mark.parametrize("data_dir, words", [
    ("{tmp}/afile", "is a file; give a directory"),
    ("{tmp}/afile/tfds", "is a file, not a directory"),
])
def test_dataset_builder_refuses_a_bad_data_dir(places, capsys, data_dir, words):
  synthetic_tfds = pytest.importorskip("persvid_jax.data.synthetic_tfds")
  _one_line(capsys, lambda: synthetic_tfds.main(
      ["--name", "tiny", "--data_dir", data_dir.format(tmp=places)]), words)
  assert (places / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("flags, words", [
    (["--image-role", "scene"], "--image-role needs --image"),
    (["--fusion", "mean"], "--fusion needs --image"),
])
def test_image_options_without_an_image_are_refused(tmp_path, capsys, flags, words):
  """They used to be ignored silently (and the video made without what they asked)."""
  from launch import generate as generate_cli
  code = generate_cli.main(["--model", str(tmp_path / "no_model"), "--prompt", "a red star",
                            "--out", str(tmp_path / "v.gif")] + flags)
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert code == 2 and len(err) == 1 and words in err[0], err
  assert not (tmp_path / "v.gif").exists()
