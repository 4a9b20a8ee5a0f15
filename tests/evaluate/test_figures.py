"""The docs' pictures: sheet rows cut back exactly, TB scalars read without TF, PNG size limits."""

import json

import numpy as np
import pytest
from PIL import Image
from tensorboardX import SummaryWriter

from launch import figures as figures_launcher
from persvid_jax.evaluate import figures
from persvid_jax.pipeline import media


def _sheet(tmp_path, name, rows, seed):
  """An evaluation-style sheet (the suite's scale and pad): ``rows`` cases of 3 frames."""
  rng = np.random.default_rng(seed)
  cases = [(rng.integers(0, 255, (8, 8, 3), np.uint8),
            rng.integers(0, 255, (3, 8, 8, 3), np.uint8)) for _ in range(rows)]
  sheet = media.contact_sheet(cases, scale=media.SHEET_SCALE, pad=media.SHEET_PAD,
                              labels=[f"{name}: case {i}" for i in range(rows)])
  media.save_png(tmp_path / f"{name}.png", sheet)
  return cases


def test_sheet_rows_recover_each_case(tmp_path):
  cases = _sheet(tmp_path, "method", 3, 0)
  rows = figures.sheet_rows(tmp_path / "method.png", 3)
  s, p = media.SHEET_SCALE, media.SHEET_PAD
  for (ref, video), row in zip(cases, rows):
    strip = row[media.LABEL_BAND_PX:]
    # The reference tile and the last frame, pixel-repeated by the scale.
    assert np.array_equal(strip[p * s:(p + 8) * s:s, p * s:(p + 8) * s:s], ref)
    x = (2 * p + 3 * (8 + p)) * s
    assert np.array_equal(strip[p * s:(p + 8) * s:s, x:x + 8 * s:s], video[2])
  with pytest.raises(figures.FigureError, match="does not split into 2 rows"):
    figures.sheet_rows(tmp_path / "method.png", 2)


def test_side_by_side_stacks_variants_per_case_and_cuts_frames(tmp_path):
  _sheet(tmp_path, "a", 3, 0)
  _sheet(tmp_path, "b", 3, 1)
  sheets = {"a": tmp_path / "a.png", "b": tmp_path / "b.png"}
  full = figures.side_by_side(sheets, 3, [2, 0])
  row_a = figures.sheet_rows(sheets["a"], 3)
  row_b = figures.sheet_rows(sheets["b"], 3)
  h = row_a[0].shape[0]
  assert full.shape == (4 * h + 12, row_a[0].shape[1], 3)
  assert np.array_equal(full[:h], row_a[2]) and np.array_equal(full[h:2 * h], row_b[2])
  assert np.array_equal(full[2 * h + 12:3 * h + 12], row_a[0])
  cut = figures.side_by_side(sheets, 3, [1], frames=1)
  tile = (8 + media.SHEET_PAD) * media.SHEET_SCALE
  assert cut.shape[1] == 2 * media.SHEET_PAD * media.SHEET_SCALE + 2 * tile
  with pytest.raises(figures.FigureError, match="case 3 is out of range"):
    figures.side_by_side(sheets, 3, [3])


def test_read_scalars_merges_event_files(tmp_path):
  for start in (0, 3):   # a run and its resumption: two event files
    w = SummaryWriter(str(tmp_path / "tb"), filename_suffix=f".{start}")
    for step in range(start, start + 4):
      w.add_scalar("loss", 1.0 / (step + 1), step)
      w.add_scalar("grad_norm", 2.0, step)
    w.close()
  steps, values = figures.read_scalars(tmp_path, "loss")
  assert steps.tolist() == list(range(7))
  np.testing.assert_allclose(values, 1.0 / (np.arange(7) + 1), rtol=1e-6)
  with pytest.raises(figures.FigureError, match="no scalar 'nope'"):
    figures.read_scalars(tmp_path, "nope")
  with pytest.raises(figures.FigureError, match="holds no tb/"):
    figures.read_scalars(tmp_path / "tb", "loss")


