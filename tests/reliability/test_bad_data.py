"""Bad paths, sizes and source configs: one line, exit status 2, nothing written.

The companion of ``test_bad_input.py`` for what that file does not cover: a
``--db`` that cannot be written (a file, a path under a file, a lock that
cannot be opened), suite sizes that leave nothing to evaluate, source
``config.json`` files of the wrong shape, zero benchmark shapes and sampler
steps that used to mean "the default", and prompts with a stray ``<`` or
``>``. Every case is refused before any model is loaded (except the
``Generator`` one, which is about the constructor) and leaves the database
byte-for-byte as it was.
"""

import json
import pathlib
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from launch import bench as bench_cli
from launch import concepts as concepts_cli
from launch import convert as convert_cli
from launch import evaluate as evaluate_cli
from persvid_jax import bench
from persvid_jax.concepts import database as db_lib
from persvid_jax.convert import ConvertError
from persvid_jax.convert import clip, common, unet3d, vae
from persvid_jax.evaluate import suite
from persvid_jax.pipeline import generate as gen

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _snapshot(directory: pathlib.Path) -> dict:
  """Every file under ``directory`` (relative path -> bytes), and every directory."""
  return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
          for p in sorted(directory.rglob("*"))}


def _one_line(capsys, code, *words):
  """Asserts exit status 2 and a single ``error: ...`` line on stderr holding ``words``."""
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2, err[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  for w in words:
    assert w in lines[0], lines
  return lines[0]


@pytest.fixture(scope="module")
def stored_db(tmp_path_factory):
  """A tiny-config database holding <toy> (feature id 'abc'); copy it before damaging."""
  from persvid_jax import config_lib
  d = tmp_path_factory.mktemp("baddata") / "db"
  db = db_lib.ConceptDatabase.create(d, config_lib.load_config("tiny"), "abc")
  db.add("toy", np.ones(db.bank.ref_tokens.shape[1:], np.float32),
         np.ones(db.bank.detail_tokens.shape[1:], np.float32), [])
  return d


@pytest.fixture
def photo(tmp_path):
  path = tmp_path / "photo.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(path)
  return path


# ---- the concept database ------------------------------------------------------------

def test_add_with_a_file_as_db_is_one_line_before_the_model(tmp_path, photo, capsys):
  db_file = tmp_path / "notes.txt"
  db_file.write_text("not a database")
  t0 = time.perf_counter()
  code = concepts_cli.main(["add", "--db", str(db_file), "--name", "x",
                            "--images", str(photo)])
  _one_line(capsys, code, str(db_file), "is a file, not a directory")
  assert time.perf_counter() - t0 < 2.0            # refused before the model loads
  assert db_file.read_text() == "not a database"


def test_add_with_a_db_under_a_file_is_one_line_before_the_model(tmp_path, photo, capsys):
  (tmp_path / "notes.txt").write_text("x")
  db_dir = tmp_path / "notes.txt" / "db"
  t0 = time.perf_counter()
  code = concepts_cli.main(["add", "--db", str(db_dir), "--name", "x",
                            "--images", str(photo)])
  _one_line(capsys, code, "cannot be created", "is a file")
  assert time.perf_counter() - t0 < 2.0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "photo.png"]


def test_add_refuses_a_flat_coloured_photo_before_the_model_unless_masked(tmp_path, photo,
                                                                         capsys):
  """A blank grey card (camera noise of sigma 2 levels) has no subject to find: the
  segmentation would store an arbitrary blob. With a mask it is the user's call."""
  from persvid_jax.concepts import build
  from persvid_jax.concepts import images
  rng = np.random.default_rng(1)
  grey = tmp_path / "grey card.png"
  Image.fromarray(np.clip(np.full((240, 320, 3), 128.0) + rng.normal(0, 2, (240, 320, 3)),
                          0, 255).astype(np.uint8)).save(grey)
  db_dir = tmp_path / "db"
  t0 = time.perf_counter()
  code = concepts_cli.main(["add", "--db", str(db_dir), "--name", "x",
                            "--images", str(photo), str(grey)])
  _one_line(capsys, code, "grey card.png", "is one flat colour", "give a mask")
  assert time.perf_counter() - t0 < 2.0 and not db_dir.exists()
  mask = tmp_path / "mask.png"
  Image.fromarray(np.pad(np.full((80, 80), 255, np.uint8), ((80, 80), (120, 120)))).save(mask)
  (image, given), = build.load_photos([grey], [mask])   # masked: accepted
  assert given.shape == (240, 320) and images.flat_range(image) is not None
  # The rule is far from photos of things: a random photo and a real one pass.
  dreambench = sorted(pathlib.Path(__file__).resolve().parents[3].glob(
      "shared/dreambench/dog/*.jpg"))[:1]
  assert len(build.load_photos([photo, *dreambench])) == 1 + len(dreambench)
  assert images.flat_range(np.full((9, 9, 3), 7, np.uint8)) == 0


