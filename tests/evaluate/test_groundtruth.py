"""Ground-truth metrics: the renderer's own videos score perfectly; copies count."""

import numpy as np
import pytest

from persvid_jax.data import synthetic
from persvid_jax.evaluate import groundtruth as gt

CFG = synthetic.CONFIGS["demo"]


def _example(i):
  ex = synthetic.render_example(CFG, "test", i)
  subject = synthetic.make_subject(int(ex["subject_id"]))
  return ex, gt.Target(subject, int(ex["direction"]), int(ex["background"]))


def test_truth_scores_perfectly():
  scores = []
  for i in range(24):                       # all six directions occur
    ex, target = _example(i)
    scores.append(gt.score_video(ex["video"], target))
  mean = {k: float(np.mean([s[k] for s in scores])) for k in gt.METRICS}
  assert mean["motion_correct"] == 1.0
  assert mean["background_correct"] == 1.0
  assert mean["single_instance"] == 1.0 and mean["instances"] == 1.0
  assert mean["colour_error"] < 0.08
  assert mean["shape_iou"] > 0.75
  assert mean["temporal_consistency"] > 0.75
  assert mean["pattern_error"] < 0.06


def test_pattern_error_sees_a_pattern_lost():
  """A patterned subject filled with its own mean colour keeps (nearly) its
  colour error and silhouette; the pattern error triples."""
  for i in range(24):
    ex, target = _example(i)
    if synthetic.PATTERNS[target.subject.pattern] != "plain":
      break
  masks = gt.segment_video(ex["video"])
  blob = ex["video"].copy()
  for frame, mask in zip(blob, masks):
    frame[mask] = frame[mask].mean(0).astype(np.uint8)
  truth, lost = gt.score_video(ex["video"], target), gt.score_video(blob, target)
  assert lost["shape_iou"] == pytest.approx(truth["shape_iou"], abs=0.05)
  assert lost["colour_error"] < truth["colour_error"] + 0.05
  assert lost["pattern_error"] > 2.5 * truth["pattern_error"]


def test_pattern_distance_ignores_the_mean():
  rng = np.random.default_rng(0)
  two_tone = np.where(rng.random((400, 1)) < 0.5, [0.9, 0.1, 0.1], [0.1, 0.1, 0.9])
  assert gt.pattern_distance(two_tone + 0.05, two_tone) < 1e-6
  assert gt.pattern_distance(np.full((400, 3), 0.5), two_tone) > 0.2


def test_wrong_prompt_is_caught():
  ex, target = _example(0)
  other_dir = (target.direction + 1) % len(synthetic.DIRECTIONS)
  # The background nearest in colour to the true one is the hardest wrong answer.
  true_rgb = np.asarray(synthetic.BACKGROUNDS[target.background].rgb)
  others = [i for i in range(len(synthetic.BACKGROUNDS)) if i != target.background]
  other_bg = min(others, key=lambda i: np.linalg.norm(
      np.asarray(synthetic.BACKGROUNDS[i].rgb) - true_rgb))
  s = gt.score_video(ex["video"], gt.Target(target.subject, other_dir, other_bg))
  assert s["motion_correct"] == 0.0
  assert s["background_correct"] == 0.0
  # Another subject's colours: no instance of *it* in the video.
  stranger = synthetic.make_subject(synthetic.subject_id("test", 500))
  far = gt.score_video(ex["video"], gt.Target(stranger, target.direction, target.background))
  assert far["colour_error"] > s["colour_error"]


def test_two_copies_count_two():
  ex, target = _example(3)
  subject = target.subject
  h = w = 32
  bg = synthetic.render_background(target.background, h, w, np.random.default_rng(0), 4)
  track = np.array([[0.25, 0.3, 0.8], [0.75, 0.7, 0.8]])
  alpha, premult = synthetic.render_subject(subject, track, h, w)
  frame = bg * (1 - alpha.sum(0)[..., None]) + premult.sum(0)
  frame = synthetic._to_uint8(frame)
  colours = gt.subject_colours(subject, target.background)
  min_area = max(3.0, 0.05 * np.pi * (subject.size * 32) ** 2)
  assert gt.count_instances(frame, colours, min_area=min_area) == 2
  assert gt.count_instances(synthetic._to_uint8(bg), colours, min_area=min_area) == 0


@pytest.mark.parametrize("direction", synthetic.DIRECTIONS)
def test_classify_motion(direction):
  t, size = 6, 32
  masks = np.zeros((t, size, size))
  yy, xx = np.mgrid[:size, :size]
  for k in range(t):
    f = k / (t - 1)
    cx, cy, r = 16.0, 16.0, 5.0
    if direction in ("left", "right"):
      cx = 8 + 16 * (f if direction == "right" else 1 - f)
    elif direction in ("up", "down"):
      cy = 8 + 16 * (f if direction == "down" else 1 - f)
    else:
      r = 3 + 5 * (f if direction == "towards" else 1 - f)
    masks[k] = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
  assert gt.classify_motion(masks) == synthetic.DIRECTIONS.index(direction)


def test_classify_motion_static_or_missing():
  masks = np.zeros((4, 16, 16))
  masks[:, 6:10, 6:10] = 1
  assert gt.classify_motion(masks) is None
  masks[2] = 0
  assert gt.classify_motion(masks) is None
