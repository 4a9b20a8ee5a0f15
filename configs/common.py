"""The schema every model config builds on: each field, its meaning, toy-size values.

Not a config itself (no ``get_config``): ``tiny.py``, ``demo.py`` and
``modelscope.py`` are siblings that start from ``base_config`` and change
sizes, and import this file relative to their own::

    common = config_lib.import_sibling(__file__, "common")
    config = common.base_config("demo", stage=arg.stage, ...)

The pieces a config may rebuild on its own (``unet_config``, ``train_config``,
``latent_config``, ``use_latent_space``) live here too.
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
    # Personalize stage: mapper + extractor + the generator's detail attention; the
    # text encoder's placeholder rows would be a further option.
    "personalize": ("^mapper/", "^extractor/", "^unet/.*_detail/"),
}


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


def check_shared_options(arg: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` for a bad value of a variant option every model config has.

  ``sr_kernel`` and ``sr_dilation`` must be >= 1 and ``swap_at``,
  ``attention`` and ``norm`` one of their choices: the model would refuse these only once
  built, with a traceback.
  """
  config_lib.positive_int_options(arg, "sr_kernel", "sr_dilation")
  config_lib.choice_option(arg, "swap_at", ("input", "output"))
  config_lib.choice_option(arg, "attention", config_lib.ATTENTION_IMPLS)
  config_lib.choice_option(arg, "norm", config_lib.NORM_IMPLS)


def base_config(name: str, *, bf16: bool = False, stage: str = "base", swap_at: str = "input",
                detail: int = 1, sr_kernel: int = 5, sr_dilation: int = 1,
                attention: str = "auto", norm: str = "auto") -> ml_collections.ConfigDict:
  """Every field of a model config, at toy size (what ``tiny.py`` runs as it is).

  Args mirror the variant options (``tiny.py``'s docstring): compute dtype,
  training stage, concept swap site, detail cross-attention on/off, the SR
  network's spatial kernel and dilation, attention and GroupNorm implementations. Raises
  ``ConfigError`` for an unknown stage.
  """
  config = ml_collections.ConfigDict()
  config.name = name
  config.seed = 0
  config.dtype = "bfloat16" if bf16 else "float32"   # compute dtype
  config.param_dtype = "float32"
  # jax.nn.dot_product_attention's implementation; 'auto' resolves per call
  # (a runtime choice: the weights are the same for every value).
  config.attention_impl = attention
  # The generators' GroupNorm kernels: 'auto' = one Triton kernel (Pallas) a
  # direction where cuDNN's attention runs, XLA's three or four elsewhere; 'xla', 'pallas'.
  # The same choice runs the temporal convs' dropout inside the norm, GEGLU's
  # gradient and (in training) each transformer block's residual add + LayerNorm
  # as Triton kernels.
  config.norm_impl = norm

  # Base (low-res) video and the SR scale. [B, T, H, W, C], values in [-1, 1].
  config.video = ml_collections.ConfigDict(dict(
      frames=4, height=16, width=16, channels=3, sr_factor=2))

  config.concepts = ml_collections.ConfigDict(dict(
      capacity=8,            # C: bank slots, fixed so that adding never recompiles
      ref_tokens=2,          # K: pseudo-words per concept
      detail_tokens=4,       # N: detail tokens per concept
      swap_at=swap_at,       # 'input' | 'output'
      # Detail fusion: stored + target-image detail tokens -> 'concat' (2N tokens) |
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

  config.unet = unet_config(detail_cross_attention=bool(detail),
                            cross_attention_dim=config.text.width,
                            detail_dim=config.extractor.detail_dim)
  config.sr_unet = unet_config(detail_cross_attention=bool(detail),
                               cross_attention_dim=config.text.width,
                               detail_dim=config.extractor.detail_dim,
                               sr=True, cond_channels=3,
                               spatial_kernel_size=sr_kernel,
                               spatial_dilation=sr_dilation)

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

  config.train = train_config(stage)
  config.latent = latent_config()

  # Mesh: -1 takes all remaining devices. Rules map logical axis names on
  # params/activations to mesh axes (persvid_jax/sharding.py).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  return config