def test_check_writable_refuses_files_and_accepts_new_directories(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(db_lib.DatabaseError, match="is a file, not a directory"):
    db_lib.check_writable(tmp_path / "f")
  with pytest.raises(db_lib.DatabaseError, match="cannot be created"):
    db_lib.check_writable(tmp_path / "f" / "a" / "b")
  db_lib.check_writable(tmp_path / "new" / "db")   # created on the first add
  db_lib.check_writable(tmp_path)
  assert not (tmp_path / "new").exists()           # the check writes nothing


# An unwritable database, as root: the lock file cannot be opened for writing
# (here a directory stands where it belongs; chattr +i gives the same error
# path, EPERM instead of EISDIR, and is not used so that nothing is left
# immutable if a test dies).
@pytest.mark.parametrize("command", ["remove", "restore", "add-library"])
def test_write_to_an_unwritable_database_is_one_line_and_changes_nothing(
    stored_db, tmp_path, capsys, command):
  d = tmp_path / "db"
  shutil.copytree(stored_db, d)
  (d / db_lib.LOCK_FILE).unlink()
  (d / db_lib.LOCK_FILE).mkdir()
  before = _snapshot(d)
  if command == "remove":
    code = concepts_cli.main(["remove", "--db", str(d), "--name", "toy"])
    _one_line(capsys, code, str(d), "is not writable")
  elif command == "restore":
    code = concepts_cli.main(["restore", "--db", str(d), "--step", "0"])
    _one_line(capsys, code, str(d), "is not writable")
  else:
    db = db_lib.ConceptDatabase.open(d)
    with pytest.raises(db_lib.DatabaseError, match="is not writable") as info:
      db.add("new", np.ones(db.bank.ref_tokens.shape[1:], np.float32),
             np.ones(db.bank.detail_tokens.shape[1:], np.float32), [])
    assert "\n" not in str(info.value)
    assert sorted(db.concepts) == ["toy"]          # the object's state is unchanged too
  assert _snapshot(d) == before


# ---- evaluation suite sizes ----------------------------------------------------------

@pytest.mark.parametrize("override, words", [
    ("subjects=0", "subjects=0"),
    ("subjects=1000", "subjects=1000"),
    ("photos=0", "photos=0"),
    ("prompts=0", "prompts=0"),
    ("seeds=()", "seeds=()"),
    ("photo_size=0", "photo_size=0"),
    ("steps=-2", "steps=-2"),
])
def test_evaluate_refuses_empty_suites_before_the_model(tmp_path, capsys, override, words):
  out = tmp_path / "r.json"
  t0 = time.perf_counter()
  code = evaluate_cli.main(["--config", str(ROOT / "configs/eval.py") + ":size=tiny",
                            "--out", str(out), f"--config.suite.{override}"])
  _one_line(capsys, code, "config.suite", words)
  assert time.perf_counter() - t0 < 2.0
  assert list(tmp_path.iterdir()) == []


def test_suite_config_refuses_nothing_to_run_and_accepts_the_smallest_suite():
  for bad in (dict(seeds=()), dict(photos=0), dict(sr_steps=0)):
    with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
      suite.SuiteConfig(**bad)
  cfg = suite.SuiteConfig(subjects=1, prompts=1, seeds=(0,), photos=1, photo_size=8,
                          steps=1, sr_steps=None)
  assert cfg.subjects == 1 and cfg.seeds == (0,)


# ---- converter source configs --------------------------------------------------------

def _src(tmp_path, config) -> pathlib.Path:
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(config))
  return src


@pytest.mark.parametrize("kind, config, words", [
    ("clip", {"model_type": "clip_text_model", "vocab_size": None}, "vocab_size=null"),
    ("clip", {"text_config": {"hidden_size": "512"}, "vision_config": {}},
     "text_config.hidden_size=\"512\""),
    ("clip", {"text_config": [1, 2]}, "text_config is not an object"),
    ("vae", [1, 2, 3], "holds a JSON list"),
    ("unet3d", ["UNet3DConditionModel"], "holds a JSON list"),
    ("unet3d", {"_class_name": "UNet3DConditionModel", "block_out_channels": None},
     "block_out_channels=null"),
])
def test_convert_refuses_malformed_config_json(tmp_path, capsys, kind, config, words):
  src, out = _src(tmp_path, config), tmp_path / "out"
  t0 = time.perf_counter()
  code = convert_cli.main(["--kind", kind, "--src", str(src), "--out", str(out)])
  _one_line(capsys, code, words)
  assert time.perf_counter() - t0 < 2.0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("read, config, words", [
    (lambda hf: clip.image_config(hf), {"model_type": "clip_vision_model", "patch_size": 0},
     "patch_size=0"),
    (lambda hf: clip.text_config(hf), {"model_type": "clip_text_model",
                                       "layer_norm_eps": None}, "layer_norm_eps=null"),
    (vae.vae_config, {"_class_name": "AutoencoderKL", "latent_channels": 4.5},
     "latent_channels=4.5"),
    (vae.vae_config, {"_class_name": "AutoencoderKL", "use_quant_conv": "false"},
     "use_quant_conv=\"false\""),
    (vae.vae_config, {"_class_name": "AutoencoderKL", "block_out_channels": None},
     "block_out_channels=null"),
    (unet3d.unet_config, {"_class_name": "UNet3DConditionModel", "layers_per_block": True},
     "layers_per_block=true"),
    (unet3d.unet_config, {"_class_name": "UNet3DConditionModel", "down_block_types": None},
     "down_block_types=null"),
])
def test_architecture_fields_of_the_wrong_type_name_the_field(tmp_path, read, config, words):
  with pytest.raises(ConvertError) as info:
    read(common.read_config(_src(tmp_path, config)))
  assert words in str(info.value) and "\n" not in str(info.value)


