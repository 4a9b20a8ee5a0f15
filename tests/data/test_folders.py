"""Folder readers: videos + CSV, images + sidecars, corrupt files skipped and counted."""

import csv

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from persvid_jax.data import DataError, folders, pipeline

SHAPE = dict(frames=4, height=16, width=24)


def _colour_frames(n, h, w):
  """``n`` solid frames with distinct colours, uint8 ``[n, h, w, 3]``."""
  colours = np.array([[40 * i + 20, 100, 220 - 30 * i] for i in range(n)], np.uint8)
  return np.broadcast_to(colours[:, None, None], (n, h, w, 3)).copy()


def _write_mp4(path, frames):
  writer = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=8,
                                       macro_block_size=1, ffmpeg_log_level="error")
  writer.send(None)
  for frame in frames:
    writer.send(np.ascontiguousarray(frame))
  writer.close()


def _write_gif(path, frames):
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)


def _write_csv(path, rows, header=("file", "caption")):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


@pytest.fixture
def video_dir(tmp_path):
  d = tmp_path / "videos"
  d.mkdir()
  _write_gif(d / "a.gif", _colour_frames(5, 20, 30))
  _write_mp4(d / "b.mp4", _colour_frames(6, 24, 40))
  _write_mp4(d / "short.mp4", _colour_frames(2, 24, 40))
  (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 definitely not a video")
  _write_csv(d / "captions.csv", [
      ("a.gif", "a gif of colours"), ("b.mp4", "an mp4 of colours"),
      ("short.mp4", "a short clip"), ("broken.mp4", "a corrupt file"),
      ("missing.mp4", "listed but absent"), ("notes.txt", "not a video"),
  ])
  return d


@pytest.fixture
def image_dir(tmp_path):
  d = tmp_path / "images"
  d.mkdir()
  Image.fromarray(_colour_frames(1, 32, 32)[0]).save(d / "x.png")
  (d / "x.txt").write_text("a photo of a <c0> on the beach\n")
  Image.fromarray(_colour_frames(2, 20, 50)[1]).save(d / "y.jpg", quality=95)
  (d / "y.txt").write_text("a wide photo")
  Image.fromarray(_colour_frames(1, 8, 8)[0]).save(d / "z.png")     # no caption
  (d / "w.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")          # corrupt
  (d / "w.txt").write_text("a corrupt image")
  return d


def test_video_folder_reads_pads_and_counts_failures(video_dir):
  folder = folders.video_folder(video_dir, **SHAPE)
  assert len(folder) == 4                          # a, b, short, broken
  assert folder.stats.skipped == 2                 # missing.mp4, notes.txt
  examples = {str(e["caption"]): e for e in folder}
  assert set(examples) == {"a gif of colours", "an mp4 of colours", "a short clip"}
  assert folder.stats.skipped == 3 and folder.stats.read == 3
  assert "broken.mp4" in folder.stats.failures and "missing.mp4" in folder.stats.failures
  for e in examples.values():
    assert e["video"].shape == (4, 16, 24, 3) and e["video"].dtype == np.uint8
    assert e["has_reference"] == 0 and e["subject_id"] == -1
  np.testing.assert_array_equal(examples["a gif of colours"]["frame_mask"], [1, 1, 1, 1])
  np.testing.assert_array_equal(examples["a short clip"]["frame_mask"], [1, 1, 0, 0])
  assert examples["a short clip"]["video"][2:].max() == 0
  # Frames keep their order and colour (mp4 is lossy: a tolerance).
  want = _colour_frames(4, 1, 1)[:, 0, 0].astype(float)
  for key, tol in (("a gif of colours", 3), ("an mp4 of colours", 12)):
    got = examples[key]["video"].reshape(4, -1, 3).mean(1)
    np.testing.assert_allclose(got, want, atol=tol, err_msg=key)
  # Reading again does not count the corrupt file twice.
  assert folder.get(3) is None and folder.stats.skipped == 3


def test_frame_stride(video_dir):
  folder = folders.video_folder(video_dir, frames=2, height=16, width=24, frame_stride=2)
  e = folder.get(0)                                  # a.gif, frames 0 and 2
  want = _colour_frames(5, 1, 1)[[0, 2], 0, 0].astype(float)
  np.testing.assert_allclose(e["video"].reshape(2, -1, 3).mean(1), want, atol=3)


def test_image_folder_with_sidecars(image_dir):
  folder = folders.image_folder(image_dir, **SHAPE)
  assert len(folder) == 3                           # w (corrupt, found on read), x, y
  assert "z.png" in folder.stats.failures
  examples = list(folder)
  # w.png sorts first but is corrupt: skipped and counted, not fatal.
  assert [e["caption"] for e in examples] == ["a photo of a <c0> on the beach", "a wide photo"]
  assert "w.png" in folder.stats.failures and folder.stats.skipped == 2
  for e in examples:
    np.testing.assert_array_equal(e["frame_mask"], [1, 0, 0, 0])
    assert e["video"].shape == (4, 16, 24, 3) and e["video"][1:].max() == 0
    assert e["mask"][0].min() == 255 and e["mask"][1:].max() == 0
  # y.jpg is 50x20: resized to cover 24x16 and centre-cropped, colour kept.
  np.testing.assert_allclose(examples[1]["video"][0].reshape(-1, 3).mean(0),
                             _colour_frames(2, 1, 1)[1, 0, 0], atol=3)


def test_image_folder_with_csv_and_placeholder_column(image_dir):
  _write_csv(image_dir / "list.csv", [("x.png", "a red square", "a <c0>")],
             header=("file", "caption", "placeholder_caption"))
  folder = folders.image_folder(image_dir, "list.csv", **SHAPE)
  (e,) = list(folder)
  assert e["caption"] == "a red square" and e["placeholder_caption"] == "a <c0>"


def test_clear_errors(tmp_path, image_dir):
  with pytest.raises(DataError, match="does not exist"):
    folders.video_folder(tmp_path / "nope", **SHAPE)
  with pytest.raises(DataError, match="captions CSV .* does not exist"):
    folders.image_folder(image_dir, "nope.csv", **SHAPE)
  _write_csv(image_dir / "bad.csv", [("x.png", "text")], header=("path", "text"))
  with pytest.raises(DataError, match="needs a header with 'file' and 'caption'"):
    folders.image_folder(image_dir, "bad.csv", **SHAPE)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match="no captions.csv and no files"):
    folders.video_folder(empty, **SHAPE)


