"""Data: the synthetic world, users' folders, and the input pipeline.

* ``synthetic``: the pure-numpy renderer of subject videos (no TensorFlow).
* ``synthetic_tfds``: the TFDS builder ``persvid_synthetic`` over it
  (``python -m persvid_jax.data --name tiny --data_dir DIR`` builds it).
* ``folders``: users' corpora — a folder of videos/images + captions.
* ``pipeline``: ``make_dataset(config, split, ...)`` -> numpy batches, from
  TFDS (tf.data), the renderer (numpy only) or a folder (numpy only).

Import the submodules; nothing heavy is imported here, so that the renderer
runs where TensorFlow is absent.
"""


class DataError(ValueError):
  """A data problem the user can fix (missing folder or CSV, unbuilt dataset,
  shapes that disagree with the config). The message says what to do."""
