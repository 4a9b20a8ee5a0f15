"""Contact sheets: the geometry the docstring states, labels above their rows."""

import numpy as np
import pytest

from persvid_jax.pipeline import media


def _video(value, t=3, size=8):
  return np.full((t, size, size, 3), value, np.uint8)


def test_contact_sheet_geometry_and_cells():
  ref = np.full((20, 20, 3), 10, np.uint8)
  sheet = media.contact_sheet([(ref, _video(100)), (None, _video(200))], scale=2, pad=2)
  assert sheet.shape == (2 * (8 + 2) * 2 + 2 * 2, ((1 + 3) * (8 + 2) + 2 * 2) * 2, 3)
  # Row 0: the reference (resized) then the frames; row 1: a grey blank.
  assert (sheet[4:20, 4:20] == 10).all() and (sheet[4:20, 28:44] == 100).all()
  assert (sheet[24:40, 4:20] == 230).all() and (sheet[24:40, 28:44] == 200).all()


def test_contact_sheet_labels_stand_above_their_rows():
  rows = [(None, _video(100)), (None, _video(200))]
  plain = media.contact_sheet(rows, scale=4)
  sheet = media.contact_sheet(rows, scale=4, labels=["concept: a <s0> moving left", "removed"])
  band = (sheet.shape[0] - plain.shape[0]) // 2
  assert band > 8 and sheet.shape[1] == plain.shape[1]
  # Dark text in each band, the row's pixels right below it.
  row_h = (8 + 2) * 4
  for i in range(2):
    top = i * (band + row_h)
    assert sheet[top:top + band].min() < 100
    np.testing.assert_array_equal(sheet[top + band:top + band + row_h],
                                  plain[i * row_h:(i + 1) * row_h])


def test_contact_sheet_cuts_long_labels_and_checks_their_count():
  sheet = media.contact_sheet([(None, _video(0, t=1))], scale=1, labels=["x" * 500])
  assert sheet.shape[1] == (1 + 1) * (8 + 2) + 2 * 2
  with pytest.raises(ValueError, match="2 labels for 1 rows"):
    media.contact_sheet([(None, _video(0))], labels=["a", "b"])
