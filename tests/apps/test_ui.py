"""The UI (claims 13-14): the Studio logic, and the page in a real headless Chromium.

The browser test needs Debian's ``chromium`` (``.ci/run`` installs it with apt)
and Playwright from PyPI; Playwright drives the system browser
(``executable_path``), it downloads none. A screenshot of the page after each
stage is written to ``$PERSVID_TEST_ARTIFACTS`` (default: the system temp dir's
``persvid_test_artifacts``). Set ``PERSVID_SKIP_BROWSER=1`` to skip the browser
test on a machine without Chromium; it is never skipped silently.
"""

import glob
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jax
import pytest
from PIL import Image

from persvid_jax.apps import ui

ROOT = pathlib.Path(__file__).resolve().parents[2]
PHOTOS = ROOT / "persvid_jax" / "assets" / "demo_photos"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_match_typed_names():
  assert ui.match_typed_names("a sub1 on snow", ["sub1"]) == ("a <sub1> on snow", ["sub1"])
  # whole words only, case-insensitive, brackets left alone, longest name first
  assert ui.match_typed_names("a sub10 on snow", ["sub1"]) == ("a sub10 on snow", [])
  assert ui.match_typed_names("a <sub1> and SUB1", ["sub1"]) == ("a <sub1> and <sub1>", ["sub1"])
  assert ui.match_typed_names("a dog_2 and a dog", ["dog", "dog_2"]) == (
      "a <dog_2> and a <dog>", ["dog_2", "dog"])


def test_insert_concept():
  assert ui.insert_concept("", "sub1") == "a <sub1>"
  assert ui.insert_concept("a dog next to", "sub1") == "a dog next to <sub1>"
  assert ui.insert_concept("a <sub1> on snow", "sub1") == "a <sub1> on snow"


@pytest.fixture(scope="module")
def studio_db(micro_model, tmp_path_factory):
  """A Studio over the micro model with one concept added through it."""
  root = tmp_path_factory.mktemp("ui")
  studio = ui.Studio(micro_model, root / "db", root / "out", steps=2, sr_steps=2)
  assert studio.names() == []
  msg = studio.add("sub1", sorted(glob.glob(str(PHOTOS / "sub1_*.png"))))
  assert "added <sub1>" in msg
  return studio, root


def test_studio_describe_generate_and_errors(studio_db):
  studio, _ = studio_db
  assert studio.names() == ["sub1"]
  # The button's picture: the first photo, small, kept in the database.
  thumbs = studio.thumbnails()
  assert list(thumbs) == ["sub1"] and thumbs["sub1"].parent == studio.db_dir / "thumbnails"
  with Image.open(thumbs["sub1"]) as im:
    assert max(im.size) <= 96 and im.mode == "RGB"
  assert "**mode:** concept" in studio.describe("a sub1 on snow", False)
  assert "`sub1` → `<sub1>`" in studio.describe("a sub1 on snow", False)
  assert "**mode:** concept+scene" in studio.describe("a <sub1> on snow", True, "scene")
  assert "cannot generate" in studio.describe("a <nope> on snow", False)
  # progress=True: the program the app compiles (a cache hit for the browser test)
  out = studio.generate("a sub1 moving left on grass", progress=True)
  assert out.mode == "concept" and out.prompt == "a <sub1> moving left on grass"
  assert out.path.stat().st_size > 0
  sheet = studio.preview([str(PHOTOS / "sub1_a.png")])
  assert sheet.ndim == 3 and sheet.shape[2] == 3 and (sheet[..., 0] == 255).any()
  from persvid_jax.concepts.database import DatabaseError
  from persvid_jax.concepts.images import ImageError
  from persvid_jax.pipeline.generate import GenerationError
  with pytest.raises(DatabaseError):
    studio.add("sub1", [str(PHOTOS / "sub2_a.png")])          # duplicate name
  with pytest.raises(DatabaseError):
    studio.add("../x", [str(PHOTOS / "sub2_a.png")])          # invalid name
  with pytest.raises(ImageError):
    studio.add("sub2", [])
  with pytest.raises(GenerationError):
    studio.generate("   ")
  assert studio.names() == ["sub1"]


def test_adding_reuses_the_previews_segmentation(micro_model, tmp_path, monkeypatch):
  """A photo previewed (its mask shown) is not segmented again when added, and
  the stored features are those of segmenting it then."""
  import numpy as np
  from persvid_jax.concepts import build
  studio = ui.Studio(micro_model, tmp_path / "db", tmp_path / "out", steps=2, sr_steps=2)
  seen, shown = str(PHOTOS / "sub2_a.png"), str(PHOTOS / "sub2_b.png")
  studio.preview([seen])
  segmented = []
  real = build.segment
  monkeypatch.setattr(build, "segment",
                      lambda image, *a, **k: segmented.append(image.shape) or real(image, *a, **k))
  assert "added <sub2>" in studio.add("sub2", [seen, shown])
  assert len(segmented) == 1          # only the photo the preview did not see
  monkeypatch.setattr(build, "segment", real)
  fresh = build.encode_concept(micro_model, build.load_photos([seen, shown]))
  db = studio._open()
  slot = db.slot_of("sub2")
  np.testing.assert_allclose(np.asarray(db.bank.ref_tokens[slot], np.float32),
                             fresh.ref_tokens, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(db.bank.detail_tokens[slot], np.float32),
                             fresh.detail_tokens, rtol=1e-5, atol=1e-6)
  photos = build.load_photos([seen])
  with pytest.raises(ValueError, match="2 references for 1 photos"):
    build.encode_concept(micro_model, photos, references=[None, None])
  small = build.reference_from_crop(
      build.subject_lib.segment_subject(photos[0][0], size=8))
  with pytest.raises(ValueError, match="reference crop of shape"):
    build.encode_concept(micro_model, photos, references=[small])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _artifacts() -> pathlib.Path:
  d = pathlib.Path(os.environ.get("PERSVID_TEST_ARTIFACTS",
                                  pathlib.Path(tempfile.gettempdir()) / "persvid_test_artifacts"))
  d.mkdir(parents=True, exist_ok=True)
  return d


