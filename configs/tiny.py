"""Every network of persvid_jax at toy size: the config the test suite runs on.

Launch:
  python -m launch.train --config configs/tiny.py --workdir /tmp/tiny

Expected runtime: init + one forward of the whole stack in a few seconds on a
2-core CPU. Expected result: nothing meaningful is learned at this size; it
exists so that every code path (both cascade scales, the detail attention,
the concept swap, sharding over an 8-device CPU mesh) runs in tests.

Variants (comma-separated, e.g. ``configs/tiny.py:bf16,swap_at=output``):
  bf16           bfloat16 compute, float32 params.
  micro          shrink every shape further (training tests; see shrink_to_micro).
  stage=S        training stage: 'base' (default), 'sr' or 'personalize'.
  swap_at=S      'input' (textual-inversion style) or 'output' (the
                 patent's literal wording) for the concept swap.
  detail=0       build the generators without detail cross-attention.
  sr_kernel=K    spatial kernel of the SR network (default 5).
  sr_dilation=D  spatial dilation of the SR network (default 1).
  attention=A    'auto' (default: cuDNN's fused attention on a CUDA GPU in
                 bf16, XLA's elsewhere), 'xla' or 'cudnn' (see
                 persvid_jax/models/attention.py).
  norm=N         the generators' GroupNorm kernels: 'auto' (default: one Triton
                 kernel a direction on a CUDA GPU, XLA's elsewhere), 'xla' or 'pallas'.
  latent         diffusion in the latent space of TINY_VAE (a frozen VAE with
                 random weights, factor 2: 8x8x4 base latents of 16 px frames,
                 16x16x4 SR latents of 32 px ones; see common.use_latent_space).
                 ``python -m launch.train --config configs/tiny.py:latent``
                 trains it like any stage; the data stays in pixels.
"""

import ml_collections

from persvid_jax import config_lib

common = config_lib.import_sibling(__file__, "common")


# A toy AutoencoderKL (``config.vae`` fields, diffusers' names): two blocks, so
# f = 2. Its weights are a seeded random init (``config.latent.random_vae``);
# scaling_factor = 1 / 0.54, the std of its posterior mean on rendered frames.
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                norm_num_groups=8, in_channels=3, out_channels=3, scaling_factor=1.8,
                shift_factor=None, mid_block_add_attention=True, use_quant_conv=True,
                use_post_quant_conv=True)


def shrink_to_micro(config: ml_collections.ConfigDict) -> None:
  """Smallest shapes that still run every code path (training tests on CPU).

  2 frames of 8x8 at the base scale (16x16 at the SR scale), 16-px
  reference images, the numpy renderer as data source (no TFDS build). A
  train step takes 0.13 s (base), 0.16 s (personalize) and 0.44 s (SR, whose
  mid-block attention runs over its 16x16 frames) on a 2-core CPU instead of
  ~1.4 s at the tiny config, where spatial attention over 256 pixels dominates.

  Both generators have one level (no down/up-sampling; attention, text and
  detail cross-attention in the mid block only): the train step's program is
  half the size (base stage, measured: XLA compile 41 -> 17 s, tracing 9 ->
  5 s, 2043 -> 1043 state leaves), and compiling it is most of every training
  test. The multi-level blocks run in the tiny config's model tests.
  """
  config.video.update(dict(frames=2, height=8, width=8))
  one_level = dict(block_out_channels=(32,), down_block_types=("DownBlock3D",),
                   up_block_types=("UpBlock3D",))
  config.unet.update(one_level)
  config.sr_unet.update(one_level)
  config.image.update(dict(image_size=16, patch_size=8))
  config.extractor.update(dict(image_size=16, patch_size=8))
  config.data.update(dict(source="renderer", frames=2, height=16, width=16,
                          reference_size=16, workers=1))
  # One decay horizon whatever total_steps a test picks: the train step is
  # then one program, compiled once per persistent cache.
  config.train.update(dict(batch_size=4, log_every_steps=5, schedule_steps=200))


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, bf16=False, swap_at="input", detail=1, stage="base",
                             micro=False, latent=False,
                             sr_kernel=5, sr_dilation=1, attention="auto",
                             norm="auto")
  common.check_shared_options(arg)
  config = common.base_config("tiny", bf16=arg.bf16, stage=arg.stage, swap_at=arg.swap_at,
                              detail=arg.detail, sr_kernel=arg.sr_kernel,
                              sr_dilation=arg.sr_dilation, attention=arg.attention,
                              norm=arg.norm)
  if arg.micro:
    shrink_to_micro(config)
  if arg.latent:
    common.use_latent_space(config, TINY_VAE, random_vae=True)
    # A random VAE's posterior variance is not learned: its samples would be noise.
    config.latent.sample_posterior = False
  return config
