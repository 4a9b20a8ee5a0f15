"""The latent-space VAE: diffusers' ``AutoencoderKL`` in linen, NHWC.

``encode(images [N, H, W, Cin]) -> (mean, logvar) [N, H/f, W/f, latent]`` and
``decode(latents [N, h, w, latent]) -> images [N, h*f, w*f, Cout]`` with
``f = 2 ** (len(block_out_channels) - 1)`` (8 for Stable Diffusion's VAE).
Images are in [-1, 1]. ``encode_video`` / ``decode_video`` do the same per
frame of ``[B, F, H, W, C]`` (frames folded into the batch: the VAE of
ModelScope / Zeroscope is an image VAE).

Layout, forward order and parameter names follow diffusers (``Encoder`` /
``Decoder`` of ``models/autoencoders/vae.py``, ``DownEncoderBlock2D``,
``UpDecoderBlock2D``, ``UNetMidBlock2D``, ``ResnetBlock2D``), so a checkpoint
imports by a rename table: torch ``a.0.b`` is linen ``a_0/b``, ``weight`` is
``kernel`` (transposed) or ``scale`` (norms). Numerics as diffusers:

* GroupNorm eps 1e-6 everywhere (diffusers hard-codes it in the VAE), in float32;
* ``Downsample2D(padding=0)``: pad one row/column at the bottom/right, then a
  3x3 stride-2 conv without padding; ``Upsample2D``: nearest 2x, then 3x3 conv;
* the mid-block attention is one head as wide as the block (q/k/v with bias),
  GroupNorm before it and a residual around it;
* the posterior's ``logvar`` is clamped to [-30, 20] (``DiagonalGaussianDistribution``).

What diffusion sees is ``(z - shift_factor) * scaling_factor``
(``VAESpec.scale_latents``), and ``decode`` takes unscaled ``z``
(``VAESpec.unscale_latents`` first), as in diffusers' pipelines.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from persvid_jax import sharding as sh
from persvid_jax.models import attention
from persvid_jax.models.attention import conv, group_norm, linear

Dtype = Any
Array = jax.Array

NORM_EPS = 1e-6                       # diffusers' VAE: resnet_eps and the norms' eps
LOGVAR_RANGE = (-30.0, 20.0)          # DiagonalGaussianDistribution's clamp


@dataclasses.dataclass(frozen=True)
class VAESpec:
  """Hashable architecture of an ``AutoencoderKL`` (``config.vae``).

  Field names are diffusers' ``config.json`` keys; ``convert.vae.vae_config``
  builds them from one (and refuses options we do not implement).
  """
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  in_channels: int = 3
  out_channels: int = 3
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  def __post_init__(self):
    if not self.block_out_channels or self.layers_per_block < 1:
      raise ValueError("vae: block_out_channels must be non-empty and layers_per_block >= 1")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"vae: block width {c} must be divisible by norm_num_groups "
                         f"{self.norm_num_groups}")

  @classmethod
  def from_config(cls, vae_config) -> "VAESpec":
    """From a ``ConfigDict`` (or any mapping) with the fields above."""
    d = dict(vae_config.to_dict() if hasattr(vae_config, "to_dict") else vae_config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"vae config has unknown fields {unknown}; known: {sorted(names)}")
    d["block_out_channels"] = tuple(d.get("block_out_channels", cls.block_out_channels))
    return cls(**d)

  @property
  def downsample_factor(self) -> int:
    """Pixels per latent along each side (8 for 4 blocks)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def scale_latents(self, z: Array) -> Array:
    """Posterior latents -> what diffusion sees: ``(z - shift) * scaling``."""
    return (z - (self.shift_factor or 0.0)) * self.scaling_factor

  def unscale_latents(self, z: Array) -> Array:
    """Inverse of ``scale_latents`` (before ``decode``)."""
    return z / self.scaling_factor + (self.shift_factor or 0.0)


def _norm(num_groups: int, name: str, param_dtype: Dtype) -> nn.GroupNorm:
  return group_norm(num_groups, name=name, epsilon=NORM_EPS, param_dtype=param_dtype)