def _expect_thumbnails(page, expect, names):
  """Every concept button shows one picture (its first photo), loaded by the browser."""
  expect(page.locator("button.concept-button")).to_have_count(len(names))
  for name in names:
    img = page.locator("button.concept-button", has_text=f"<{name}>").locator("img")
    expect(img).to_have_count(1)
    img.evaluate("i => i.complete || new Promise(r => i.addEventListener('load', r))")
    assert img.evaluate("i => i.naturalWidth") > 0, name


@pytest.mark.slow
def test_browser_end_to_end(studio_db, micro_model_dir):
  """Click a concept, generate, see a playable video; add a concept, see its button."""
  if os.environ.get("PERSVID_SKIP_BROWSER") == "1":
    pytest.skip("PERSVID_SKIP_BROWSER=1")
  assert os.path.exists(CHROMIUM), "install Debian's chromium (apt-get install chromium)"
  from playwright.sync_api import expect, sync_playwright
  _, root = studio_db
  port = _free_port()
  log = open(root / "app.log", "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "launch.app", "--port", str(port), "--db", str(root / "db"),
       "--model", str(micro_model_dir), "--steps", "2", "--sr-steps", "2",
       "--out-dir", str(root / "app_out")],
      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
      # The tests' compilation cache: the app's programs were compiled by studio_db.
      env={**os.environ, "PERSVID_JAX_CACHE": jax.config.jax_compilation_cache_dir})
  shots = _artifacts()
  try:
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
      assert proc.poll() is None, (root / "app.log").read_text()
      try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        break
      except OSError:
        time.sleep(0.5)
    with sync_playwright() as pw:
      browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                   args=["--no-sandbox"])
      page = browser.new_page(viewport={"width": 1280, "height": 1000})
      # Compilation on a loaded 2-core machine takes a while; expect() has its
      # own 5 s default.
      page.set_default_timeout(120_000)
      expect.set_options(timeout=120_000)
      page.goto(url)
      # Claim 13: one button per stored concept; a click puts <name> in the prompt.
      button = page.locator("button.concept-button", has_text="<sub1>")
      expect(button).to_have_count(1)
      _expect_thumbnails(page, expect, ["sub1"])
      prompt = page.locator("#prompt textarea")
      prompt.fill("a")
      button.click()
      expect(prompt).to_have_value("a <sub1>")
      prompt.press_sequentially(" moving left on grass")
      expect(page.locator("#mode")).to_contain_text("mode: concept")
      # Claim 14: a typed name selects its concept, and the page says so.
      prompt.fill("a sub1 moving up on snow")
      expect(page.locator("#mode")).to_contain_text("sub1 → <sub1>")
      page.locator("#generate").click()
      expect(page.locator("#status")).to_contain_text("mode concept", timeout=300_000)
      video = page.locator("#video video")
      expect(video).to_have_count(1)
      # Playable: the browser decoded the MP4's metadata (duration, size).
      page.wait_for_function(
          "() => { const v = document.querySelector('#video video');"
          " return v && v.readyState >= 1 && v.duration > 0 && v.videoWidth > 0; }")
      src = video.get_attribute("src")
      assert src and ".mp4" in src, src
      page.screenshot(path=str(shots / "ui_generated.png"), full_page=True)

      # The add-concept panel: photos -> mask preview -> a new button.
      page.get_by_text("Add a concept").click()
      page.locator("#new-name textarea, #new-name input").first.fill("sub2")
      page.locator("#new-photos input[type=file]").set_input_files(
          [str(PHOTOS / "sub2_a.png"), str(PHOTOS / "sub2_b.png")])
      expect(page.locator("#preview img")).to_have_count(1)
      page.locator("#add-concept").click()
      expect(page.locator("#add-status")).to_contain_text("added <sub2>")
      expect(page.locator("button.concept-button", has_text="<sub2>")).to_have_count(1)
      _expect_thumbnails(page, expect, ["sub1", "sub2"])
      page.screenshot(path=str(shots / "ui_added_concept.png"), full_page=True)
      browser.close()
  finally:
    proc.terminate()
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()
  from persvid_jax.concepts import database as db_lib
  assert sorted(db_lib.ConceptDatabase.open(root / "db").concepts) == ["sub1", "sub2"]
