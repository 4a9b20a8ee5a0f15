"""The real TFDS build of persvid_synthetic/tiny into a temporary data_dir."""

import numpy as np
import pytest

pytest.importorskip("tensorflow")
import tensorflow_datasets as tfds  # noqa: E402

from persvid_jax.data import synthetic, synthetic_tfds  # noqa: E402

TINY = synthetic.CONFIGS["tiny"]


def test_builder_configs_mirror_the_renderer():
  names = [c.name for c in synthetic_tfds.PersvidSynthetic.BUILDER_CONFIGS]
  assert names == list(synthetic.CONFIGS)
  assert "persvid_synthetic" in tfds.list_builders()


def test_tiny_build_has_the_declared_features_and_sizes(tiny_tfds_dir):
  builder = tfds.builder("persvid_synthetic/tiny", data_dir=tiny_tfds_dir)
  assert builder.is_prepared()
  splits = builder.info.splits
  assert splits["train"].num_examples == TINY.num_examples("train") == 128
  assert splits["test"].num_examples == TINY.num_examples("test") == 32
  # zlib-compressed uint8: well under the raw 4*32*32*4 + 32*32*4 bytes per example.
  assert 0 < splits["train"].num_bytes < 128 * (4 * 32 * 32 * 4 + 32 * 32 * 4)
  features = builder.info.features
  assert features["video"].shape == (TINY.frames, TINY.height, TINY.width, 3)
  assert features["video"].np_dtype == np.uint8
  assert features["mask"].shape == (TINY.frames, TINY.height, TINY.width, 1)
  assert features["reference"].shape == (TINY.reference_size, TINY.reference_size, 3)
  assert features["track"].shape == (TINY.frames, 3)
  assert set(synthetic.CAPTION_KEYS) <= set(features.keys())
  assert isinstance(features["caption"], tfds.features.Text)

  # Stored examples are byte-for-byte the renderer's (same seed, same index).
  ds = builder.as_dataset(split="test", shuffle_files=False)
  stored = {int(ex["index"]): ex for ex in tfds.as_numpy(ds)}
  assert sorted(stored) == list(range(32))
  for i in (0, 17, 31):
    rendered = synthetic.render_example(TINY, "test", i)
    for key, value in rendered.items():
      got = stored[i][key]
      if isinstance(value, str):
        assert got.decode() == value, key
      else:
        np.testing.assert_array_equal(got, value, err_msg=key)
