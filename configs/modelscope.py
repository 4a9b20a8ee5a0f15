"""The generator at the layout of diffusers' default ``UNet3DConditionModel``.

That is ModelScope text-to-video (and Zeroscope, whose upscaler has the same
architecture): block channels 320/640/1280/1280, 2 layers per block,
1024-d cross-attention (OpenCLIP ViT-H text width), GroupNorm 32, 4 latent
channels. The base generator built from this config without detail
cross-attention has exactly 1,411,233,860 parameters, the count of diffusers'
default model; ``tests/models/test_unet3d.py`` pins it.

Launch (abstractly, no weights needed):
  python -m launch.model_info --config configs/modelscope.py:detail=0

Expected runtime: seconds (jax.eval_shape only). Expected result: the
parameter table, 1411.23 M for the base generator.

Variants: ``bf16``, ``detail=0`` (plain ModelScope layout), ``swap_at=...``,
``sr_kernel=K`` and ``sr_dilation=D`` (the SR network's spatial kernel; default
3 at dilation 2, the base network's is 3 at dilation 1: the kernel change),
``attention=auto|xla|cudnn`` (default auto: cuDNN's fused attention on a CUDA GPU),
``norm=auto|xla|pallas`` (the GroupNorms' kernels; default auto: one Triton kernel
a direction on a CUDA GPU).
"""

import ml_collections

from persvid_jax import config_lib

common = config_lib.import_sibling(__file__, "common")


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, bf16=True, swap_at="input", detail=1,
                             sr_kernel=3, sr_dilation=2, attention="auto",
                             norm="auto")
  common.check_shared_options(arg)
  # Sizes below replace the schema's toy ones; its defaults stay for the rest.
  config = common.base_config("modelscope", bf16=arg.bf16, attention=arg.attention,
                              norm=arg.norm)

  # 256 px video in the VAE's latent space (factor 8): 32x32x4 latents.
  config.video = ml_collections.ConfigDict(dict(
      frames=16, height=32, width=32, channels=4, sr_factor=2))
  config.concepts = ml_collections.ConfigDict(dict(
      capacity=64, ref_tokens=4, detail_tokens=16, swap_at=arg.swap_at))
  # OpenCLIP ViT-H/14 text tower (ModelScope's text encoder): 1024 wide.
  config.text = ml_collections.ConfigDict(dict(
      vocab_size=49408 + 64, max_length=77, width=1024, layers=23, heads=16,
      mlp_dim=4096, act="gelu", layer_norm_eps=1e-5, tokenizer_dir=None))
  # CLIP ViT-L/14 vision tower.
  config.image = ml_collections.ConfigDict(dict(
      image_size=224, patch_size=14, width=1024, layers=24, heads=16,
      mlp_dim=4096, act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768))
  config.mapper = ml_collections.ConfigDict(dict(width=1024, layers=2, heads=16, mlp_dim=4096))
  config.extractor = ml_collections.ConfigDict(dict(
      image_size=224, patch_size=16, width=768, layers=6, heads=12, mlp_dim=3072,
      detail_dim=768))

  detail = bool(arg.detail)
  full = dict(
      in_channels=4, out_channels=4,
      block_out_channels=(320, 640, 1280, 1280),
      down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
      up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
      layers_per_block=2, head_dim=64, transformer_in_heads=8,
      norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1024,
      detail_cross_attention=detail, detail_dim=768)
  config.unet = common.unet_config(**full)
  config.sr_unet = common.unet_config(**full, sr=True, cond_channels=4,
                                      spatial_kernel_size=arg.sr_kernel,
                                      spatial_dilation=arg.sr_dilation)
  # ModelScope's scheduler (scaled-linear, eps, 50 DDIM steps, CFG 9) in VAE
  # latent space, so x0 is not clipped.
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="scaled_linear", num_timesteps=1000, prediction="eps", min_snr_gamma=5.0,
      sampler="ddim", sample_steps=50, timestep_spacing="trailing", eta=0.0,
      guidance_text=9.0, guidance_detail=None, sr_noise_aug=100,
      resize_method="bicubic", clip_x0=False))
  # Data: 256 px pixels (the VAE's 8x over 32x32 latents), rendered on the
  # fly (no TF, no build; a 256 px TFDS build would be large). For real
  # training set source='folder' and data.folder to a corpus.
  config.data.update(dict(
      source="renderer", name="persvid_synthetic/demo", frames=config.video.frames,
      height=256, width=256, reference_size=config.image.image_size,
      shuffle_buffer=1024, cache=False, processes=8))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  return config
