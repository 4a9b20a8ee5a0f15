"""The TFDS builder ``persvid_synthetic``: the numpy renderer written to disk.

No download: ``_generate_examples`` calls ``synthetic.render_example`` for
every index of a split. Importing this module registers the builder, so
``tfds.builder('persvid_synthetic/tiny', data_dir=...)`` finds it.

Build from the command line (the pipeline also builds a missing dataset
itself when ``config.data.prepare`` is set)::

    python -m persvid_jax.data --name tiny --data_dir /tmp/tfds

(``persvid_jax/data/__main__.py``: running this module itself as ``__main__``
would register the builder under the wrong module.)

Builder configs are ``synthetic.CONFIGS`` (tiny, small, demo). Other shapes:
``PersvidSynthetic(config=PersvidSyntheticConfig(name='mine',
render=synthetic.CONFIGS['tiny'].replace(frames=16)), data_dir=...)``.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from persvid_jax import config_lib
from persvid_jax.data import synthetic

_DESCRIPTION = """\
Procedurally rendered short videos of subjects (shape x two colours x pattern x
size/aspect, all continuous beyond the coarse caption words) moving in a named
direction over a named background, with captions (plain, with the placeholder
<c0>, and an oracle caption of precise attributes), per-frame subject masks,
ground-truth attributes, and a masked reference image of the same subject in
another position, scale and background. Train and test subjects are disjoint
(train ids < 1,000,000 <= test ids).
"""


@dataclasses.dataclass(eq=False)
class PersvidSyntheticConfig(tfds.core.BuilderConfig):
  """A builder config: a name plus the renderer's ``SyntheticConfig``."""
  render: synthetic.SyntheticConfig = dataclasses.field(default_factory=synthetic.SyntheticConfig)


def features(render: synthetic.SyntheticConfig) -> tfds.features.FeaturesDict:
  """The feature spec of an example rendered with ``render``."""
  T, H, W, R = render.frames, render.height, render.width, render.reference_size
  zlib = tfds.features.Encoding.ZLIB    # flat backgrounds compress well

  def tensor(shape, dtype, encoding=tfds.features.Encoding.NONE):
    return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=encoding)

  spec = {
      "index": tensor((), np.int64),
      "subject_id": tensor((), np.int64),
      "video": tensor((T, H, W, 3), np.uint8, zlib),
      "mask": tensor((T, H, W, 1), np.uint8, zlib),
      "frame_mask": tensor((T,), np.uint8),
      "reference": tensor((R, R, 3), np.uint8, zlib),
      "reference_mask": tensor((R, R, 1), np.uint8, zlib),
      "has_reference": tensor((), np.uint8),
      "shape": tensor((), np.int32),
      "primary_rgb": tensor((3,), np.float32),
      "secondary_rgb": tensor((3,), np.float32),
      "pattern": tensor((), np.int32),
      "pattern_params": tensor((3,), np.float32),
      "size": tensor((), np.float32),
      "aspect": tensor((), np.float32),
      "direction": tensor((), np.int32),
      "background": tensor((), np.int32),
      "background_rgb": tensor((3,), np.float32),
      "track": tensor((T, 3), np.float32),
      "reference_background": tensor((), np.int32),
      "reference_track": tensor((3,), np.float32),
  }
  spec.update({k: tfds.features.Text() for k in synthetic.CAPTION_KEYS})
  return tfds.features.FeaturesDict(spec)


class PersvidSynthetic(tfds.core.GeneratorBasedBuilder):
  """Rendered subject videos for personalized text-to-video (no download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      PersvidSyntheticConfig(
          name=name, render=render,
          description=(f"{render.frames}x{render.height}x{render.width} video, "
                       f"{render.reference_size}px reference, "
                       f"{render.train_subjects}/{render.test_subjects} train/test subjects "
                       f"x {render.videos_per_subject} videos"))
      for name, render in synthetic.CONFIGS.items()]
  DEFAULT_CONFIG_NAME = "tiny"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=features(self.builder_config.render),
        supervised_keys=None,
        # Stored in index order: an unshuffled read (evaluation) is the
        # renderer's order, so both sources give identical batches.
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in synthetic.SPLITS}

  def _generate_examples(self, split: str):
    render = self.builder_config.render
    for i in range(render.num_examples(split)):
      yield i, synthetic.render_example(render, split, i)


def prepare(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds ``persvid_synthetic/<name>`` into ``data_dir`` unless already there."""
  short = name.split("/", 1)[-1]
  builder = PersvidSynthetic(config=short, data_dir=data_dir)
  if not builder.is_prepared():
    # Statistics would re-read the whole split through TF; the generator's
    # sizes are known anyway.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder


def main(argv=None) -> None:
  """``python -m persvid_jax.data --name tiny [--data_dir DIR]``: builds the dataset."""
  parser = argparse.ArgumentParser(description="Build persvid_synthetic into a TFDS data_dir.")
  parser.add_argument("--name", default="tiny", choices=sorted(synthetic.CONFIGS))
  parser.add_argument("--data_dir", default=None, help="default: TFDS's (~/tensorflow_datasets)")
  args = parser.parse_args(argv)
  # Before rendering: TFDS would fail with a traceback.
  problem = args.data_dir and config_lib.workdir_problem(args.data_dir, "--data_dir")
  if problem:
    parser.exit(2, f"error: {problem}\n")     # one line, status 2, no traceback
  builder = prepare(args.name, args.data_dir)
  print(f"{builder.info.full_name} in {builder.data_dir}: "
        + ", ".join(f"{k} {v.num_examples} examples ({int(v.num_bytes)} bytes)"
                    for k, v in builder.info.splits.items()))

