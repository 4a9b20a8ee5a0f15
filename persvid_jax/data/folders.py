"""Users' own corpora: a folder of videos and/or images with captions.

Layout (either index works; the CSV wins when both exist)::

    my_corpus/
      captions.csv          # columns: file,caption[,placeholder_caption]
      clip_000.mp4          # videos: .mp4 .mov .webm .avi .mkv, or animated .gif
      photo_001.png         # images: .png .jpg .jpeg .webp .bmp (or 1-frame .gif)
      photo_001.txt         # sidecar caption (used when there is no CSV)

Every file becomes the example dict of ``synthetic.render_example``'s core
keys, at a fixed ``[T, H, W]``: frames are taken every ``frame_stride`` from
the start and the video padded with zero frames (``frame_mask`` 0) when it is
shorter; images are 1-frame videos (``frame_mask = [1, 0, …]``). Frames are
resized to cover ``H × W`` and centre-cropped. There is no subject mask or
reference for user data: ``mask`` is the whole (valid) frame,
``has_reference`` is 0 and ``reference`` zeros — the training stage treats
that as a dropped reference. A ``placeholder_caption`` column (captions with
``<c0>`` for the subject) is used when present, else the caption itself.

Unreadable files (corrupt, unsupported, listed but missing, uncaptioned)
are skipped and counted in ``stats``, never fatal; a missing folder or CSV,
or a CSV without the needed columns, is a ``DataError`` saying what to fix.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import pathlib
import threading
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageSequence

from persvid_jax.data import DataError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".avi", ".mkv", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
_KINDS = {"video": VIDEO_EXTENSIONS, "image": IMAGE_EXTENSIONS,
          "any": tuple(sorted(set(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)))}
_FFMPEG_EXTENSIONS = (".mp4", ".mov", ".webm", ".avi", ".mkv")
_log = logging.getLogger(__name__)


@dataclasses.dataclass
class ReadStats:
  """What a folder yielded. ``failures`` maps a file to why it was skipped."""
  listed: int = 0
  read: int = 0
  failures: dict[str, str] = dataclasses.field(default_factory=dict)

  @property
  def skipped(self) -> int:
    """How many listed files were not read."""
    return len(self.failures)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One listed file with its caption and its ``<c0>`` caption (the caption
  itself when the index gives no ``placeholder_caption``)."""
  path: pathlib.Path
  caption: str
  placeholder_caption: str


