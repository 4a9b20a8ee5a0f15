"""The whole model stack built from one config: the six networks of the method.

``ModelStack.from_config(config)`` builds the text encoder (first encoder),
image encoder (second encoder), reference mapper, detail extractor, and the
base and SR generators with the config's dtypes. ``example_inputs`` gives
shape-correct dummy inputs for ``init``; ``abstract_variables`` runs
``jax.eval_shape`` over every ``init`` (no memory, no FLOPs), which is what
parameter counts, sharding plans and weight-import validation start from.

Latent space (``config.latent.enabled``): the stack also holds the frozen VAE
(network ``vae``, ``models/vae.py``, spec ``config.vae``) and the generators
denoise its scaled latents. ``config.video`` then holds the *latent* sizes and
channels (what the UNets see; ``configs/modelscope.py`` already counts so),
while data, masks and outputs stay in pixels: ``pixel_size`` gives a scale's
pixel frame size (latent size times the VAE's factor ``f``), ``encode_latents``
/ ``decode_latents`` move between the two. Pixel space is the default, and a
config without ``config.latent`` (every model exported before it) is in pixels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from persvid_jax.models.extractor import DetailExtractor
from persvid_jax.models.image_encoder import ImageEncoder, ImageFeatures
from persvid_jax.models.mapper import ReferenceMapper
from persvid_jax.models.text_encoder import TextEncoder
from persvid_jax.models.unet3d import UNet3D
from persvid_jax.models import vae as vae_lib
from persvid_jax.models.vae import AutoencoderKL
from persvid_jax.models.video_transformer import KV_CACHE

NETWORKS = ("text_encoder", "image_encoder", "mapper", "extractor", "unet", "sr_unet")
# The frozen VAE: a network of the stack in latent space only (no stage trains it).
VAE = "vae"


def latent_enabled(config) -> bool:
  """Whether ``config`` puts the diffusion in the VAE's latent space."""
  latent = config.get("latent")
  return bool(latent is not None and latent.get("enabled", False))


def network_names(config) -> tuple[str, ...]:
  """The networks a model of ``config`` holds: ``NETWORKS``, plus ``VAE`` in latent space."""
  return NETWORKS + ((VAE,) if latent_enabled(config) else ())


def vae_factor(config) -> int:
  """Pixels per latent along a side: the VAE's ``downsample_factor``, 1 in pixel space."""
  if not latent_enabled(config):
    return 1
  return 2 ** (len(config.vae.block_out_channels) - 1)


def pixel_size(config, *, sr: bool = False) -> tuple[int, int]:
  """``(height, width)`` in pixels of a base (or, ``sr``, SR) frame of ``config``.

  ``config.video`` sizes times the VAE factor (latent space) or as they are.
  """
  v, f = config.video, vae_factor(config)
  scale = v.sr_factor if sr else 1
  return v.height * scale * f, v.width * scale * f


