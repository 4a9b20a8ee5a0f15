"""Fixtures for the data tests: the real tiny persvid_synthetic build (once per session).

Tests that need TensorFlow (the TFDS build and the tf.data source) skip where
it is not installed; the renderer and folder tests never need it.
"""

import pytest


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory):
  """A TFDS data_dir holding the real ``persvid_synthetic/tiny`` build (no mocks)."""
  pytest.importorskip("tensorflow")
  from persvid_jax.data import synthetic_tfds
  data_dir = tmp_path_factory.mktemp("tfds")
  synthetic_tfds.prepare("tiny", str(data_dir))
  return str(data_dir)


@pytest.fixture
def make_config(tiny_config, request):
  """``make_config(source, **data_overrides)`` -> a copy of the tiny config.

  For ``source='tfds'`` it reads the session's build (built on first use).
  """
  def make(source, **data):
    config = tiny_config.copy_and_resolve_references()
    config.data.source = source
    if source == "tfds":
      config.data.data_dir = request.getfixturevalue("tiny_tfds_dir")
    config.data.update(data)
    return config
  return make
