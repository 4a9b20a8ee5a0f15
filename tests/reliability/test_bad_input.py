"""Bad input through the library and the CLIs (in-process: no subprocess per case).

Images of every awkward kind, concept names, prompts and flags. Each bad case
is refused with one line that names the problem (exit status 2 at the CLI)
before any model is loaded, and the database stays byte-for-byte as it was;
the awkward-but-valid ones (CMYK, animated GIF, a long prompt) have a
documented handling that is checked here.
"""

import logging
import pathlib
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from launch import concepts as concepts_cli
from launch import generate as generate_cli
from persvid_jax.concepts import database as db_lib
from persvid_jax.concepts import images
from persvid_jax.concepts.tokens import PromptTokenizer


def _png_claiming(path: pathlib.Path, width: int, height: int) -> pathlib.Path:
  """A ~60-byte PNG whose header claims ``width x height`` (a decompression bomb)."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                   + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
  return path


@pytest.mark.parametrize("width, height", [(12_000, 12_000), (40_000, 40_000)])
def test_decompression_bomb_is_refused_from_its_header(tmp_path, width, height):
  # 144 MP: PIL would only warn and decode (432 MB); 1.6 GP: PIL's own error.
  path = _png_claiming(tmp_path / "bomb.png", width, height)
  t0 = time.perf_counter()
  with pytest.raises(images.ImageError) as info:
    images.load_image(path)
  assert time.perf_counter() - t0 < 1.0                 # nothing was decoded
  message = str(info.value)
  assert str(path) in message and "\n" not in message
  assert "downscale it first" in message and "truncated" not in message


def test_awkward_images_load_or_are_refused(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (16, 12, 3), dtype=np.uint8)
  # CMYK (print workflows): converted to RGB.
  Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
  out = images.load_image(tmp_path / "cmyk.jpg")
  assert out.shape == (16, 12, 3) and out.dtype == np.uint8
  assert np.abs(out.astype(int) - rgb).mean() < 20      # the same picture (JPEG-lossy)
  # An animated GIF given as a photo: its first frame.
  frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
  frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:],
                 duration=100, loop=0)
  out = images.load_image(tmp_path / "anim.gif")
  assert out.shape == (16, 16, 3) and tuple(out[8, 8]) == (255, 0, 0)
  # 16-bit grayscale with most values above 255: rescaled, not clipped to white.
  Image.fromarray(np.full((10, 10), 30000, np.uint16)).save(tmp_path / "deep.png")
  assert 110 < images.load_image(tmp_path / "deep.png")[0, 0, 0] < 125
  # Refused, one line each: 1x1, an empty file.
  Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
  with pytest.raises(images.ImageError, match=r"is 1x1 pixels; it needs at least 8"):
    images.load_image(tmp_path / "dot.png")
  (tmp_path / "empty.jpg").write_bytes(b"")
  with pytest.raises(images.ImageError, match=r"empty file \(0 bytes\)"):
    images.load_image(tmp_path / "empty.jpg")
  with pytest.raises(images.ImageError, match=r"mask .*empty file"):
    images.load_mask(tmp_path / "empty.jpg", (16, 16))


@pytest.mark.parametrize("name", ["dog\n", "do\tg", "dog\x00", "\x1b[31mdog", "café",
                                  "ｄｏｇ", "dоg", "a/../b", "C:dog", " dog", "dog "])
def test_control_characters_and_non_ascii_names_are_refused(name):
  with pytest.raises(db_lib.DatabaseError, match="invalid"):
    db_lib.validate_name(name)


def test_a_long_prompt_is_truncated_with_a_warning(tiny_config, caplog):
  tok = PromptTokenizer.from_config(tiny_config)
  n = tiny_config.text.max_length
  prompt = "a <c0> " + " ".join(["red"] * n)
  with caplog.at_level(logging.WARNING, logger="persvid_jax.concepts.tokens"):
    ids = tok.encode(prompt)
  assert ids.shape == (1, n) and ids[0, -1] == tok.eos_id          # EOS still ends it
  assert tok.truncated == 1
  ours = lambda: [r for r in caplog.records if r.name == "persvid_jax.concepts.tokens"]
  [record] = ours()
  assert "truncated" in record.getMessage() and f"over the text encoder's {n}" in \
      record.getMessage()
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="persvid_jax.concepts.tokens"):
    for _ in range(10):                                 # a corpus: reported a few times
      tok.encode(prompt)
  assert tok.truncated == 11 and len(ours()) == 4
  assert "not reported" in ours()[-1].getMessage()
  short = tok.encode("a <c0> moving left")                          # no warning, no count
  assert tok.truncated == 11 and short[0, 4 + tiny_config.concepts.ref_tokens] == tok.eos_id


def _snapshot(directory: pathlib.Path) -> dict:
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
          if p.is_file()}


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
  """A database holding <toy> (features of feature id 'abc'), and bad files."""
  from persvid_jax import config_lib
  tmp = tmp_path_factory.mktemp("badcli")
  config = config_lib.load_config("tiny")
  db = db_lib.ConceptDatabase.create(tmp / "db", config, "abc")
  db.add("toy", np.ones(db.bank.ref_tokens.shape[1:], np.float32),
         np.ones(db.bank.detail_tokens.shape[1:], np.float32), [])
  good = tmp / "good.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(good)
  files = dict(good=good, bomb=_png_claiming(tmp / "bomb.png", 12_000, 12_000),
               empty=tmp / "empty.png", dot=tmp / "dot.png", text=tmp / "notes.jpg",
               folder=tmp / "photos")
  files["empty"].write_bytes(b"")
  Image.new("RGB", (1, 1)).save(files["dot"])
  files["text"].write_text("not a picture")
  files["folder"].mkdir()
  return tmp, db.directory, files


# (argv after the common part, words the one line must hold)
_ADD = [
    (["--name", "new", "--images", "{bomb}"], "megapixel limit"),
    (["--name", "new", "--images", "{empty}"], "empty file"),
    (["--name", "new", "--images", "{dot}"], "1x1 pixels"),
    (["--name", "new", "--images", "{text}"], "not an image"),
    (["--name", "new", "--images", "{folder}"], "is a directory"),
    (["--name", "new", "--images", "{good}", "{tmp}/missing.png"], "does not exist"),
    (["--name", "new", "--images", "{good}", "--masks", "{empty}"], "mask"),
    (["--name", "", "--images", "{good}"], "empty"),
    (["--name", "x" * 33, "--images", "{good}"], "at most 32"),
    (["--name", "../up", "--images", "{good}"], "invalid"),
    (["--name", "a\nb", "--images", "{good}"], "invalid"),
    (["--name", "café", "--images", "{good}"], "invalid"),
    (["--name", "toy", "--images", "{good}"], "already exists"),
    (["--name", "c0", "--images", "{good}"], "reserved"),
]
_GENERATE = [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "   "], "--prompt is empty"),
    (["--prompt", "a <toy>", "--steps", "0"], "--steps: 0 must be an integer >= 1"),
    (["--prompt", "a <toy>", "--sr-steps", "-3"], "--sr-steps: -3 must be an integer >= 1"),
    (["--prompt", "a <toy>", "--guidance", "-1"], "--guidance: -1 must be a finite number >= 0"),
    (["--prompt", "a <toy>", "--detail-guidance", "nan"], "--detail-guidance: nan must be"),
    (["--prompt", "a <toy>", "--scale", "0"], "--scale: 0 must be an integer >= 1"),
    (["--prompt", "a <toy>", "--seed", "4294967296"], "--seed: 4294967296 must be"),
    (["--prompt", "a <toy>", "--image", "{bomb}"], "megapixel limit"),
    (["--prompt", "a <toy>", "--image", "{folder}"], "is a directory"),
    (["--prompt", "a <toy>", "--image", "{empty}"], "empty file"),
    (["--prompt", "a <toy>", "--image", "{good}", "--mask", "{dot}"], "1x1 pixels"),
    (["--prompt", "a <cat>", "--db", "{tmp}/nodb"], "not a concept database"),
]


@pytest.mark.parametrize("cli, argv, words",
                         [("concepts", a, w) for a, w in _ADD]
                         + [("generate", a, w) for a, w in _GENERATE])
def test_cli_bad_input_exits_2_with_one_line(cli_setup, capsys, cli, argv, words):
  tmp, db_dir, files = cli_setup
  fmt = lambda a: a.format(tmp=tmp, **files) if "{" in a else a
  argv = [fmt(a) for a in argv]
  before = _snapshot(db_dir)
  try:
    if cli == "concepts":
      code = concepts_cli.main(["add", "--db", str(db_dir)] + argv)
    else:
      if "--db" not in argv:
        argv += ["--db", str(db_dir)]
      code = generate_cli.main(argv + ["--out", str(tmp / "v.gif"), "--no-progress"])
  except SystemExit as e:       # a flag out of its range: argparse exits itself
    code = e.code
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2, (argv, code, err)
  assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
  assert _snapshot(db_dir) == before and not (tmp / "v.gif").exists()