def test_save_small_png_fits_the_limit(tmp_path):
  noise = np.random.default_rng(0).integers(0, 255, (600, 600, 3), np.uint8)   # incompressible
  path, size = figures.save_small_png(tmp_path / "n.png", noise, max_kb=100)
  assert size <= 100 * 1024 and path.stat().st_size == size
  assert Image.open(path).size[0] < 600     # it had to shrink


def test_launcher_writes_plots_and_refuses_bad_input(tmp_path, capsys):
  w = SummaryWriter(str(tmp_path / "run" / "tb"))
  for step in range(1, 6):
    w.add_scalar("loss", 1.0 / step, step)
  w.close()
  results = {"config": {"subjects": 3, "prompts": 1},
             "variants": {v: {"status": "ok", "metrics": {"colour_error": {"mean": m, "std": 0.01}}}
                          for v, m in (("method", 0.2), ("removed", 0.4))},
             "reference": {"truth": {"colour_error": 0.05},
                           "other_subject": {"colour_error": 0.43}}}
  (tmp_path / "r.json").write_text(json.dumps(results))
  _sheet(tmp_path, "method", 3, 0)
  assert figures_launcher.main(["loss", "--run", f"x={tmp_path / 'run'}",
                                "--out", str(tmp_path / "loss.png")]) == 0
  assert figures_launcher.main(["metrics", "--results", str(tmp_path / "r.json"),
                                "--metric", "colour_error", "--out", str(tmp_path / "m.png")]) == 0
  assert figures_launcher.main(["sheets", "--results", str(tmp_path / "r.json"), "--sheets",
                                str(tmp_path), "--variants", "method", "--cases", "0,2",
                                "--out", str(tmp_path / "s.png")]) == 0
  for name in ("loss", "m", "s"):
    assert Image.open(tmp_path / f"{name}.png").size[0] > 100
  capsys.readouterr()
  bad = [(["metrics", "--results", str(tmp_path / "r.json"), "--metric", "iou"], "unknown metric"),
         (["sheets", "--results", str(tmp_path / "r.json"), "--sheets", str(tmp_path),
           "--variants", "method", "--cases", "5"], "case 5 is out of range"),
         (["loss", "--run", str(tmp_path / "run")], "use LABEL=WORKDIR"),
         (["metrics", "--results", str(tmp_path / "missing.json"), "--metric", "x"],
          "cannot read results")]
  for argv, message in bad:
    assert figures_launcher.main(argv + ["--out", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
  assert not (tmp_path / "bad.png").exists()
  with pytest.raises(SystemExit) as e:     # argparse's range check: one line, status 2
    figures_launcher.main(["sheets", "--results", "r", "--sheets", ".", "--variants", "m",
                           "--frames", "0", "--out", str(tmp_path / "bad.png")])
  assert e.value.code == 2


def test_verdicts_apply_the_suite_rule_to_any_pair(tmp_path, capsys):
  variants = {"a": {"status": "ok", "metrics": {"single_instance": {"mean": 0.8, "std": 0.03},
                                                "colour_error": {"mean": 0.20, "std": 0.02}}},
              "b": {"status": "ok", "metrics": {"single_instance": {"mean": 0.7, "std": 0.04},
                                                "colour_error": {"mean": 0.21, "std": 0.02}}}}
  (tmp_path / "r.json").write_text(json.dumps({"variants": variants}))
  assert figures_launcher.main(["verdicts", "--results", str(tmp_path / "r.json"), "--pair",
                                "a:b", "--metric", "single_instance", "--metric",
                                "colour_error"]) == 0
  out = capsys.readouterr().out
  # 0.1 > sqrt(0.03² + 0.04²) = 0.05: holds; colour 0.01 < 0.028: does not.
  assert "| pair: a vs b | single_instance | 0.800 | 0.700 | +0.100 | 0.050 | yes |" in out
  assert "| pair: a vs b | colour_error | 0.200 | 0.210 | +0.010 | 0.028 | no |" in out
  assert figures_launcher.main(["verdicts", "--results", str(tmp_path / "r.json"), "--pair",
                                "a:c", "--metric", "colour_error"]) == 2
  assert "use A:B of variants that ran (a, b)" in capsys.readouterr().err
