"""make_dataset: batch shapes and dtypes, per-host sharding, determinism, resume, stills."""

import numpy as np
import pytest

from persvid_jax.concepts import tokens
from persvid_jax.data import DataError, pipeline, synthetic

SOURCES = ("tfds", "renderer")


def _take(it, n):
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("source", SOURCES)
def test_batch_shapes_and_dtypes(make_config, source):
  config = make_config(source)
  tok = tokens.PromptTokenizer.from_config(config)
  batch = next(pipeline.make_dataset(config, "train", batch_size=4, process_index=0,
                                     process_count=1, tokenize=tok.encode))
  d, B = config.data, 4
  expected = {
      "video": ((B, d.frames, d.height, d.width, 3), np.float32),
      "mask": ((B, d.frames, d.height, d.width, 1), np.float32),
      "frame_mask": ((B, d.frames), np.float32),
      "reference": ((B, d.reference_size, d.reference_size, 3), np.float32),
      "reference_mask": ((B, d.reference_size, d.reference_size, 1), np.float32),
      "has_reference": ((B,), np.float32),
      "subject_id": ((B,), np.int64),
      "caption": ((B,), object),
      "placeholder_caption": ((B,), object),
      "caption_tokens": ((B, config.text.max_length), np.int32),
      "placeholder_caption_tokens": ((B, config.text.max_length), np.int32),
      "primary_rgb": ((B, 3), np.float32),
      "direction": ((B,), np.int32),
      "track": ((B, d.frames, 3), np.float32),
  }
  for key, (shape, dtype) in expected.items():
    assert batch[key].shape == shape and batch[key].dtype == dtype, (key, batch[key].shape)
  assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
  assert 0.0 <= batch["mask"].min() and batch["mask"].max() == 1.0
  assert isinstance(batch["caption"][0], str)
  np.testing.assert_array_equal(batch["caption_tokens"], tok.encode(list(batch["caption"])))
  assert set(pipeline.arrays_only(batch)) == {k for k, v in batch.items() if v.dtype != object}


def test_tfds_and_renderer_give_the_same_examples(make_config):
  kw = dict(batch_size=8, process_index=0, process_count=1, shuffle=False, repeat=False)
  a = next(pipeline.make_dataset(make_config("tfds"), "test", **kw))
  b = next(pipeline.make_dataset(make_config("renderer"), "test", **kw))
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("source", SOURCES)
def test_two_processes_get_disjoint_halves(make_config, source):
  config = make_config(source)
  seen = []
  for p in range(2):
    it = pipeline.make_dataset(config, "train", batch_size=8, process_index=p, process_count=2,
                               shuffle=(source == "renderer"), repeat=False,
                               drop_remainder=False)
    seen.append(np.concatenate([b["index"] for b in it]).tolist())
  assert len(seen[0]) == len(seen[1]) == 64
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(128))


@pytest.mark.parametrize("source", SOURCES)
def test_deterministic_order_and_resume(make_config, source):
  config = make_config(source, shuffle_buffer=64)
  kw = dict(batch_size=16, process_index=0, process_count=1)
  first = _take(pipeline.make_dataset(config, "train", **kw), 10)   # > 1 epoch: 8 batches
  again = _take(pipeline.make_dataset(config, "train", **kw), 10)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["video"], b["video"])
  order = np.concatenate([b["index"] for b in first])
  assert not np.array_equal(order[:16], np.arange(16))            # shuffled
  assert sorted(order[:128].tolist()) == list(range(128))       # one epoch = every example once
  resumed = _take(pipeline.make_dataset(config, "train", start_batch=7, **kw), 3)
  for a, b in zip(first[7:], resumed):
    np.testing.assert_array_equal(a["index"], b["index"])
  other = next(pipeline.make_dataset(config, "train", seed=123, **kw))
  assert not np.array_equal(other["index"], first[0]["index"])


@pytest.mark.parametrize("source", SOURCES)
def test_image_fraction_makes_stills(make_config, source):
  config = make_config(source, image_fraction=0.5)
  batches = _take(pipeline.make_dataset(config, "train", batch_size=16, process_index=0,
                                        process_count=1), 2)
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  still = batch["frame_mask"].sum(1) == 1
  assert 4 <= still.sum() <= 28
  assert np.all(batch["frame_mask"][~still] == 1)
  assert np.all(batch["direction"][still] == -1) and np.all(batch["direction"][~still] >= 0)
  np.testing.assert_array_equal(batch["caption"][still], batch["still_caption"][still])
  assert np.all(batch["video"][still][:, 1:] == -1.0)              # zero padding frames
  assert np.all(batch["mask"][still][:, 0].max((1, 2, 3)) > 0)      # the subject is there
  for caption in batch["caption"][still]:
    assert "moving" not in caption


def test_user_errors(make_config):
  kw = dict(batch_size=2, process_index=0, process_count=1)
  with pytest.raises(DataError, match="config.data.source"):
    pipeline.make_dataset(make_config("nowhere"), "train", **kw)
  with pytest.raises(DataError, match="config.data.folder"):
    pipeline.make_dataset(make_config("folder"), "train", **kw)
  with pytest.raises(DataError, match="image_fraction"):
    pipeline.make_dataset(make_config("renderer", image_fraction=2.0), "train", **kw)
  with pytest.raises(DataError, match="splits"):
    pipeline.make_dataset(make_config("renderer"), "validation", **kw)


def test_tfds_user_errors(make_config, tmp_path):
  kw = dict(batch_size=2, process_index=0, process_count=1)
  # Raised by make_dataset itself, not at the first next().
  with pytest.raises(DataError, match="not built"):
    pipeline.make_dataset(make_config("tfds", data_dir=str(tmp_path), prepare=False),
                          "train", **kw)
  with pytest.raises(DataError, match="frames/height/width"):
    pipeline.make_dataset(make_config("tfds", frames=8), "train", **kw)


def test_renderer_in_processes_gives_the_same_batches(make_config):
  kw = dict(batch_size=4, process_index=1, process_count=2, start_batch=3)
  threads = next(pipeline.make_dataset(make_config("renderer"), "train", **kw))
  config = make_config("renderer", processes=2)
  processes = next(pipeline.make_dataset(config, "train", **kw))
  for key in threads:
    np.testing.assert_array_equal(threads[key], processes[key], err_msg=key)


def test_renderer_source_renders_any_shape(make_config):
  config = make_config("renderer", frames=6, height=24, width=40, reference_size=16)
  batch = next(pipeline.make_dataset(config, "test", batch_size=2, process_index=0,
                                     process_count=1))
  assert batch["video"].shape == (2, 6, 24, 40, 3)
  assert batch["reference"].shape == (2, 16, 16, 3)
  assert pipeline.synthetic_config(config) == synthetic.CONFIGS["tiny"].replace(
      frames=6, height=24, width=40, reference_size=16)
