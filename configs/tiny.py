"""Every network of persvid_jax at toy size: the config the test suite runs on.

Launch (once training exists):
  python -m launch.train --config configs/tiny.py --workdir /tmp/tiny

Expected runtime: init + one forward of the whole stack in a few seconds on a
2-core CPU. Expected result: nothing meaningful is learned at this size; it
exists so that every code path (both cascade scales, the detail attention,
the concept swap, sharding over an 8-device CPU mesh) runs in tests.

Variants (comma-separated, e.g. ``configs/tiny.py:bf16,swap_at=output``):
  bf16           bfloat16 compute, float32 params.
  swap_at=S      'input' (textual-inversion style) or 'output' (the
                 patent's literal wording) for the concept swap.
  detail=0       build the generators without detail cross-attention.
  sr_kernel=K    spatial kernel of the SR network (default 5).
  sr_dilation=D  spatial dilation of the SR network (default 1).
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
  c.in_channels = 3                 # pixels (or VAE latents, later)
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


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, bf16=False, swap_at="input", detail=1,
                             sr_kernel=5, sr_dilation=1)
  config = ml_collections.ConfigDict()
  config.name = "tiny"
  config.seed = 0
  config.dtype = "bfloat16" if arg.bf16 else "float32"   # compute dtype
  config.param_dtype = "float32"
  config.attention_impl = "xla"   # jax.nn.dot_product_attention implementation

  # Base (low-res) video and the SR scale. [B, T, H, W, C], values in [-1, 1].
  config.video = ml_collections.ConfigDict(dict(
      frames=4, height=16, width=16, channels=3, sr_factor=2))

  config.concepts = ml_collections.ConfigDict(dict(
      capacity=8,            # C: bank slots, fixed so that adding never recompiles
      ref_tokens=2,          # K: pseudo-words per concept
      detail_tokens=4,       # N: detail tokens per concept
      swap_at=arg.swap_at,   # 'input' | 'output'
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

  # Mesh: -1 takes all remaining devices. Rules map logical axis names on
  # params/activations to mesh axes (persvid_jax/sharding.py).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  return config
