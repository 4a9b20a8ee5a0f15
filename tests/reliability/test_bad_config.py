"""Bad configs, variants, overrides and workdirs through config_lib and the CLIs.

Every case is refused with one line ``error: ...`` (exit status 2 at the CLI)
before any model is built or compiled, and leaves nothing behind: no
workdir, no run record, no checkpoints. The CLIs run in-process.
"""

import pathlib
import time

import pytest

from launch import model_info as model_info_cli
from launch import sweep as sweep_cli
from launch import train as train_cli
from persvid_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def files(tmp_path, monkeypatch):
  """Bad inputs under ``tmp_path`` (cwd: the repository root, as documented)."""
  monkeypatch.chdir(ROOT)
  (tmp_path / "afile").write_text("not a directory")
  (tmp_path / "notes.txt").write_text("not a config")
  (tmp_path / "folder").mkdir()
  (tmp_path / "syntax.py").write_text("def get_config(arg=None)\n  return None\n")
  (tmp_path / "raises.py").write_text("def get_config(arg=None):\n  return {}['x']\n")
  # Loads, but a network refuses it (the model's own ValueError).
  (tmp_path / "badnet.py").write_text(
      "from persvid_jax import config_lib\n"
      "tiny = config_lib.import_config_module('tiny')\n"
      "def get_config(arg=None):\n"
      "  c = tiny.get_config()\n"
      "  c.unet.spatial_kernel_size = 0\n"
      "  return c\n")
  return tmp_path