class ResnetBlock2D(nn.Module):
  """``[N, H, W, Cin] -> [N, H, W, features]``: norm1-SiLU-conv1-norm2-SiLU-conv2 + skip.

  diffusers ``ResnetBlock2D`` without a time embedding (``temb_channels=None``);
  a 1x1 ``conv_shortcut`` when the width changes.
  """
  features: int
  norm_num_groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(_norm(self.norm_num_groups, "norm1", self.param_dtype)(x)).astype(self.dtype)
    h = conv(self.features, (3, 3), name="conv1", padding=((1, 1), (1, 1)), **kw)(h)
    h = nn.silu(_norm(self.norm_num_groups, "norm2", self.param_dtype)(h)).astype(self.dtype)
    h = conv(self.features, (3, 3), name="conv2", padding=((1, 1), (1, 1)), **kw)(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), name="conv_shortcut", **kw)(x)
    return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the ``H*W`` pixels, ``[N, H, W, C] -> same``.

  diffusers ``Attention(..., _from_deprecated_attn_block=True)`` of the VAE's
  mid block: GroupNorm, ``to_q/to_k/to_v`` (with bias) of width C, softmax in
  float32, ``to_out_0``, residual.
  """
  norm_num_groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n, hgt, wid, c = x.shape
    h = _norm(self.norm_num_groups, "group_norm", self.param_dtype)(x).astype(self.dtype)
    h = h.reshape(n, hgt * wid, c)
    q = linear(c, (sh.EMBED, sh.HEADS), name="to_q", **kw)(h)
    k = linear(c, (sh.EMBED, sh.HEADS), name="to_k", **kw)(h)
    v = linear(c, (sh.EMBED, sh.HEADS), name="to_v", **kw)(h)
    h = attention.dot_product_attention(q, k, v, num_heads=1,
                                        implementation=self.attention_impl)
    h = linear(c, (sh.HEADS, sh.EMBED), name="to_out_0", **kw)(h)
    return x.astype(self.dtype) + h.reshape(n, hgt, wid, c)


class MidBlock(nn.Module):
  """``UNetMidBlock2D``: resnet, (attention), resnet at the narrowest resolution."""
  norm_num_groups: int
  add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.norm_num_groups, name="resnets_0", **kw)(x)
    if self.add_attention:
      x = AttentionBlock(self.norm_num_groups, attention_impl=self.attention_impl,
                         name="attentions_0", **kw)(x)
    return ResnetBlock2D(c, self.norm_num_groups, name="resnets_1", **kw)(x)


class Downsample(nn.Module):
  """``Downsample2D(padding=0)``: pad bottom/right by one, 3x3 conv stride 2 (name ``conv``)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return conv(self.features, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), name="conv",
                dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
  """``Upsample2D``: nearest 2x, then 3x3 conv (name ``conv``)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv",
                dtype=self.dtype, param_dtype=self.param_dtype)(x)


class DownEncoderBlock(nn.Module):
  """``DownEncoderBlock2D``: ``num_layers`` resnets, then ``downsamplers_0`` unless last."""
  features: int
  num_layers: int
  norm_num_groups: int
  add_downsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.features, self.norm_num_groups, name=f"resnets_{j}", **kw)(x)
    if self.add_downsample:
      x = Downsample(self.features, name="downsamplers_0", **kw)(x)
    return x


class UpDecoderBlock(nn.Module):
  """``UpDecoderBlock2D``: ``num_layers`` resnets, then ``upsamplers_0`` unless last."""
  features: int
  num_layers: int
  norm_num_groups: int
  add_upsample: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.features, self.norm_num_groups, name=f"resnets_{j}", **kw)(x)
    if self.add_upsample:
      x = Upsample(self.features, name="upsamplers_0", **kw)(x)
    return x


class Encoder(nn.Module):
  """Images ``[N, H, W, in_channels]`` -> moments ``[N, H/f, W/f, 2 * latent]`` (dtype)."""
  spec: VAESpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = self.spec
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pad = ((1, 1), (1, 1))
    h = conv(s.block_out_channels[0], (3, 3), name="conv_in", padding=pad, **kw)(
        x.astype(self.dtype))
    last = len(s.block_out_channels) - 1
    for i, c in enumerate(s.block_out_channels):
      h = DownEncoderBlock(c, s.layers_per_block, s.norm_num_groups, add_downsample=i < last,
                           name=f"down_blocks_{i}", **kw)(h)
    h = MidBlock(s.norm_num_groups, s.mid_block_add_attention,
                 attention_impl=self.attention_impl, name="mid_block", **kw)(h)
    h = nn.silu(_norm(s.norm_num_groups, "conv_norm_out", self.param_dtype)(h))
    return conv(2 * s.latent_channels, (3, 3), name="conv_out", padding=pad, **kw)(
        h.astype(self.dtype))


class Decoder(nn.Module):
  """Latents ``[N, h, w, latent]`` -> images ``[N, h*f, w*f, out_channels]`` (dtype)."""
  spec: VAESpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, z: Array) -> Array:
    s = self.spec
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pad = ((1, 1), (1, 1))
    h = conv(s.block_out_channels[-1], (3, 3), name="conv_in", padding=pad, **kw)(
        z.astype(self.dtype))
    h = MidBlock(s.norm_num_groups, s.mid_block_add_attention,
                 attention_impl=self.attention_impl, name="mid_block", **kw)(h)
    widths = tuple(reversed(s.block_out_channels))
    for i, c in enumerate(widths):
      h = UpDecoderBlock(c, s.layers_per_block + 1, s.norm_num_groups,
                         add_upsample=i < len(widths) - 1, name=f"up_blocks_{i}", **kw)(h)
    h = nn.silu(_norm(s.norm_num_groups, "conv_norm_out", self.param_dtype)(h))
    return conv(s.out_channels, (3, 3), name="conv_out", padding=pad, **kw)(
        h.astype(self.dtype))


class AutoencoderKL(nn.Module):
  """diffusers ``AutoencoderKL`` (see the module docstring).

  Attributes:
    spec: the architecture (``VAESpec.from_config(config.vae)``).
    dtype: compute dtype; norms and softmax stay float32, the posterior is float32.
    param_dtype: parameter dtype (float32).
    attention_impl: ``jax.nn.dot_product_attention`` implementation (leave None:
      the mid-block head is as wide as the block, 512 for SD, more than cuDNN's
      fused kernel takes).

  Methods (call through ``apply(..., method=...)``): ``encode``, ``decode``,
  ``encode_video``, ``decode_video``; ``__call__`` (used by ``init``) is
  ``decode(mean)`` of ``encode``, diffusers' ``forward(sample_posterior=False)``.
  """
  spec: VAESpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @classmethod
  def from_config(cls, vae_config, *, dtype="float32", param_dtype="float32",
                  attention_impl=None) -> "AutoencoderKL":
    """From ``config.vae``; dtypes may be strings."""
    return cls(spec=VAESpec.from_config(vae_config), dtype=attention.dtype_of(dtype),
               param_dtype=attention.dtype_of(param_dtype), attention_impl=attention_impl)

  def setup(self):
    s = self.spec
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              attention_impl=self.attention_impl)
    self.encoder = Encoder(s, **kw)
    self.decoder = Decoder(s, **kw)
    kw.pop("attention_impl")
    if s.use_quant_conv:
      self.quant_conv = conv(2 * s.latent_channels, (1, 1), name="quant_conv", **kw)
    if s.use_post_quant_conv:
      self.post_quant_conv = conv(s.latent_channels, (1, 1), name="post_quant_conv", **kw)

  def _check(self, x: Array, channels: int, ndim: int, what: str):
    if x.ndim != ndim or x.shape[-1] != channels:
      dims = "N, H, W" if ndim == 4 else "B, F, H, W"
      raise ValueError(f"vae: {what} must be [{dims}, {channels}], got {x.shape}")

  def encode(self, images: Array) -> tuple[Array, Array]:
    """Posterior of ``images [N, H, W, in_channels]`` in [-1, 1].

    H and W must be multiples of ``spec.downsample_factor`` for the shapes below.

    Returns:
      ``(mean, logvar)``, each ``[N, H/f, W/f, latent_channels]`` float32 (unscaled
      latents; ``logvar`` clamped to [-30, 20]).
    """
    self._check(images, self.spec.in_channels, 4, "images")
    moments = self.encoder(images)
    if self.spec.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents: Array) -> Array:
    """Images ``[N, h*f, w*f, out_channels]`` (``dtype``) of unscaled latents ``[N, h, w, C]``."""
    self._check(latents, self.spec.latent_channels, 4, "latents")
    z = latents.astype(self.dtype)
    if self.spec.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def encode_video(self, video: Array) -> tuple[Array, Array]:
    """``encode`` per frame: ``[B, F, H, W, C] -> (mean, logvar) [B, F, H/f, W/f, latent]``."""
    self._check(video, self.spec.in_channels, 5, "video")
    b, f = video.shape[:2]
    mean, logvar = self.encode(video.reshape((b * f,) + video.shape[2:]))
    return (mean.reshape((b, f) + mean.shape[1:]), logvar.reshape((b, f) + logvar.shape[1:]))

  def decode_video(self, latents: Array) -> Array:
    """``decode`` per frame: ``[B, F, h, w, latent] -> [B, F, h*f, w*f, out_channels]``."""
    self._check(latents, self.spec.latent_channels, 5, "latents")
    b, f = latents.shape[:2]
    out = self.decode(latents.reshape((b * f,) + latents.shape[2:]))
    return out.reshape((b, f) + out.shape[1:])

  def __call__(self, images: Array) -> Array:
    """Reconstruction ``decode(mean)`` of ``images [N, H, W, in_channels]``."""
    mean, _ = self.encode(images)
    return self.decode(mean)


def sample_latents(rng: Array, mean: Array, logvar: Array) -> Array:
  """A posterior sample ``mean + exp(logvar / 2) * eps`` (same shape as ``mean``)."""
  eps = jax.random.normal(rng, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * eps


@functools.lru_cache(maxsize=8)
def abstract_params(model: AutoencoderKL) -> Any:
  """Unboxed ``jax.eval_shape`` of the params of ``model`` (no memory, no FLOPs).

  Cached per module (tracing a full-size init takes seconds); the result is a
  tree of ``ShapeDtypeStruct``, not to be mutated.
  """
  size = 2 * model.spec.downsample_factor
  images = jax.ShapeDtypeStruct((1, size, size, model.spec.in_channels), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return nn.meta.unbox(variables)["params"]
