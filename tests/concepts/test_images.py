"""Reading users' files: bad files refused with one line naming them, modes converted, masks read."""

import io
import pathlib

import numpy as np
import pytest
from PIL import Image

from persvid_jax.concepts.images import ImageError, load_image, load_mask


def _photo_bytes(fmt: str) -> bytes:
  # Noise compresses badly: the file is long enough to cut in half mid-data.
  pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, fmt)
  return buffer.getvalue()


def _bad_file(tmp_path: pathlib.Path, kind: str) -> tuple[pathlib.Path, str]:
  """A path of the given kind of bad file, and the words its error must say."""
  if kind == "missing":
    return tmp_path / "nope.png", "does not exist"
  if kind == "directory":
    (tmp_path / "photos").mkdir()
    return tmp_path / "photos", "is a directory"
  if kind == "text":
    path = tmp_path / "notes.txt"
    path.write_text("not a picture\n")
    return path, "not an image"
  if kind == "text_named_jpg":
    path = tmp_path / "photo.jpg"
    path.write_text("not a picture either\n")
    return path, "not an image"
  if kind in ("truncated_jpeg", "truncated_png"):
    fmt = kind.split("_")[1]
    data = _photo_bytes(fmt.upper())
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[:len(data) // 2])
    return path, "truncated or corrupt"
  if kind == "tiny":
    path = tmp_path / "tiny.png"
    Image.new("RGB", (4, 30)).save(path)
    return path, "at least 8 pixels"
  raise ValueError(kind)


_BAD = ["missing", "directory", "text", "text_named_jpg", "truncated_jpeg", "truncated_png", "tiny"]


@pytest.mark.parametrize("kind", _BAD)
def test_load_image_rejects_bad_files(tmp_path, kind):
  path, words = _bad_file(tmp_path, kind)
  with pytest.raises(ImageError, match=words) as info:
    load_image(path)
  message = str(info.value)
  assert str(path) in message and "\n" not in message
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind", _BAD)
def test_load_mask_rejects_bad_files(tmp_path, kind):
  path, words = _bad_file(tmp_path, kind)
  with pytest.raises(ImageError, match=words) as info:
    load_mask(path, (64, 64))
  message = str(info.value)
  assert str(path) in message and message.startswith("mask ") and "\n" not in message


@pytest.mark.parametrize("value, words", [(0, "is empty"), (255, "is full")])
def test_load_mask_rejects_empty_and_full(tmp_path, value, words):
  path = tmp_path / "mask.png"
  Image.new("L", (40, 40), value).save(path)
  with pytest.raises(ImageError, match=words) as info:
    load_mask(path, (40, 40))
  assert str(path) in str(info.value)


def test_load_image_converts_modes(tmp_path):
  rgb = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / "rgb.png")
  np.testing.assert_array_equal(load_image(tmp_path / "rgb.png"), rgb)

  Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
  gray = load_image(tmp_path / "gray.png")
  assert gray.shape == (12, 10, 3) and gray.dtype == np.uint8
  np.testing.assert_array_equal(gray, np.repeat(rgb[..., :1], 3, -1))

  Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
  assert load_image(tmp_path / "palette.png").shape == (12, 10, 3)

  rgba = np.concatenate([rgb, np.full((12, 10, 1), 255, np.uint8)], -1)
  rgba[0, 0, 3] = 0                                     # transparent: shown on white
  Image.fromarray(rgba).save(tmp_path / "rgba.png")
  out = load_image(tmp_path / "rgba.png")
  np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(out[1:], rgb[1:])

  deep = np.zeros((12, 10), np.uint16)
  deep[2:5, 2:5] = 65535                               # 16-bit: rescaled, not clipped
  deep[6, 6] = 32768
  Image.fromarray(deep).save(tmp_path / "deep.png")
  out = load_image(tmp_path / "deep.png")
  assert out[3, 3].tolist() == [255] * 3 and out[0, 0].tolist() == [0] * 3
  assert 120 < out[6, 6, 0] < 135


def test_load_mask_threshold_and_resize(tmp_path):
  values = np.zeros((20, 30), np.uint8)
  values[5:15, 10:20] = 128                             # just above half: subject
  values[0:3, 0:3] = 127                                # just below: background
  Image.fromarray(values).save(tmp_path / "mask.png")
  mask = load_mask(tmp_path / "mask.png", (20, 30))
  assert mask.dtype == np.float32 and mask.shape == (20, 30)
  np.testing.assert_array_equal(mask, (values >= 128).astype(np.float32))
  big = load_mask(tmp_path / "mask.png", (40, 60))      # nearest: exact 2x blocks
  np.testing.assert_array_equal(big, np.kron(mask, np.ones((2, 2), np.float32)))

  cutout = np.zeros((20, 30, 4), np.uint8)              # RGBA cut-out: alpha is the mask
  cutout[..., :3] = 255
  cutout[5:15, 10:20, 3] = 255
  Image.fromarray(cutout).save(tmp_path / "cutout.png")
  np.testing.assert_array_equal(load_mask(tmp_path / "cutout.png", (20, 30)), mask)