def test_fractional_sizes_are_refused_and_integral_floats_still_convert():
  with pytest.raises(ConvertError, match=r"hidden_size=512.5: it must be an integer"):
    clip.text_config({"model_type": "clip_text_model", "hidden_size": 512.5})
  # 512.0 from some exporters is 512; a missing field is the library's default.
  t = clip.text_config({"model_type": "clip_text_model", "hidden_size": 512.0})
  assert t["width"] == 512 and isinstance(t["width"], int) and t["vocab_size"] == 49408


# ---- benchmark shapes and sampler steps: 0 is not "the default" ----------------------

@pytest.mark.parametrize("flag", ["--batch", "--frames", "--size", "--text-len"])
def test_bench_refuses_zero_shapes(capsys, flag):
  with pytest.raises(SystemExit) as info:    # refused by the flag's type, while parsing
    bench_cli.main(["--config", "tiny", flag, "0", "--which", "train"])
  _one_line(capsys, info.value.code, f"argument {flag}: 0 must be an integer >= 1")


def test_bench_shapes_take_only_none_as_the_default(tiny_config):
  with pytest.raises(bench.BenchError, match="--frames must be >= 1, got 0"):
    bench.default_shapes(tiny_config, frames=0)
  s = bench.default_shapes(tiny_config, batch=None, frames=2)
  assert s.batch == bench.TRAIN_BATCH and s.frames == 2


@pytest.mark.parametrize("steps, sr_steps, name", [(0, None, "steps=0"), (None, 0, "sr_steps=0"),
                                                   (-1, 2, "steps=-1")])
def test_sampler_steps_refuse_zero(tiny_config, steps, sr_steps, name):
  with pytest.raises(gen.GenerationError, match=name):
    gen.sampler_steps(steps, sr_steps, tiny_config.diffusion)
  d = tiny_config.diffusion
  assert gen.sampler_steps(None, None, d)[0] == d.sample_steps
  assert gen.sampler_steps(3, None, d) == (3, d.get("sr_sample_steps") or 3)


def test_generator_refuses_zero_steps(micro_model):
  with pytest.raises(gen.GenerationError, match="steps=0"):
    gen.Generator(micro_model, steps=0)
  with pytest.raises(gen.GenerationError, match="sr_steps=0"):
    gen.Generator(micro_model, sr_steps=0)


# ---- prompts: a stray '<' or '>' is a mistyped concept -------------------------------

@pytest.mark.parametrize("prompt, words", [
    ("a <sub1 moving left", "unclosed '<' at character 3 of the prompt: '<sub1 moving left'"),
    ("a sub1> moving left", "unmatched '>' at character 7"),
    ("a <sub 1> moving left", "unclosed '<' at character 3"),
    ("a <sub1> and <<sub1>>", "unclosed '<' at character 14"),
    ("a <sub1> moving left <", "unclosed '<' at character 22"),
])
def test_prompts_with_a_stray_bracket_are_refused(prompt, words):
  with pytest.raises(gen.GenerationError) as info:
    gen.request_mode(prompt, {"sub1": 0}, has_image=False)
  assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("prompt, mode", [
    ("a <sub1> moving left", "concept"), ("<sub1>", "concept"),
    ("a <sub1>, then <sub1> again", "concept"), ("a red star moving left", "text"),
    ("", "text"),
])
def test_prompts_without_stray_brackets_still_parse(prompt, mode):
  assert gen.request_mode(prompt, {"sub1": 0}, has_image=False)[0] == mode
  assert gen.concept_names(prompt) == gen._NAME_RE.findall(prompt)


def test_generate_cli_refuses_a_stray_bracket_before_loading_the_model(tmp_path, capsys):
  """The CLI checks the prompt first: a model path that does not exist would be
  the error otherwise, after seconds of loading with a real one."""
  from launch import generate as generate_cli
  t0 = time.perf_counter()
  code = generate_cli.main(["--model", str(tmp_path / "no_model"), "--prompt",
                            "a <sub1 moving left", "--out", str(tmp_path / "v.gif")])
  _one_line(capsys, code, "unclosed '<' at character 3")
  assert time.perf_counter() - t0 < 2.0
  assert not (tmp_path / "v.gif").exists()
