"""The whole model stack built from one config: the six networks of the method.

``ModelStack.from_config(config)`` builds the text encoder (first encoder),
image encoder (second encoder), reference mapper, detail extractor, and the
base and SR generators with the config's dtypes. ``example_inputs`` gives
shape-correct dummy inputs for ``init``; ``abstract_variables`` runs
``jax.eval_shape`` over every ``init`` (no memory, no FLOPs), which is what
parameter counts, sharding plans and weight-import validation start from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from persvid_jax.models.extractor import DetailExtractor
from persvid_jax.models.image_encoder import ImageEncoder, ImageFeatures
from persvid_jax.models.mapper import ReferenceMapper
from persvid_jax.models.text_encoder import TextEncoder
from persvid_jax.models.unet3d import UNet3D

NETWORKS = ("text_encoder", "image_encoder", "mapper", "extractor", "unet", "sr_unet")


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

  @classmethod
  def from_config(cls, config, *, eos_token_id: int = 1) -> "ModelStack":
    """Builds every network with ``config.dtype`` compute / ``config.param_dtype`` params."""
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype,
              attention_impl=config.attention_impl)
    return cls(
        text_encoder=TextEncoder.from_config(config.text, eos_token_id=eos_token_id, **kw),
        image_encoder=ImageEncoder.from_config(config.image, **kw),
        mapper=ReferenceMapper.from_config(config, **kw),
        extractor=DetailExtractor.from_config(config, **kw),
        unet=UNet3D.from_config(config.unet, **kw),
        sr_unet=UNet3D.from_config(config.sr_unet, **kw),
        config=config)

  def example_inputs(self, batch: int = 1) -> dict[str, tuple[tuple, dict]]:
    """Per network, ``(args, kwargs)`` of zeros with the config's shapes.

    Base video ``[B, T, H, W, C]`` at ``config.video``; SR video at
    ``sr_factor`` times the height and width.
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
    return {
        "text_encoder": ((ids,), {}),
        "image_encoder": ((img,), {}),
        "mapper": ((feats,), {}),
        "extractor": ((ext_img, ext_mask), {}),
        "unet": unet_inputs(c.unet, v.height, v.width, sr=False),
        "sr_unet": unet_inputs(c.sr_unet, sr_h, sr_w, sr=True),
    }

  def init_fn(self, name: str, batch: int = 1):
    """``rng -> variables`` for network ``name`` on its example inputs."""
    module = getattr(self, name)
    args, kwargs = self.example_inputs(batch)[name]
    return lambda rng: module.init(rng, *args, **kwargs)

  def abstract_variables(self, names=NETWORKS) -> dict[str, Any]:
    """``jax.eval_shape`` of each network's init (boxed ShapeDtypeStructs)."""
    rng = jax.random.key(0)
    return {name: jax.eval_shape(self.init_fn(name), rng) for name in names}


def init_params(stack: ModelStack, names, rng, batch: int = 1) -> dict:
  """``{network: boxed params}`` for ``names``, each from its own key.

  The key of network ``n`` is ``fold_in(rng, NETWORKS.index(n))``, so a
  network's init does not depend on which others are initialised with it
  (training and model loading re-create an untrained network identically).
  """
  out = {}
  for name in names:
    key = jax.random.fold_in(rng, NETWORKS.index(name))
    out[name] = stack.init_fn(name, batch)(key)["params"]
  return out


def count_params(variables: Any) -> int:
  """Number of parameters in a (possibly boxed, possibly abstract) variables tree."""
  leaves = jax.tree.leaves(nn.meta.unbox(variables))
  return int(sum(int(np.prod(x.shape)) for x in leaves))


def param_counts(config, names=NETWORKS) -> dict[str, int]:
  """``{network: parameter count}`` for a config, computed abstractly."""
  stack = ModelStack.from_config(config)
  return {name: count_params(v) for name, v in stack.abstract_variables(names).items()}


def base_denoise_fn(stack: ModelStack):
  """``(params, x_t, t, context, detail_tokens=None) -> eps`` of the base generator.

  Shared by the training losses and the samplers: one function object per stack, so
  compiled sampling programs (``denoise_fn`` is static there) are reused.
  """
  def denoise(p, x_t, t, context, detail_tokens=None):
    return stack.unet.apply({"params": p}, x_t, t, context, detail_tokens=detail_tokens)
  return denoise


def sr_denoise_fn(stack: ModelStack):
  """``(params, x_t, t, context, cond_video, noise_level) -> eps`` of the SR generator."""
  def denoise(p, x_t, t, context, cond_video, noise_level):
    return stack.sr_unet.apply({"params": p}, x_t, t, context, cond_video=cond_video,
                               noise_level=noise_level)
  return denoise
