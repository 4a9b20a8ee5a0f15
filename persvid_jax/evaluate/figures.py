"""The pictures of docs/: contact sheets side by side, training loss, ablation metrics.

Each reads what a run already wrote (``launch.evaluate --sheets`` PNGs and its
JSON, a training workdir's TensorBoard events) and writes one small PNG:
``launch.figures`` is the command. PNGs are shrunk until they fit ``max_kb``
(docs keep each image under 300 KB).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import struct
from typing import Mapping, Sequence

import numpy as np
from PIL import Image
from tensorboardX.proto import event_pb2

from persvid_jax import atomic
from persvid_jax.evaluate import groundtruth as gt
from persvid_jax.pipeline import media

# A sheet's pad in pixels (the gap, pixel-repeated like the frames).
_PAD_PX = media.SHEET_PAD * media.SHEET_SCALE
# A panel title's direction mark (``instances`` has none: exactly 1 is right).
_ARROW = {True: "↑", False: "↓", None: "(1)"}


class FigureError(ValueError):
  """A missing or malformed input (the message says which and what to do)."""


def sheet_rows(path: str | os.PathLike, rows: int) -> list[np.ndarray]:
  """The ``rows`` rows (label band + reference + frames) of an evaluation sheet.

  Args:
    path: a PNG written by ``launch.evaluate --sheets`` (one row per case).
    rows: how many cases it holds (``len(results['cases'])`` of the same run).

  Returns:
    ``rows`` uint8 arrays ``[row_h, W, 3]``; the sheet's bottom padding dropped.
  """
  try:
    sheet = np.asarray(Image.open(path).convert("RGB"))
  except (OSError, ValueError) as e:
    raise FigureError(f"cannot read sheet {path}: {e}; give a PNG written by "
                      "launch.evaluate --sheets") from None
  body = sheet.shape[0] - _PAD_PX
  if rows < 1 or body % rows:
    raise FigureError(f"sheet {path} ({sheet.shape[0]} px high) does not split into {rows} "
                      "rows; give the case count of the run that wrote it")
  h = body // rows
  # Below its label band a row is a strip of square tiles, each ``(H + pad) * scale``
  # wide, after a ``2 * pad * scale`` margin: a wrong row count breaks that.
  tile = h - media.LABEL_BAND_PX
  if tile <= 0 or (sheet.shape[1] - 2 * _PAD_PX) % tile:
    raise FigureError(f"sheet {path} does not split into {rows} rows of square frames; give "
                      "the case count of the run that wrote it")
  return [sheet[i * h:(i + 1) * h] for i in range(rows)]


def side_by_side(sheets: Mapping[str, str | os.PathLike], rows: int, cases: Sequence[int],
                 *, frames: int | None = None) -> np.ndarray:
  """Cases of several variants' sheets, one block per case, the variants stacked in it.

  Args:
    sheets: ``{variant: sheet PNG}`` in the order to show them.
    rows: the cases each sheet holds (all alike).
    cases: which cases (row indices) to show.
    frames: keep the reference and the first ``frames`` frames of every row
      (``None``: all).

  Returns:
    uint8 ``[len(cases) * (len(sheets) * row_h + gap), W', 3]``.
  """
  loaded = {name: sheet_rows(path, rows) for name, path in sheets.items()}
  for c in cases:
    if not 0 <= c < rows:
      raise FigureError(f"case {c} is out of range: the sheets hold {rows} cases (0..{rows - 1})")
  blocks = []
  for c in cases:
    for name in sheets:
      row = loaded[name][c]
      if frames is not None:
        tile = row.shape[0] - media.LABEL_BAND_PX     # see sheet_rows
        row = row[:, :2 * _PAD_PX + (1 + frames) * tile]
      blocks.append(row)
    blocks.append(np.full((12, blocks[-1].shape[1], 3), 255, np.uint8))   # gap between cases
  return np.concatenate(blocks[:-1], axis=0)


def read_scalars(workdir: str | os.PathLike, tag: str = "loss") -> tuple[np.ndarray, np.ndarray]:
  """``(steps [n], values [n])`` of one scalar from a training workdir's ``tb/`` events.

  Reads the TFRecord framing directly (no TensorFlow): 8-byte length, 4-byte
  CRC, the ``Event`` proto, 4-byte CRC. Several event files (a resumed run)
  are merged; a step logged twice keeps its last value.
  """
  files = sorted(pathlib.Path(workdir, "tb").glob("events.out.tfevents.*"))
  if not files:
    raise FigureError(f"{workdir} holds no tb/events.out.tfevents.* file; give a training "
                      "workdir (python -m launch.train --workdir)")
  points: dict[int, float] = {}
  for f in files:
    data = f.read_bytes()
    i = 0
    while i + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      for v in event.summary.value:
        if v.tag == tag:
          points[int(event.step)] = float(v.simple_value)
  if not points:
    raise FigureError(f"{workdir}'s events hold no scalar {tag!r}")
  steps = np.array(sorted(points))
  return steps, np.array([points[s] for s in steps])


def loss_plot(runs: Mapping[str, str | os.PathLike], *, tag: str = "loss",
              title: str = "") -> np.ndarray:
  """Training curves of ``{label: workdir}``: uint8 ``[H, W, 3]`` (a matplotlib figure)."""
  import matplotlib   # optional (the notebooks / test extras)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
  for label, workdir in runs.items():
    steps, values = read_scalars(workdir, tag)
    ax.plot(steps, values, label=label, linewidth=1.5)
  ax.set_xlabel("step")
  ax.set_ylabel(tag)
  ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.legend(frameon=False)
  if title:
    ax.set_title(title, fontsize=10)
  return _render(fig)


def metrics_plot(results: Mapping, metrics: Sequence[str], *,
                 variants: Sequence[str] | None = None, title: str = "") -> np.ndarray:
  """Bars of mean ± std per variant, one panel per metric, with the scale rows as lines.

  Args:
    results: what ``launch.evaluate`` wrote (its JSON, loaded): ``variants`` ->
      ``metrics`` -> ``{mean, std}``, and ``reference`` -> ``truth`` /
      ``other_subject`` -> metric.
    metrics: which metrics (panels).
    variants: which variants, in order (default: every one that ran).

  Returns:
    uint8 ``[H, W, 3]``.
  """
  import matplotlib   # optional (the notebooks / test extras)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  ran = {k: v for k, v in results.get("variants", {}).items() if v.get("status") == "ok"}
  names = list(variants) if variants is not None else list(ran)
  missing = [n for n in names if n not in ran]
  if missing or not names:
    raise FigureError(f"the results hold no finished variant {missing or names}; ran: "
                      f"{sorted(ran)}")
  unknown = [m for m in metrics if m not in ran[names[0]]["metrics"]]
  if unknown:
    raise FigureError(f"unknown metric(s) {unknown}; the results have "
                      f"{sorted(ran[names[0]]['metrics'])}")
  reference = results.get("reference") or {}
  fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), dpi=100,
                           squeeze=False)
  x = np.arange(len(names))
  for ax, m in zip(axes[0], metrics):
    means = [ran[n]["metrics"][m]["mean"] for n in names]
    stds = [ran[n]["metrics"][m]["std"] for n in names]
    ax.bar(x, means, yerr=stds, color="#4c72b0", capsize=3)
    for key, style in (("truth", "--"), ("other_subject", ":")):
      if m in (reference.get(key) or {}):
        ax.axhline(reference[key][m], color="k", linestyle=style, linewidth=1,
                   label=key.replace("_", " "))
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set_title(f"{m} {_ARROW[gt.HIGHER_IS_BETTER.get(m)]}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  if handles:   # below the panels, where no bar or title is
    fig.legend(handles, labels, loc="lower center", ncol=len(handles), frameon=False,
               fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10, x=0.01, ha="left")
  return _render(fig, rect=(0, 0.06 if handles else 0, 1, 1))


def _render(fig, rect=(0, 0, 1, 1)) -> np.ndarray:
  """A matplotlib figure as uint8 ``[H, W, 3]`` (closed afterwards); ``rect``: the
  part of the figure ``tight_layout`` fits the axes into."""
  from matplotlib import pyplot as plt
  fig.tight_layout(rect=rect)
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  return np.asarray(Image.open(buf).convert("RGB"))


def save_small_png(path: str | os.PathLike, image: np.ndarray, *, max_kb: int = 300
                   ) -> tuple[pathlib.Path, int]:
  """Writes ``image`` (uint8 ``[H, W, 3]``) as a PNG of at most ``max_kb`` KB.

  Tries the full size, then a 256-colour palette, then halves the size (box
  filter) until it fits. Returns the path and its size in bytes.
  """
  img = Image.fromarray(np.asarray(image, np.uint8))
  while True:
    for candidate in (img, img.quantize(256, dither=Image.Dither.NONE)):
      buf = io.BytesIO()
      candidate.save(buf, format="PNG", optimize=True)
      if buf.tell() <= max_kb * 1024:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.file(path) as tmp:
          pathlib.Path(tmp).write_bytes(buf.getvalue())
        return path, buf.tell()
    if min(img.size) < 64:
      raise FigureError(f"cannot fit {path} into {max_kb} KB; show fewer cases or frames")
    img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)


def load_results(path: str | os.PathLike) -> dict:
  """A ``launch.evaluate`` JSON, or ``FigureError`` naming what is wrong."""
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise FigureError(f"cannot read results {path}: {e}; give the JSON launch.evaluate "
                      "--out wrote") from None