def test_pipeline_over_a_folder(tiny_config, video_dir, image_dir):
  # A mixed corpus: the images of image_dir copied beside the videos.
  for name in ("x.png", "y.jpg"):
    (video_dir / name).write_bytes((image_dir / name).read_bytes())
  with open(video_dir / "captions.csv", "a", newline="") as f:
    csv.writer(f).writerows([("x.png", "an image"), ("y.jpg", "another image")])
  config = tiny_config.copy_and_resolve_references()
  config.data.update(dict(source="folder", folder=str(video_dir), frames=4, height=16,
                          width=24, reference_size=8))
  kw = dict(batch_size=3, process_index=0, process_count=1)
  batches = [next(pipeline.make_dataset(config, "train", **kw)) for _ in range(2)]
  np.testing.assert_array_equal(batches[0]["index"], batches[1]["index"])   # deterministic
  it = pipeline.make_dataset(config, "train", **kw)
  four = [next(it) for _ in range(4)]
  batch = {k: np.concatenate([b[k] for b in four]) for k in four[0]}
  assert batch["video"].shape == (12, 4, 16, 24, 3) and batch["video"].dtype == np.float32
  assert "a corrupt file" not in set(batch["caption"])          # replaced, not yielded
  images = np.isin(batch["caption"], ["an image", "another image"])
  assert images.any() and np.all(batch["frame_mask"][images] == [1, 0, 0, 0])
  # One epoch over two processes: 3 each; the corrupt entry is replaced by the next readable.
  seen = []
  for p in range(2):
    it = pipeline.make_dataset(config, "test", batch_size=2, process_index=p,
                               process_count=2, drop_remainder=False)
    seen.append(np.concatenate([b["index"] for b in it]).tolist())
  assert len(seen[0]) == len(seen[1]) == 3
  assert 3 not in seen[0] + seen[1]                              # broken.mp4's index
