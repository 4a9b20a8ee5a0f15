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
  latent         diffusion in the latent space of TINY_VAE (a frozen VAE with
                 random weights, factor 2: 8x8x4 base latents of 16 px frames,
                 16x16x4 SR latents of 32 px ones; see use_latent_space).
                 ``python -m launch.train --config configs/tiny.py:latent``
                 trains it like any stage; the data stays in pixels.
"""

import ml_collections

from persvid_jax import config_lib


def unet_config(**overrides) -> ml_collections.ConfigDict:
  """The generator schema (diffusers ``UNet3DConditionModel`` names) at toy size.

  ``head_dim`` is the real per-head width in the spatial/temporal
  transformers (diffusers' ``attention_head_dim`` config value, which its
  blocks use as the head width: heads = channels // head_dim).
  """
  c = ml_collections.ConfigDict()
  c.in_channels = 3                 # pixels (VAE latent channels in latent space)
  c.out_channels = 3
  c.block_out_channels = (32, 64)
  c.down_block_types = ("CrossAttnDownBlock3D", "DownBlock3D")
  c.up_block_types = ("UpBlock3D", "CrossAttnUpBlock3D")
  c.layers_per_block = 1
  c.head_dim = 16
  c.transformer_in_heads = 2        # diffusers hard-codes 8 at full size
  c.norm_num_groups = 8
  c.norm_eps = 1e-5
  c.cross_attention_dim = 32        # == text.width
  c.spatial_kernel_size = 3         # k in the k x k spatial convs of the resnets
  c.spatial_dilation = 1
  # Decoupled detail cross-attention (own K/V on the detail tokens, shared Q).
  c.detail_cross_attention = True
  c.detail_dim = 32                 # == extractor.detail_dim
  c.detail_scale = 1.0
  # SR conditioning: the upsampled low-res video is concatenated to the
  # noisy input and a noise-augmentation level is embedded like a timestep.
  c.sr = False
  c.cond_channels = 0
  c.remat = False
  c.update(overrides)
  return c


# What each stage trains (regexes over 'network/module/.../leaf' paths).
TRAINABLE = {
    "base": ("^text_encoder/", "^unet/"),
    "sr": ("^sr_unet/",),
    # Claim 9: mapper + extractor + the generator's detail attention; the
    # text encoder's placeholder rows would be a further option.
    "personalize": ("^mapper/", "^extractor/", "^unet/.*_detail/"),
}


# A toy AutoencoderKL (``config.vae`` fields, diffusers' names): two blocks, so
# f = 2. Its weights are a seeded random init (``config.latent.random_vae``);
# scaling_factor = 1 / 0.54, the std of its posterior mean on rendered frames.
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                norm_num_groups=8, in_channels=3, out_channels=3, scaling_factor=1.8,
                shift_factor=None, mid_block_add_attention=True, use_quant_conv=True,
                use_post_quant_conv=True)


def latent_config() -> ml_collections.ConfigDict:
  """The ``config.latent`` block: pixel space (the default) or the VAE's latents."""
  return ml_collections.ConfigDict(dict(
      enabled=False,          # True: every stage and the cascade work on VAE latents
      # Training encodes a posterior sample (diffusers' recipe); False: the mean.
      sample_posterior=True,
      # A model that holds no 'vae' network gets the seeded random init that
      # training gives it (models.stack.init_params): toy and test configs
      # only. Otherwise the VAE comes from the model / config.train.init_from
      # (python -m launch.convert --kind vae), and its absence is an error.
      random_vae=False,
  ))


def use_latent_space(config: ml_collections.ConfigDict, vae: dict, *,
                     random_vae: bool = False) -> None:
  """Puts a pixel-space config into the latent space of the VAE ``vae`` (in place).

  ``config.video`` becomes what the generators denoise: sizes divided by the
  VAE's factor ``f = 2 ** (len(block_out_channels) - 1)``, channels = latent
  channels; the UNets' in/out channels and the SR network's conditioning
  channels follow; x0 is no longer clipped to [-1, 1] (latents are not
  bounded). ``config.data`` stays in pixels, so data, masks and outputs are
  unchanged. Call it after every other change of ``config.video``.

  Raises:
    ConfigError: frame sizes not divisible by ``f``.
  """
  f = 2 ** (len(vae["block_out_channels"]) - 1)
  v = config.video
  if v.height % f or v.width % f:
    raise config_lib.ConfigError(f"latent space: video {v.height}x{v.width} is not divisible "
                                 f"by the VAE's factor {f}")
  c = int(vae["latent_channels"])
  v.update(dict(height=v.height // f, width=v.width // f, channels=c))
  config.unet.update(dict(in_channels=c, out_channels=c))
  config.sr_unet.update(dict(in_channels=c, out_channels=c, cond_channels=c))
  config.diffusion.clip_x0 = False
  config.latent.update(dict(enabled=True, random_vae=random_vae))
  config.vae = ml_collections.ConfigDict(dict(vae))


def train_config(stage: str = "base") -> ml_collections.ConfigDict:
  """The ``config.train`` block (optimizer, stage, cadence) at toy size."""
  if stage not in TRAINABLE:
    raise config_lib.ConfigError(f"stage={stage!r}; use one of {sorted(TRAINABLE)}")
  return ml_collections.ConfigDict(dict(
      stage=stage,                 # 'base' | 'sr' | 'personalize'
      trainable=TRAINABLE[stage],
      init_from=None,              # earlier stage's workdir (its EMA params) or an exported model dir
      init_networks=(),            # which networks init_from gives; (): every one this stage holds
      batch_size=8,                # global batch
      total_steps=200,
      schedule_steps=None,         # cosine decay horizon; None: total_steps
      learning_rate=1e-3, warmup_steps=20, lr_min_ratio=0.1,
      weight_decay=0.0, adam_b1=0.9, adam_b2=0.99, grad_clip_norm=1.0,
      ema_decay=0.99,
      p_drop_text=0.1, p_drop_ref=0.1, p_drop_detail=0.1,   # condition dropout (CFG)
      p_plain_caption=0.0,         # personalize: rows trained on the plain caption instead
      sr_crop=None,                # sr: random crops of this side (latent space: in latents)
      subject_loss_weight=1.0,     # base/personalize: loss weight of subject pixels (1 = off)
      # A NaN/Inf loss or gradient: 0 stops the run at once (naming the step and
      # the last good checkpoint); N > 0 skips such steps (no update) up to N.
      max_nonfinite_skips=0,
      log_every_steps=10,
      checkpoint_every_steps=100, keep_checkpoints=3, async_checkpoints=True,
      sample_every_steps=100, preview_examples=4,
  ))


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
                             sr_kernel=5, sr_dilation=1, attention="auto")
  # The model would refuse these only once built (a ValueError traceback).
  config_lib.positive_int_options(arg, "sr_kernel", "sr_dilation")
  config_lib.choice_option(arg, "swap_at", ("input", "output"))
  config_lib.choice_option(arg, "attention", config_lib.ATTENTION_IMPLS)
  config = ml_collections.ConfigDict()
  config.name = "tiny"
  config.seed = 0
  config.dtype = "bfloat16" if arg.bf16 else "float32"   # compute dtype
  config.param_dtype = "float32"
  # jax.nn.dot_product_attention's implementation; 'auto' resolves per call
  # (a runtime choice: the weights are the same for every value).
  config.attention_impl = arg.attention

  # Base (low-res) video and the SR scale. [B, T, H, W, C], values in [-1, 1].
  config.video = ml_collections.ConfigDict(dict(
      frames=4, height=16, width=16, channels=3, sr_factor=2))

  config.concepts = ml_collections.ConfigDict(dict(
      capacity=8,            # C: bank slots, fixed so that adding never recompiles
      ref_tokens=2,          # K: pseudo-words per concept
      detail_tokens=4,       # N: detail tokens per concept
      swap_at=arg.swap_at,   # 'input' | 'output'
      # Claim 6: stored + target-image detail tokens -> 'concat' (2N tokens) |
      # 'mean' | 'weighted' (fusion_weight * stored + (1 - w) * extracted).
      fusion="concat", fusion_weight=0.5,
      subject_fill=0.4,      # share of a reference crop's side the subject spans
  ))

  config.text = ml_collections.ConfigDict(dict(
      vocab_size=512, max_length=16, width=32, layers=2, heads=2, mlp_dim=64,
      act="quick_gelu", layer_norm_eps=1e-5, tokenizer_dir=None))

  config.image = ml_collections.ConfigDict(dict(
      image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64,
      act="quick_gelu", layer_norm_eps=1e-5, projection_dim=0))

  config.mapper = ml_collections.ConfigDict(dict(width=32, layers=1, heads=2, mlp_dim=64))

  config.extractor = ml_collections.ConfigDict(dict(
      image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64,
      detail_dim=32))

  detail = bool(arg.detail)
  config.unet = unet_config(detail_cross_attention=detail,
                            cross_attention_dim=config.text.width,
                            detail_dim=config.extractor.detail_dim)
  config.sr_unet = unet_config(detail_cross_attention=detail,
                               cross_attention_dim=config.text.width,
                               detail_dim=config.extractor.detail_dim,
                               sr=True, cond_channels=3,
                               spatial_kernel_size=arg.sr_kernel,
                               spatial_dilation=arg.sr_dilation)

  # Diffusion (persvid_jax/diffusion): pixel space, so x0 is clipped to [-1, 1].
  config.diffusion = ml_collections.ConfigDict(dict(
      schedule="linear",          # 'linear' (DDPM) | 'scaled_linear' (SD/ModelScope) | 'cosine'
      num_timesteps=1000,
      prediction="eps",           # what the generators output: 'eps' | 'v' | 'x0'
      min_snr_gamma=5.0,          # Min-SNR-gamma loss weighting; None: uniform
      sampler="ddim",             # 'ddim' | 'ddpm'
      sample_steps=10,            # timesteps visited when sampling
      sr_sample_steps=None,       # SR network's steps; None: sample_steps
      timestep_spacing="trailing",
      eta=0.0,                    # DDIM stochasticity (0: deterministic, 1: DDPM-like)
      guidance_text=5.0,          # CFG scale of the text condition
      guidance_detail=3.0,        # CFG scale of the detail tokens; None: = guidance_text
      sr_noise_aug=100,           # timestep the upsampled base video is noised to; None: off
      resize_method="bicubic",    # base -> SR upsampling (jax.image.resize)
      clip_x0=True,               # clip the x0 estimate to [-1, 1] (pixels yes, latents no)
  ))

  # Data (persvid_jax/data): examples at the SR scale's resolution (base
  # 16 px x sr_factor 2 = 32 px); the base network sees a 2x downsample.
  config.data = ml_collections.ConfigDict(dict(
      source="tfds",                  # 'tfds' | 'renderer' (numpy, no TF, no build) | 'folder'
      name="persvid_synthetic/tiny",  # TFDS name; for 'renderer' its builder config
      data_dir=None,                  # TFDS data_dir; None: ~/tensorflow_datasets
      prepare=True,                   # build a missing persvid_synthetic on first use
      frames=config.video.frames,     # example shape, checked against the dataset
      height=config.video.height * config.video.sr_factor,
      width=config.video.width * config.video.sr_factor,
      reference_size=config.image.image_size,
      train_split="train", eval_split="test",
      shuffle_buffer=256, cache=True, prefetch=2,
      image_fraction=0.0,             # share of examples turned into 1-frame stills
      folder=None, captions=None,     # 'folder': corpus dir; CSV (default folder/captions.csv)
      folder_kind="any",              # 'video' | 'image' | 'any' extensions
      frame_stride=1,                 # 'folder': take every n-th video frame
      workers=4,                      # numpy sources: loader threads
      processes=0,                    # 'renderer': >0 renders in that many spawned processes
  ))

  config.train = train_config(arg.stage)
  config.latent = latent_config()
  if arg.micro:
    shrink_to_micro(config)
  if arg.latent:
    use_latent_space(config, TINY_VAE, random_vae=True)
    # A random VAE's posterior variance is not learned: its samples would be noise.
    config.latent.sample_posterior = False

  # Mesh: -1 takes all remaining devices. Rules map logical axis names on
  # params/activations to mesh axes (persvid_jax/sharding.py).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  return config