def _listing(directory: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _one_line(capsys, code, words, t0):
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2, (code, err)
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  assert "Traceback" not in err and words in lines[0], lines
  assert time.perf_counter() - t0 < 2.0          # refused before anything is built


# ---- config_lib --------------------------------------------------------------------

def test_boolean_variants_are_read_as_words():
  # bool("false") is True: bf16=false and bf16=no used to switch bfloat16 on.
  for value, bf16 in [("false", False), ("no", False), ("NO", False), ("0", False),
                      ("False", False), ("true", True), ("Yes", True), ("1", True)]:
    assert config_lib.parse_arg(f"bf16={value}", bf16=not bf16).bf16 is bf16, value
  assert config_lib.load_config("tiny:bf16=false").dtype == "float32"
  assert config_lib.load_config("tiny:bf16=yes").dtype == "bfloat16"
  assert config_lib.load_config("tiny:bf16").dtype == "bfloat16"        # a bare word: true


@pytest.mark.parametrize("spec, words", [
    ("tiny:bf16=maybe", "'bf16' is true or false, got 'maybe'"),
    ("tiny:bf16=2", "'bf16' is true or false"),
    ("tiny:sr_kernel=abc", "'sr_kernel' takes an integer, got 'abc'"),
    ("tiny:sr_kernel=2.5", "'sr_kernel' takes an integer"),
    ("modelscope:detail=maybe", "'detail' takes an integer, got 'maybe'"),
    ("demo:subject_weight=heavy", "'subject_weight' takes a number"),
    ("tiny:stage", "'stage' needs a value"),
    ("tiny:sr_kernel=0", "sr_kernel=0 must be >= 1"),
    ("modelscope:sr_dilation=-1", "sr_dilation=-1 must be >= 1"),
])
def test_variants_of_the_wrong_type_are_config_errors(spec, words):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.load_config(spec)
  assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("override, words", [
    ("train.total_steps.x=5", "'train.total_steps' is a value (int)"),
    ("train.stage.a.b=1", "'train.stage' is a value (str)"),
])
def test_an_override_below_a_plain_value_names_the_key(tiny_config, override, words):
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.apply_overrides(tiny_config, [override])
  assert words in str(info.value)


def test_config_paths_say_what_is_wrong(files):
  cases = [
      ("configs/tiny", "did you mean 'configs/tiny.py' or the name 'tiny'"),
      ("tiny.py", "did you mean 'configs/tiny.py' or the name 'tiny'"),
      (str(files / "notes.txt"), "is not a .py config file"),
      (str(files / "folder"), "is a directory, not a config file"),
      (str(files / "nothere.py"), "not found; known configs: ["),
      (str(files / "syntax.py"), "failed to load: SyntaxError"),
      (str(files / "raises.py"), "get_config(None) failed: KeyError"),
  ]
  for spec, words in cases:
    with pytest.raises(config_lib.ConfigError) as info:
      config_lib.load_config(spec)
    assert words in str(info.value) and "\n" not in str(info.value), (spec, str(info.value))
    assert "configs/configs" not in str(info.value)


def test_the_jax_free_copies_match_the_code():
  from persvid_jax.pipeline import model as model_lib
  from persvid_jax.train import stages
  assert config_lib.TRAIN_STAGES == stages.STAGES
  assert config_lib._MODEL_WEIGHTS == model_lib.WEIGHTS_FILE


# ---- launch.train ------------------------------------------------------------------

_TRAIN = [
    (["--config.train.total_steps.x=5"], "is a value (int)"),
    (["--config.train.stage=bogus"], "config.train.stage='bogus'"),
    (["--config.train.batch_size=0"], "config.train.batch_size=0 must be an integer >= 1"),
    (["--config.train.total_steps=-5"], "config.train.total_steps=-5 must be"),
    (["--config.train.total_steps=0"], "config.train.total_steps=0 must be"),
    (["--config.train.learning_rate=-0.1"], "config.train.learning_rate=-0.1 must be"),
    (["--config.train.log_every_steps=0"], "config.train.log_every_steps=0 must be"),
    (["--config.train.checkpoint_every_steps=-1"], "checkpoint_every_steps=-1 must be"),
    (["--config.train.ema_decay=1.5"], "config.train.ema_decay=1.5 must be in [0, 1]"),
    (["--config.train.batch_size=3"], "must be divisible by the 8 data-parallel devices"),
    (["--config.train.init_from={tmp}/nothere"], "init_from='{tmp}/nothere' does not exist"),
    (["--config.train.init_from={tmp}/folder"], "is no training workdir"),
    (["--config.data.source=folder", "--config.data.folder={tmp}/nothere"],
     "config.data.folder='{tmp}/nothere' does not exist"),
    (["--config.data.source=folder"], "config.data.folder is unset"),
    (["--workdir", "{tmp}/afile"], "--workdir {tmp}/afile is a file"),
    (["--workdir", "{tmp}/afile/w"], "{tmp}/afile is a file, not a directory"),
]


@pytest.mark.parametrize("argv, words", _TRAIN)
def test_train_refuses_bad_config_before_touching_the_workdir(files, capsys, argv, words):
  argv = [a.format(tmp=files) for a in argv]
  workdir = files / "run"
  if "--workdir" not in argv:
    argv = ["--workdir", str(workdir)] + argv
  before = _listing(files)
  t0 = time.perf_counter()
  code = train_cli.main(["--config", "configs/tiny.py:micro", "--no-progress"] + argv)
  _one_line(capsys, code, words.format(tmp=files), t0)
  assert _listing(files) == before and not workdir.exists()


def test_train_library_refuses_a_bad_config_before_the_checkpoints(files, tiny_config):
  from persvid_jax.train import loop
  config = config_lib.apply_overrides(tiny_config, ["train.total_steps=0"])
  with pytest.raises(config_lib.ConfigError, match="total_steps=0"):
    loop.train_and_evaluate(config, files / "run", progress=False)
  assert not (files / "run").exists()


# ---- launch.model_info -------------------------------------------------------------

@pytest.mark.parametrize("spec, words", [
    ("configs/tiny.py:sr_kernel=abc", "'sr_kernel' takes an integer"),
    ("configs/modelscope.py:detail=maybe", "'detail' takes an integer"),
    ("configs/tiny.py:sr_kernel=0", "sr_kernel=0 must be >= 1"),
    ("configs/tiny.py:sr_dilation=0", "sr_dilation=0 must be >= 1"),
    ("configs/tiny.py:bf16=perhaps", "'bf16' is true or false"),
    ("configs/tiny", "did you mean 'configs/tiny.py'"),
    ("{tmp}/notes.txt", "not a .py config file"),
    ("{tmp}/folder", "is a directory"),
    ("{tmp}/syntax.py", "SyntaxError"),
    ("{tmp}/raises.py", "KeyError"),
    ("{tmp}/badnet.py", "spatial_kernel_size and spatial_dilation must be >= 1"),
])
def test_model_info_bad_config_exits_2_with_one_line(files, capsys, spec, words):
  t0 = time.perf_counter()
  code = model_info_cli.main(["--config", spec.format(tmp=files)])
  _one_line(capsys, code, words, t0)


# ---- launch.sweep ------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["--grid", "train.total_steps=-1,0"], "config.train.total_steps=-1 must be"),
    (["--grid", "train.total_steps.x=1"], "is a value (int)"),
    (["--grid", "train.stage='base','bogus'"], "config.train.stage='bogus'"),
    (["--grid", "seed=0,1", "--config.train.batch_size=0"], "batch_size=0 must be"),
    (["--grid", "train.total_steps=1", "--workdir", "{tmp}/afile"], "is a file"),
    (["--grid", "train.total_steps=1", "--workdir", "{tmp}/afile/w"], "cannot be created"),
    (["--grid", "train.total_steps=1", "--workdir", "{tmp}/afile/w", "--mode", "collect"],
     "cannot be created"),
])
def test_sweep_refuses_bad_points_and_workdirs_before_running(files, capsys, argv, words):
  argv = [a.format(tmp=files) for a in argv]
  if "--workdir" not in argv:
    argv += ["--workdir", str(files / "sweep")]
  before = _listing(files)
  t0 = time.perf_counter()
  code = sweep_cli.main(["--config", "configs/tiny.py:micro"] + argv)
  _one_line(capsys, code, words, t0)
  assert _listing(files) == before


# ---- usage errors: one line too ------------------------------------------------------

@pytest.mark.parametrize("module", ["app", "bench", "concepts", "convert", "demo", "evaluate",
                                    "export", "generate", "model_info", "sweep", "train"])
def test_a_mistyped_flag_is_one_line_naming_help(module, capsys):
  """argparse would print its usage block first; every CLI says it in one line."""
  import importlib
  cli = importlib.import_module(f"launch.{module}")
  with pytest.raises(SystemExit) as info:
    cli.main(["--bogus-flag"])
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert info.value.code == 2
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert f"(see python -m launch.{module} --help)" in err[0]


@pytest.mark.parametrize("spec", ["tiny:swap_at=middle", "modelscope:swap_at=inptu",
                                  "demo:swap_at=Output"])
def test_an_unknown_swap_site_is_refused_by_the_config(spec):
  """The swap site is 'input' or 'output'; anything else used to reach the model."""
  from persvid_jax import config_lib
  with pytest.raises(config_lib.ConfigError, match="swap_at=.*use one of input, output"):
    config_lib.load_config(spec)
  for good in ("input", "output"):
    config_lib.load_config(spec.split(":")[0] + f":swap_at={good}")
