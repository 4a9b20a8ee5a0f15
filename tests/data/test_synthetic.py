"""The numpy renderer: determinism, ranges, masks, motion, references, splits, captions."""

import math
import sys
import time

import numpy as np
import pytest

from persvid_jax.concepts import tokens
from persvid_jax.data import captions, synthetic

TINY = synthetic.CONFIGS["tiny"]


@pytest.fixture(scope="module")
def examples():
  """Every example of the tiny config, both splits."""
  return {split: list(synthetic.iterate(TINY, split)) for split in synthetic.SPLITS}


def test_renderer_imports_no_tensorflow():
  # It must run on the GPU box, where TF is absent.
  import subprocess
  code = ("import sys; from persvid_jax.data import synthetic, pipeline, folders; "
          "synthetic.render_example(synthetic.CONFIGS['tiny'], 'train', 0); "
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_same_seed_same_bytes_other_seed_other_bytes():
  a = synthetic.render_example(TINY, "train", 5)
  b = synthetic.render_example(TINY, "train", 5)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
  c = synthetic.render_example(TINY.replace(seed=1), "train", 5)
  assert not np.array_equal(a["video"], c["video"])


def test_shapes_dtypes_and_ranges(examples):
  T, H, W, R = TINY.frames, TINY.height, TINY.width, TINY.reference_size
  for ex in examples["train"][:8]:
    assert ex["video"].shape == (T, H, W, 3) and ex["video"].dtype == np.uint8
    assert ex["mask"].shape == (T, H, W, 1) and ex["mask"].dtype == np.uint8
    assert ex["reference"].shape == (R, R, 3) and ex["reference_mask"].shape == (R, R, 1)
    assert ex["track"].shape == (T, 3) and ex["frame_mask"].tolist() == [1] * T
    video = ex["video"] / 127.5 - 1.0                    # the model's range
    assert video.min() >= -1.0 and video.max() <= 1.0
    assert ex["video"].std() > 10                      # not a blank frame
    for key in ("primary_rgb", "secondary_rgb", "background_rgb"):
      assert ex[key].dtype == np.float32 and np.all((ex[key] >= 0) & (ex[key] <= 1))
    # Every subject pixel is whole in at least one frame, and the subject is in frame.
    assert ex["mask"].max() == 255
    assert ex["mask"][:, 0].max() < 255 and ex["mask"][:, -1].max() < 255


def test_other_resolutions_and_speed():
  config = TINY.replace(frames=16, height=32, width=48, reference_size=24)
  ex = synthetic.render_example(config, "test", 3)
  assert ex["video"].shape == (16, 32, 48, 3) and ex["reference"].shape == (24, 24, 3)
  start = time.perf_counter()
  for i in range(10):
    synthetic.render_example(config.replace(width=32), "train", i)
  per_video = (time.perf_counter() - start) / 10
  assert per_video < 0.1, f"a 16x32x32 video took {per_video * 1e3:.1f} ms"


def _off_subject_colours(pixels, c1, c2):
  """Distance of each ``[n, 3]`` pixel from the segment between the two colours
  (a fully covered pixel shows a mix of them where a pattern edge cuts it)."""
  d = c2 - c1
  s = np.clip((pixels - c1) @ d / (d @ d), 0, 1)
  return np.linalg.norm(pixels - (c1 + s[:, None] * d), axis=-1)


def test_same_scene_at_another_resolution():
  # Draws are frame-relative: 64 px box-filtered to 32 px is the 32 px render.
  low = synthetic.render_example(TINY, "train", 9)["video"].astype(float)
  high = synthetic.render_example(TINY.replace(height=64, width=64), "train", 9)["video"]
  down = high.astype(float).reshape(TINY.frames, 32, 2, 32, 2, 3).mean((2, 4))
  assert np.abs(down - low).mean() < 3.0


def test_mask_matches_the_subject(examples):
  for ex in examples["train"][:24]:
    full = ex["mask"][..., 0] == 255
    pixels = ex["video"][full] / 255.0                # [n, 3] fully covered pixels
    dist = _off_subject_colours(pixels, ex["primary_rgb"], ex["secondary_rgb"])
    assert dist.max() < 0.02, (ex["index"], dist.max())
    # Coverage area matches the shape's area at the track's scale (the circle
    # exactly, the others within bounds of their unit-radius geometry).
    shape = synthetic.SHAPES[int(ex["shape"])]
    area = ex["mask"][..., 0].reshape(TINY.frames, -1).sum(-1) / 255.0
    radius = ex["size"] * ex["track"][:, 2] * min(TINY.height, TINY.width)
    ratio = area / (math.pi * radius ** 2)
    if shape == "circle":
      np.testing.assert_allclose(ratio, 1.0, atol=0.06)
    assert np.all((ratio > 0.25) & (ratio < 1.05)), (shape, ratio)
    # Its centroid follows the track (the shapes are near-centred).
    ys, xs = np.mgrid[:TINY.height, :TINY.width] + 0.5
    m = ex["mask"][..., 0] / 255.0
    cx = (m * xs).sum((1, 2)) / m.sum((1, 2)) / TINY.width
    cy = (m * ys).sum((1, 2)) / m.sum((1, 2)) / TINY.height
    np.testing.assert_allclose(cx, ex["track"][:, 0], atol=0.06)
    np.testing.assert_allclose(cy, ex["track"][:, 1], atol=0.08)


def _centroid_track(mask):
  """``[T, H, W, 1]`` uint8 -> (x, y, area) per frame, in pixels."""
  m = mask[..., 0].astype(np.float64)
  ys, xs = np.mgrid[:m.shape[1], :m.shape[2]]
  area = m.sum((1, 2))
  return (m * xs).sum((1, 2)) / area, (m * ys).sum((1, 2)) / area, area


def test_subject_moves_in_the_named_direction(examples):
  seen = set()
  for ex in examples["train"] + examples["test"]:
    x, y, area = _centroid_track(ex["mask"])
    name = synthetic.DIRECTIONS[int(ex["direction"])]
    seen.add(name)
    dx, dy, growth = x[-1] - x[0], y[-1] - y[0], area[-1] / area[0]
    expected = {"left": dx < -4, "right": dx > 4, "up": dy < -4, "down": dy > 4,
                "towards": growth > 2.0, "away": growth < 0.5}[name]
    assert expected, (name, dx, dy, growth)
    if name in ("left", "right", "up", "down"):
      assert abs(growth - 1) < 0.1
      # Monotone along the named axis, still across it.
      along, across = (x, y) if name in ("left", "right") else (y, x)
      steps = np.diff(along) * (1 if name in ("right", "down") else -1)
      assert np.all(steps > 0) and np.ptp(across) < 1.0
    assert synthetic.DIRECTION_PHRASES[int(ex["direction"])] in ex["caption"]
  assert seen == set(synthetic.DIRECTIONS)


def test_reference_differs_from_target(examples):
  for ex in examples["train"] + examples["test"]:
    assert ex["reference_background"] != ex["background"]
    track, ref = ex["track"], ex["reference_track"]
    assert np.min(np.linalg.norm(track[:, :2] - ref[:2], axis=-1)) >= 0.19
    mean_scale = np.exp(np.mean(np.log(track[:, 2])))
    assert abs(math.log(ref[2] / mean_scale)) >= math.log(1.2) - 1e-6
    # Same subject: the fully covered reference pixels are its colours.
    full = ex["reference_mask"][..., 0] == 255
    assert full.sum() > 4
    dist = _off_subject_colours(ex["reference"][full] / 255.0, ex["primary_rgb"],
                                ex["secondary_rgb"])
    assert dist.max() < 0.02
  # And the reference image is not a crop of the target.
  ex = examples["train"][0]
  assert not np.array_equal(ex["reference"], ex["video"][0])


def test_train_and_test_subjects_are_disjoint(examples):
  train = {int(e["subject_id"]) for e in examples["train"]}
  test = {int(e["subject_id"]) for e in examples["test"]}
  assert len(train) == TINY.train_subjects and len(test) == TINY.test_subjects
  assert not train & test
  assert max(train) < synthetic.TEST_ID_OFFSET <= min(test)
  assert all(synthetic.split_of(s) == "test" for s in test)
  # Identities are distinct parameter vectors.
  vectors = np.stack([synthetic.make_subject(s).vector() for s in sorted(train | test)])
  assert len(np.unique(vectors.round(6), axis=0)) == len(vectors)
  # Videos of one subject share its identity attributes, and differ in content.
  a, b = examples["train"][0], examples["train"][1]
  assert a["subject_id"] == b["subject_id"]
  np.testing.assert_array_equal(a["primary_rgb"], b["primary_rgb"])
  assert not np.array_equal(a["video"], b["video"])


def test_captions_tokenize_without_unknowns(tiny_config, examples):
  hf = tokens.build_word_tokenizer(tokens.DEFAULT_WORDS, tiny_config.concepts.capacity)
  unk = hf.convert_tokens_to_ids(tokens.UNK)
  prompt_tokenizer = tokens.PromptTokenizer.from_config(tiny_config)
  for ex in examples["train"] + examples["test"]:
    for key in synthetic.CAPTION_KEYS:
      ids = hf(ex[key], add_special_tokens=False)["input_ids"]
      assert unk not in ids, (key, ex[key], hf.convert_ids_to_tokens(ids))
    # The training captions fit max_length without truncation.
    for key in ("caption", "still_caption"):
      assert len(ex[key].split()) <= TINY.max_caption_words
    # The placeholder caption names slot 0 only, and loses the subject's words.
    assert prompt_tokenizer.placeholder_slots(ex["placeholder_caption"]) == [0]
    assert synthetic.SHAPES[int(ex["shape"])] not in ex["placeholder_caption"].split()
    assert synthetic.SHAPES[int(ex["shape"])] in ex["caption"].split()
    assert synthetic.BACKGROUNDS[int(ex["background"])].phrase in ex["placeholder_caption"]
  assert synthetic.PLACEHOLDER == tokens.placeholder(0)
  ids = prompt_tokenizer.encode([ex["placeholder_caption"] for ex in examples["test"]])
  assert ids.shape == (len(examples["test"]), tiny_config.text.max_length)
  assert np.all((ids == prompt_tokenizer.placeholder_ids[0]).sum(1)
                == tiny_config.concepts.ref_tokens)


def test_captions_are_coarse_but_oracle_is_precise():
  # Many different colours share one caption word; the oracle tells them apart.
  subjects = [synthetic.make_subject(i) for i in range(1000)]
  names = {}
  for s in subjects:
    names.setdefault(synthetic.colour_name(s.primary_rgb, detailed=False), []).append(s)
  assert len(names) <= 11
  big = max(names.values(), key=len)
  spread = np.ptp(np.stack([s.primary_rgb for s in big]), axis=0).max()
  assert spread > 0.3
  oracles = {synthetic.oracle_phrase(s) for s in subjects}
  coarse = {captions._subject_phrases(s)[-1] for s in subjects}
  # The coarsest phrase has at most shapes x patterns x colour words values.
  assert len(coarse) <= len(synthetic.SHAPES) * len(synthetic.PATTERNS) * 11
  assert len(oracles) > 0.95 * len(subjects) and len(coarse) < 0.4 * len(subjects)
  assert synthetic.colour_name((0.9, 0.1, 0.1)) == "reddish"
  assert synthetic.colour_name((0.6, 0.75, 0.95)) == "light bluish"
  assert synthetic.colour_name((0.05, 0.05, 0.06)) == "blackish"


def test_subject_mask_for_evaluation():
  circle = next(synthetic.make_subject(i) for i in range(100)
                if synthetic.make_subject(i).shape == synthetic.SHAPES.index("circle"))
  m = synthetic.subject_mask(circle, 64)
  r = circle.size * 64
  np.testing.assert_allclose(m.sum(), math.pi * r * r, rtol=0.03)


def test_config_names_and_errors():
  assert synthetic.config_from_name("persvid_synthetic/demo") == synthetic.CONFIGS["demo"]
  assert synthetic.config_from_name("tiny", frames=8, height=None).frames == 8
  with pytest.raises(ValueError, match="unknown persvid_synthetic config"):
    synthetic.config_from_name("persvid_synthetic/huge")
  with pytest.raises(IndexError):
    synthetic.render_example(TINY, "test", TINY.num_examples("test"))
  with pytest.raises(ValueError, match="unknown split"):
    synthetic.render_example(TINY, "validation", 0)
