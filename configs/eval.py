"""Evaluation suites for ``python -m launch.evaluate``.

  python -m launch.evaluate --out results.json                 # method vs removed
  python -m launch.evaluate --ablations --out ablations.json   # every variant
  python -m launch.evaluate --config configs/eval.py:size=tiny ...   # the test's size

``suite``: held-out ``persvid_synthetic`` subjects x prompts x seeds (the
spread reported is over seeds); ``--config.suite.scale=base`` scores the
base network's videos instead of the cascade's. ``variants``: what runs without
``--ablations`` (with it: all of ``evaluate.suite.VARIANTS``).
``dreambench``: the DreamBench protocol (``--dreambench``): subjects
(empty = all 30), the first ``prompts`` templates of each list, seeds.
``probe``: the denoising probe (``--probe``): held-out examples, timesteps,
noise draws per timestep.

Variants: ``size=default|tiny``.
"""

import ml_collections

from persvid_jax import config_lib


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, size="default")
  if arg.size not in ("default", "tiny"):
    raise config_lib.ConfigError(f"configs/eval.py: size={arg.size!r}; use default or tiny")
  tiny = arg.size == "tiny"
  config = ml_collections.ConfigDict()
  config.name = f"eval_{arg.size}"
  config.suite = ml_collections.ConfigDict(dict(
      subjects=2 if tiny else 8, prompts=1,
      seeds=(0, 1) if tiny else (0, 1, 2), photos=2, photo_size=96,
      # 0: the model config's sampler steps.
      steps=2 if tiny else 0, sr_steps=1 if tiny else 0, world_seed=0,
      # None: the model config's CFG scales (diffusion.guidance_text / _detail).
      guidance_text=None, guidance_detail=None,
      # 'final': score the cascade's videos; 'base': the base network's, at its size.
      scale="final"))
  config.variants = ("method", "removed")
  config.dreambench = ml_collections.ConfigDict(dict(
      root="../shared/dreambench", subjects=("backpack", "cat") if tiny else (),
      prompts=1 if tiny else 25, seeds=(0,), photos=2 if tiny else 4))
  config.probe = ml_collections.ConfigDict(dict(
      examples=4 if tiny else 32, timesteps=(100, 300, 500, 700, 900),
      draws=1 if tiny else 2))
  return config