class CaptionedFolder:
  """An indexable folder of captioned videos/images (see the module docstring).

  ``len(folder)`` counts the captioned files; ``folder.get(i)`` reads entry
  ``i`` (``None`` when unreadable, counted once in ``stats``); iterating
  yields the readable examples in file order.

  Args:
    folder: the corpus directory.
    captions: a CSV path (absolute or relative to ``folder``); default
      ``folder/captions.csv`` when it exists, else sidecar ``.txt`` files.
    frames, height, width: the example shape ``[T, H, W, 3]``.
    reference_size: ``R`` of the (zero) reference image; default ``height``.
    frame_stride: take every ``frame_stride``-th frame of a video.
    kind: ``'video'``, ``'image'`` or ``'any'``: which extensions count.
  """

  def __init__(self, folder, captions=None, *, frames: int, height: int, width: int,
               reference_size: int | None = None, frame_stride: int = 1,
               kind: str = "any"):
    if kind not in _KINDS:
      raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    self.folder = pathlib.Path(folder).expanduser()
    if not self.folder.is_dir():
      raise DataError(f"data folder {str(self.folder)!r} does not exist or is not a "
                      "directory; set config.data.folder to a folder of videos/images "
                      "with a captions.csv (columns file,caption) or sidecar .txt captions")
    self.frames, self.height, self.width = int(frames), int(height), int(width)
    self.reference_size = int(reference_size or height)
    self.frame_stride = max(1, int(frame_stride))
    self.extensions = _KINDS[kind]
    self.stats = ReadStats()
    self.entries = self._index(captions)
    self.stats.listed = len(self.entries) + self.stats.skipped
    if not self.entries:
      raise DataError(f"no captioned {kind if kind != 'any' else 'video/image'} files in "
                      f"{str(self.folder)!r} ({self.stats.skipped} skipped: "
                      f"{dict(list(self.stats.failures.items())[:3])}); add files with "
                      f"extensions {' '.join(self.extensions)} and their captions")
    self._failed: set[int] = set()
    self._read: set[int] = set()
    self._lock = threading.Lock()

  # -- index -----------------------------------------------------------------

  def _skip(self, name: str, why: str) -> None:
    self.stats.failures[name] = why
    _log.warning("skipping %s: %s", name, why)

  def _index(self, captions) -> list[Entry]:
    csv_path = None
    if captions is not None:
      csv_path = pathlib.Path(captions).expanduser()
      if not csv_path.is_absolute():
        csv_path = self.folder / csv_path
      if not csv_path.is_file():
        raise DataError(f"captions CSV {str(csv_path)!r} does not exist; point "
                        "config.data.captions at a CSV with columns file,caption "
                        "(or leave it unset to use captions.csv / sidecar .txt files)")
    elif (self.folder / "captions.csv").is_file():
      csv_path = self.folder / "captions.csv"
    return self._index_csv(csv_path) if csv_path else self._index_sidecars()

  def _index_csv(self, csv_path: pathlib.Path) -> list[Entry]:
    with open(csv_path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      columns = [c.strip() for c in (reader.fieldnames or [])]
      if "file" not in columns or "caption" not in columns:
        raise DataError(f"captions CSV {str(csv_path)!r} has columns {columns}; it needs "
                        "a header with 'file' and 'caption' (optionally "
                        "'placeholder_caption')")
      rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    entries = []
    for row in rows:
      name, caption = row.get("file", ""), row.get("caption", "")
      path = self.folder / name
      if not name or not caption:
        self._skip(name or "<empty row>", "no file name or no caption in the CSV row")
      elif path.suffix.lower() not in self.extensions:
        self._skip(name, f"unsupported extension (want {' '.join(self.extensions)})")
      elif not path.is_file():
        self._skip(name, "listed in the CSV but not in the folder")
      else:
        entries.append(Entry(path, caption, row.get("placeholder_caption") or caption))
    return entries

  def _index_sidecars(self) -> list[Entry]:
    media = sorted(p for p in self.folder.iterdir()
                   if p.is_file() and p.suffix.lower() in self.extensions)
    if not media:
      raise DataError(f"{str(self.folder)!r} has no captions.csv and no files with "
                      f"extensions {' '.join(self.extensions)}; add media files with "
                      "sidecar .txt captions or a captions.csv (columns file,caption)")
    entries = []
    for path in media:
      txt = path.with_suffix(".txt")
      caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
      if caption:
        entries.append(Entry(path, caption, caption))
      else:
        self._skip(path.name, f"no caption (no {txt.name} and no captions.csv)")
    return entries

  # -- reading ---------------------------------------------------------------

  def __len__(self) -> int:
    return len(self.entries)

  def _decode(self, path: pathlib.Path) -> list[np.ndarray]:
    """Up to ``frames`` RGB frames (every ``frame_stride``-th) as uint8 ``[h, w, 3]``."""
    need = self.frames * self.frame_stride
    frames: list[np.ndarray] = []
    if path.suffix.lower() in _FFMPEG_EXTENSIONS:
      import imageio_ffmpeg   # lazy: only video folders need the ffmpeg binary
      reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
      try:
        meta = next(reader)
        w, h = meta["size"]
        for raw in reader:
          frames.append(np.frombuffer(raw, np.uint8).reshape(h, w, 3))
          if len(frames) >= need:
            break
      finally:
        reader.close()     # stops ffmpeg early when we have enough frames
    else:
      with Image.open(path) as img:
        for frame in ImageSequence.Iterator(img):
          frames.append(np.asarray(frame.convert("RGB")))
          if len(frames) >= need:
            break
    frames = frames[::self.frame_stride]
    if not frames:
      raise ValueError("no frames decoded")
    return frames

  def _fit(self, frame: np.ndarray) -> np.ndarray:
    """Resizes to cover ``H × W`` and centre-crops, in one PIL call."""
    h, w = frame.shape[:2]
    target = self.width / self.height
    if w / h > target:                    # too wide: crop the sides
      cw, ch = h * target, h
    else:
      cw, ch = w, w / target
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    out = Image.fromarray(frame).resize((self.width, self.height), Image.Resampling.BICUBIC,
                                        box=box, reducing_gap=3.0)
    return np.asarray(out, np.uint8)

  def get(self, i: int) -> dict[str, Any] | None:
    """Example ``i`` (see ``synthetic.render_example`` for the keys), or ``None``
    when the file cannot be read (counted once in ``stats``)."""
    entry = self.entries[i]
    try:
      frames = [self._fit(f) for f in self._decode(entry.path)]
    except Exception as e:  # noqa: BLE001 — any decoder failure means "corrupt file"
      with self._lock:      # get() runs in the pipeline's reader threads
        if i not in self._failed:
          self._failed.add(i)
          self._skip(entry.path.name, _reason(e))
      return None
    with self._lock:
      if i not in self._read:
        self._read.add(i)
        self.stats.read += 1
    T, H, W, R = self.frames, self.height, self.width, self.reference_size
    n = len(frames)
    video = np.zeros((T, H, W, 3), np.uint8)
    video[:n] = np.stack(frames)
    frame_mask = (np.arange(T) < n).astype(np.uint8)
    example = {
        "index": np.int64(i),
        "subject_id": np.int64(-1),
        "video": video,
        "mask": np.broadcast_to(frame_mask[:, None, None, None] * np.uint8(255),
                                (T, H, W, 1)).copy(),
        "frame_mask": frame_mask,
        "reference": np.zeros((R, R, 3), np.uint8),
        "reference_mask": np.zeros((R, R, 1), np.uint8),
        "has_reference": np.uint8(0),
    }
    for key, text in (("caption", entry.caption),
                      ("placeholder_caption", entry.placeholder_caption)):
      example[key] = text
      example[f"still_{key}"] = text
    example["oracle_caption"] = example["still_oracle_caption"] = entry.caption
    return example

  def __iter__(self) -> Iterator[dict[str, Any]]:
    for i in range(len(self)):
      example = self.get(i)
      if example is not None:
        yield example


def _reason(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else 'unreadable'}"


def video_folder(folder, captions=None, **kwargs) -> CaptionedFolder:
  """A folder of videos (mp4/gif/…) + a captions CSV (``file,caption``)."""
  return CaptionedFolder(folder, captions, kind="video", **kwargs)


def image_folder(folder, captions=None, **kwargs) -> CaptionedFolder:
  """A folder of images + captions (CSV or sidecar ``.txt``), as 1-frame videos."""
  return CaptionedFolder(folder, captions, kind="image", **kwargs)