@dataclasses.dataclass(frozen=True)
class ModelStack:
  """The six networks of one config (linen modules: stateless, hashable)."""
  text_encoder: TextEncoder
  image_encoder: ImageEncoder
  mapper: ReferenceMapper
  extractor: DetailExtractor
  unet: UNet3D
  sr_unet: UNet3D
  config: Any = dataclasses.field(compare=False, hash=False, repr=False)
  vae: AutoencoderKL | None = None      # latent space only

  @classmethod
  def from_config(cls, config, *, eos_token_id: int = 1) -> "ModelStack":
    """Builds every network with ``config.dtype`` compute / ``config.param_dtype`` params.

    Raises:
      ValueError: a latent-space config whose video / UNet channels are not the
        VAE's latent channels.
    """
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype,
              attention_impl=config.attention_impl)
    vae = None
    if latent_enabled(config):
      # The VAE's attention head is as wide as its block: no fused kernel.
      vae = AutoencoderKL.from_config(config.vae, dtype=config.dtype,
                                      param_dtype=config.param_dtype)
      _check_latent_channels(config, vae.spec.latent_channels)
    return cls(
        text_encoder=TextEncoder.from_config(config.text, eos_token_id=eos_token_id, **kw),
        image_encoder=ImageEncoder.from_config(config.image, **kw),
        mapper=ReferenceMapper.from_config(config, **kw),
        extractor=DetailExtractor.from_config(config, **kw),
        unet=UNet3D.from_config(config.unet, norm_impl=config.get("norm_impl"), **kw),
        sr_unet=UNet3D.from_config(config.sr_unet, norm_impl=config.get("norm_impl"), **kw),
        config=config, vae=vae)

  @property
  def network_names(self) -> tuple[str, ...]:
    """``network_names(self.config)``: the six, plus ``VAE`` in latent space."""
    return network_names(self.config)

  def example_inputs(self, batch: int = 1) -> dict[str, tuple[tuple, dict]]:
    """Per network, ``(args, kwargs)`` of zeros with the config's shapes.

    Base video ``[B, T, H, W, C]`` at ``config.video``; SR video at
    ``sr_factor`` times the height and width; in latent space, the VAE's
    images ``[B, 2f, 2f, 3]`` (any multiple of ``f`` has the same params).
    """
    c = self.config
    v = c.video
    f32 = jnp.float32
    ids = jnp.zeros((batch, c.text.max_length), jnp.int32)
    img = jnp.zeros((batch, c.image.image_size, c.image.image_size, 3), f32)
    n_patches = (c.image.image_size // c.image.patch_size) ** 2
    feats = ImageFeatures(pooled=jnp.zeros((batch, c.image.width), f32),
                          patch_tokens=jnp.zeros((batch, n_patches, c.image.width), f32))
    ext_img = jnp.zeros((batch, c.extractor.image_size, c.extractor.image_size, 3), f32)
    ext_mask = jnp.zeros(ext_img.shape[:-1] + (1,), f32)
    context = jnp.zeros((batch, c.text.max_length, c.text.width), f32)
    t = jnp.zeros((batch,), jnp.int32)

    def unet_inputs(unet_config, h, w, sr):
      x = jnp.zeros((batch, v.frames, h, w, unet_config.in_channels), f32)
      kwargs = {}
      if unet_config.detail_cross_attention:
        kwargs["detail_tokens"] = jnp.zeros(
            (batch, c.concepts.detail_tokens, unet_config.detail_dim), f32)
      if sr:
        kwargs["cond_video"] = jnp.zeros(x.shape[:-1] + (unet_config.cond_channels,), f32)
        kwargs["noise_level"] = jnp.zeros((batch,), jnp.int32)
      return (x, t, context), kwargs

    sr_h, sr_w = v.height * v.sr_factor, v.width * v.sr_factor
    inputs = {
        "text_encoder": ((ids,), {}),
        "image_encoder": ((img,), {}),
        "mapper": ((feats,), {}),
        "extractor": ((ext_img, ext_mask), {}),
        "unet": unet_inputs(c.unet, v.height, v.width, sr=False),
        "sr_unet": unet_inputs(c.sr_unet, sr_h, sr_w, sr=True),
    }
    if self.vae is not None:
      size = 2 * self.vae.spec.downsample_factor
      inputs[VAE] = ((jnp.zeros((batch, size, size, self.vae.spec.in_channels), f32),), {})
    return inputs

  def init_fn(self, name: str, batch: int = 1):
    """``rng -> variables`` for network ``name`` on its example inputs."""
    module = getattr(self, name)
    args, kwargs = self.example_inputs(batch)[name]
    return lambda rng: module.init(rng, *args, **kwargs)

  def abstract_variables(self, names=None) -> dict[str, Any]:
    """``jax.eval_shape`` of each network's init (boxed ShapeDtypeStructs).

    ``names``: default ``network_names`` (the six, plus the VAE in latent space).
    """
    names = self.network_names if names is None else names
    rng = jax.random.key(0)
    return {name: jax.eval_shape(self.init_fn(name), rng) for name in names}


def init_params(stack: ModelStack, names, rng, batch: int = 1) -> dict:
  """``{network: boxed params}`` for ``names``, each from its own key.

  The key of network ``n`` is ``fold_in(rng, (NETWORKS + (VAE,)).index(n))``,
  so a network's init does not depend on which others are initialised with it
  (training and model loading re-create an untrained network identically).
  """
  out = {}
  for name in names:
    key = jax.random.fold_in(rng, (NETWORKS + (VAE,)).index(name))
    out[name] = stack.init_fn(name, batch)(key)["params"]
  return out


def count_params(variables: Any) -> int:
  """Number of parameters in a (possibly boxed, possibly abstract) variables tree."""
  leaves = jax.tree.leaves(nn.meta.unbox(variables))
  return int(sum(int(np.prod(x.shape)) for x in leaves))


def param_counts(config, names=None) -> dict[str, int]:
  """``{network: parameter count}`` for a config, computed abstractly (default: every network)."""
  stack = ModelStack.from_config(config)
  return {name: count_params(v) for name, v in stack.abstract_variables(names).items()}


def inference_params(params: Any, dtype) -> Any:
  """``params`` as sampling uses them: every leaf but the norms' cast to ``dtype``.

  A network computing in ``dtype`` (bf16) casts its float32 kernels and biases to
  it at every call; a sampler calls the generator 25-50 times per video, and on a
  GPU those casts are one kernel each (hundreds per step). Casting once gives the
  same values, so the outputs are bit for bit those of the float32 params. Norm
  scales and biases (any leaf under a module whose name contains ``norm``) stay
  float32: the norms compute in float32. A float32 ``dtype`` returns ``params``.

  Args:
    params: one network's params (a nested dict of arrays or ShapeDtypeStructs).
    dtype: the network's compute dtype (``config.dtype``), a name or a dtype.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return params

  def cast(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    if any("norm" in n for n in names[:-1]) or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=leaf.sharding)
    return leaf.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


def base_denoise_fn(stack: ModelStack):
  """``(params, x_t, t, context, detail_tokens=None) -> eps`` of the base generator.

  Shared by the training losses and the samplers: one function object per stack, so
  compiled sampling programs (``denoise_fn`` is static there) are reused.
  """
  def denoise(p, x_t, t, context, detail_tokens=None, kv_cache=None):
    return stack.unet.apply(_variables(p, kv_cache), x_t, t, context,
                            detail_tokens=detail_tokens)
  return denoise


def sr_denoise_fn(stack: ModelStack):
  """``(params, x_t, t, context, cond_video, noise_level) -> eps`` of the SR generator."""
  def denoise(p, x_t, t, context, cond_video, noise_level, kv_cache=None):
    return stack.sr_unet.apply(_variables(p, kv_cache), x_t, t, context,
                               cond_video=cond_video, noise_level=noise_level)
  return denoise


def _variables(params: Any, kv_cache: Any) -> dict:
  """The generators' variables: ``params`` and, where given, the cross-attention cache."""
  return {"params": params} if kv_cache is None else {"params": params, KV_CACHE: kv_cache}


def kv_cache_fn(module: nn.Module) -> Callable:
  """``fill(params, x_t, t, context, **kw) -> kv_cache`` for a generator ``module``
  (``stack.unet``: ``base_denoise_fn``'s arguments; ``stack.sr_unet``:
  ``sr_denoise_fn``'s): the text (and detail) keys and values of every
  cross-attention (``video_transformer.KV_CACHE``), computed once per video and
  passed as ``denoise(..., kv_cache=)`` at each of the sampler's steps.

  ``x_t``, ``t`` (and ``cond_video``) only give shapes: zeros will do. Call it
  under ``jax.jit``: the network's output is unused there, so XLA compiles only
  the ``to_k``/``to_v`` projections (eager, the whole network would run once).
  """
  def fill(p, x_t, t, context, **kwargs):
    _, state = module.apply({"params": p}, x_t, t, context, mutable=[KV_CACHE], **kwargs)
    return state.get(KV_CACHE, {})
  return fill


def _check_latent_channels(config, latent_channels: int) -> None:
  """The generators must see (and the base must produce) the VAE's latents."""
  got = {"video.channels": config.video.channels,
         "unet.in_channels": config.unet.in_channels,
         "unet.out_channels": config.unet.out_channels,
         "sr_unet.in_channels": config.sr_unet.in_channels,
         "sr_unet.out_channels": config.sr_unet.out_channels,
         "sr_unet.cond_channels": config.sr_unet.cond_channels}
  wrong = {k: v for k, v in got.items() if v != latent_channels}
  if wrong:
    raise ValueError(f"config.latent.enabled with a VAE of {latent_channels} latent channels, "
                     f"but config {wrong} (use configs/common.py's use_latent_space)")


def encode_latents(stack: ModelStack, vae_params: Any, video: jax.Array,
                   rng: jax.Array | None = None) -> jax.Array:
  """Pixel video ``[B, T, H, W, 3]`` in [-1, 1] -> scaled latents ``[B, T, H/f, W/f, C]``.

  Per frame through the frozen VAE (``stack.vae``), then ``VAESpec.scale_latents``
  (what the generators denoise). ``rng``: a posterior sample (diffusers' training
  recipe); None: the posterior mean. The params pass through ``stop_gradient``:
  no stage trains the VAE, and no backward pass runs through it. Float32.
  """
  mean, logvar = stack.vae.apply({"params": jax.lax.stop_gradient(vae_params)}, video,
                                 method="encode_video")
  z = mean if rng is None else vae_lib.sample_latents(rng, mean, logvar)
  return stack.vae.spec.scale_latents(z)


def decode_latents(stack: ModelStack, vae_params: Any, latents: jax.Array) -> jax.Array:
  """Scaled latents ``[B, T, h, w, C]`` -> pixel video ``[B, T, h*f, w*f, 3]`` in [-1, 1].

  ``VAESpec.unscale_latents``, the VAE's decoder per frame, clipped to [-1, 1]
  (the decoder is unbounded; diffusers' pipelines clamp too). Float32.
  """
  z = stack.vae.spec.unscale_latents(jnp.asarray(latents, jnp.float32))
  video = stack.vae.apply({"params": vae_params}, z, method="decode_video")
  return jnp.clip(video.astype(jnp.float32), -1.0, 1.0)
