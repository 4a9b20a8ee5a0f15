"""The generator: a factorised space-time 3D UNet (base and SR networks).

``x [B, T, H, W, Cin], t [B], context [B, L, Dtxt] -> [B, T, H, W, Cout]``
(channels-last video; the output is in the compute dtype).

The layout, the forward order and the parameter names follow diffusers'
``UNet3DConditionModel`` (ModelScope text-to-video / Zeroscope), so that those
weights can be imported by a table of renames: torch ``a.0.b`` is linen
``a_0/b``; ``weight`` is ``kernel`` (transposed: dense ``[in, out]``, conv
``[*taps, in, out]``) or ``scale`` (norms). Temporal convs are the one place
where torch uses ``nn.Sequential`` indices::

    temp_convs.{j}.conv{i}.0        -> temp_convs_{j}/conv{i}/norm   (GroupNorm)
    temp_convs.{j}.conv1.2          -> temp_convs_{j}/conv1/conv     (Conv3d 3x1x1)
    temp_convs.{j}.conv{2,3,4}.3    -> temp_convs_{j}/conv{i}/conv   (after Dropout)
    ...ff.net.0.proj / ff.net.2     -> ff/net_0/proj / ff/net_2
    ...attn{1,2}.to_out.0           -> attn{1,2}/to_out_0

Differences from diffusers, all deliberate:
  * Frames are never folded into the batch for cross-attention: the queries of
    all frames of a video attend to that video's text at once (``[B, T*H*W]``
    queries against ``[B, L]`` keys). That is exactly diffusers'
    ``repeat_interleave`` of the text over frames, without the copies.
  * Optional ``context_mask`` (diffusers accepts ``attention_mask`` but its 3D
    blocks ignore it); ``None`` is diffusers' behaviour.
  * Decoupled detail cross-attention (IP-Adapter style, ``to_k_detail`` /
    ``to_v_detail`` in each spatial ``attn2``) when ``detail_cross_attention``.
  * The spatial convs of the resnets (``conv1``/``conv2``) take the config's
    kernel size and dilation (the cascade's kernel change: the SR network uses another one).
  * SR variant: the upsampled low-res video is concatenated on channels before
    ``conv_in`` and a noise-augmentation level is embedded like a timestep
    (``noise_level_embedding``) and added to the time embedding.
  * Init only: the temporal transformers' ``proj_out`` is zero-initialised (as
    the temporal convs' ``conv4`` already is in diffusers), so every temporal
    layer is the identity at init and a fresh network acts frame by frame,
    like the image model ModelScope starts from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from persvid_jax import sharding as sh
from persvid_jax.models import attention
from persvid_jax.models.attention import GroupNorm, conv, linear
from persvid_jax.models.video_conv import Downsample, ResnetBlock, TemporalConvLayer, Upsample
from persvid_jax.models.video_transformer import SpatialTransformer, TemporalTransformer

Dtype = Any
Array = jax.Array

# Activation layout of the video at block boundaries.
VIDEO_AXES = (sh.BATCH, sh.FRAMES, sh.HEIGHT, sh.WIDTH, sh.CHANNELS)


@dataclasses.dataclass(frozen=True)
class UNet3DSpec:
  """Hashable copy of a ``config.unet`` / ``config.sr_unet`` ConfigDict.

  Linen module attributes must be hashable, which ``ConfigDict`` is not. The
  fields are the ``unet_config`` schema of ``configs/common.py``.
  """
  in_channels: int
  out_channels: int
  block_out_channels: tuple[int, ...]
  down_block_types: tuple[str, ...]
  up_block_types: tuple[str, ...]
  layers_per_block: int
  head_dim: int
  transformer_in_heads: int
  norm_num_groups: int
  norm_eps: float
  cross_attention_dim: int
  spatial_kernel_size: int = 3
  spatial_dilation: int = 1
  detail_cross_attention: bool = False
  detail_dim: int = 0
  detail_scale: float = 1.0
  sr: bool = False
  cond_channels: int = 0
  remat: bool = False
  # diffusers' TemporalConvLayer dropout (only active with deterministic=False).
  temporal_dropout: float = 0.1

  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError("unet: block_out_channels, down_block_types and up_block_types "
                       f"must have the same length, got {n}, {len(self.down_block_types)}, "
                       f"{len(self.up_block_types)}")
    for c in self.block_out_channels:
      if c % self.head_dim or c % self.norm_num_groups:
        raise ValueError(f"unet: block width {c} must be divisible by head_dim "
                         f"{self.head_dim} and norm_num_groups {self.norm_num_groups}")
    for kind in self.down_block_types:
      if kind not in ("CrossAttnDownBlock3D", "DownBlock3D"):
        raise ValueError(f"unet: unknown down block type {kind!r}")
    for kind in self.up_block_types:
      if kind not in ("CrossAttnUpBlock3D", "UpBlock3D"):
        raise ValueError(f"unet: unknown up block type {kind!r}")
    if self.sr and self.cond_channels <= 0:
      raise ValueError("unet: an SR network (sr=True) needs cond_channels > 0")
    if self.detail_cross_attention and self.detail_dim <= 0:
      raise ValueError("unet: detail_cross_attention needs detail_dim > 0")
    if self.spatial_kernel_size < 1 or self.spatial_dilation < 1:
      raise ValueError("unet: spatial_kernel_size and spatial_dilation must be >= 1")

  @classmethod
  def from_config(cls, unet_config) -> "UNet3DSpec":
    """From a ``ConfigDict`` (or any mapping) with the ``unet_config`` fields."""
    d = dict(unet_config.to_dict() if hasattr(unet_config, "to_dict") else unet_config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unet config has unknown fields {unknown}; known: {sorted(names)}")
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
      d[key] = tuple(d[key])
    return cls(**d)


# ----------------------------------------------------------------------------
# Pure helpers.
# ----------------------------------------------------------------------------

def spatial_receptive_field(kernel_size: int, dilation: int, num_convs: int) -> int:
  """Width (in pixels) of the receptive field of ``num_convs`` stacked k x k convs.

  Each stride-1 conv of kernel ``k`` and dilation ``d`` widens the field by
  ``(k - 1) * d``; e.g. two 3x3 convs with dilation 2 see 9 pixels, as many
  as two 5x5 convs, with the parameters of 3x3 ones.
  """
  return num_convs * (kernel_size - 1) * dilation + 1


def timestep_embedding(t: Array, dim: int, *, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding ``[B] -> [B, dim]`` in float32 (diffusers ``Timesteps``).

  ``UNet3DConditionModel`` uses ``flip_sin_to_cos=True`` (cos first) and no
  frequency shift. Works for integer and fractional timesteps.
  """
  half = dim // 2
  exponent = -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - downscale_freq_shift))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _constrain(x: Array) -> Array:
  """Pins a video activation's batch axis to the mesh (no-op without a mesh)."""
  return nn.with_logical_constraint(x, VIDEO_AXES)


# ----------------------------------------------------------------------------
# Embeddings.
# ----------------------------------------------------------------------------

class TimestepEmbedding(nn.Module):
  """``[B, Din] -> [B, features]``: linear_1 -> SiLU -> linear_2 (diffusers names)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = linear(self.features, (sh.EMBED, sh.MLP), name="linear_1", **kw)(x.astype(self.dtype))
    h = nn.silu(h)
    return linear(self.features, (sh.MLP, sh.EMBED), name="linear_2", **kw)(h)


# ----------------------------------------------------------------------------
# UNet blocks.
# ----------------------------------------------------------------------------

@dataclasses.dataclass
class _Conditioning:
  """Per-call inputs every block needs, bundled to keep block signatures short.

  A plain Python object handed to non-transformed block calls only; the
  remat-wrapped layers receive its arrays as separate arguments.
  """
  temb: Array                       # [B, E]
  context: Array                    # [B, L, Dtxt]
  context_mask: Array | None        # [B, L] bool
  detail_tokens: Array | None       # [B, N, Dd]
  detail_scale: Array               # [] or [B]
  deterministic: bool


class _BlockBase(nn.Module):
  """Fields shared by the down, mid and up blocks (``features`` = block width)."""
  spec: UNet3DSpec
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  norm_impl: str = "auto"


# The two layer groups every block repeats. Free functions, not methods: linen
# only lets a module create submodules inside its (single) compact method, and
# a function called from there creates them in that module's scope.

def _resnet_layer(block: _BlockBase, j: int, x: Array, cond: _Conditioning) -> Array:
  """``resnets_{j}`` (spatial) then ``temp_convs_{j}`` (temporal)."""
  s = block.spec
  kw = dict(dtype=block.dtype, param_dtype=block.param_dtype, norm_impl=block.norm_impl)
  cls = nn.remat(ResnetBlock) if s.remat else ResnetBlock
  x = cls(block.features, s.norm_num_groups, s.norm_eps, kernel_size=s.spatial_kernel_size,
          dilation=s.spatial_dilation, name=f"resnets_{j}", **kw)(x, cond.temb)
  x = TemporalConvLayer(s.norm_num_groups, dropout=s.temporal_dropout,
                        name=f"temp_convs_{j}", **kw)(x, cond.deterministic)
  return _constrain(x)


def _attention_layer(block: _BlockBase, j: int, x: Array, cond: _Conditioning) -> Array:
  """``attentions_{j}`` (spatial + text/detail) then ``temp_attentions_{j}``."""
  s = block.spec
  kw = dict(dtype=block.dtype, param_dtype=block.param_dtype,
            attention_impl=block.attention_impl, norm_impl=block.norm_impl)
  heads = block.features // s.head_dim
  spatial = nn.remat(SpatialTransformer) if s.remat else SpatialTransformer
  temporal = nn.remat(TemporalTransformer) if s.remat else TemporalTransformer
  x = spatial(heads, s.head_dim, s.norm_num_groups,
              detail_dim=s.detail_dim if s.detail_cross_attention else 0,
              name=f"attentions_{j}", **kw)(
      x, cond.context, cond.context_mask, cond.detail_tokens, cond.detail_scale)
  x = temporal(heads, s.head_dim, s.norm_num_groups, name=f"temp_attentions_{j}", **kw)(x)
  return _constrain(x)


class DownBlock3D(_BlockBase):
  """Encoder stage ``[B, T, H, W, Cin] -> [B, T, H/2, W/2, C]`` and its skip tensors.

  ``layers_per_block`` x (resnet, temporal conv[, spatial + temporal
  attention]), then a stride-2 downsampler unless it is the last stage.

  ``CrossAttnDownBlock3D`` when ``cross_attention`` else ``DownBlock3D``.
  """
  cross_attention: bool = True
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x: Array, cond: _Conditioning) -> tuple[Array, list[Array]]:
    skips = []
    for j in range(self.spec.layers_per_block):
      x = _resnet_layer(self, j, x, cond)
      if self.cross_attention:
        x = _attention_layer(self, j, x, cond)
      skips.append(x)
    if self.add_downsample:
      down = Downsample(self.features, name="downsamplers_0", dtype=self.dtype,
                        param_dtype=self.param_dtype)
      x = _constrain(down(x))
      skips.append(x)
    return x, skips


class MidBlock3D(_BlockBase):
  """Bottleneck ``[B, T, h, w, C] -> same``: resnet + temporal conv, spatial +
  temporal attention, resnet + temporal conv (diffusers ``UNetMidBlock3DCrossAttn``)."""

  @nn.compact
  def __call__(self, x: Array, cond: _Conditioning) -> Array:
    x = _resnet_layer(self, 0, x, cond)
    x = _attention_layer(self, 0, x, cond)
    return _resnet_layer(self, 1, x, cond)


class UpBlock3D(_BlockBase):
  """Decoder stage ``[B, T, H, W, Cin] + skips -> [B, T, 2H, 2W, C]``.

  ``layers_per_block + 1`` x (concat a skip, resnet, temporal conv[, spatial +
  temporal attention]), then nearest upsampling + conv unless it is the last.

  ``CrossAttnUpBlock3D`` when ``cross_attention`` else ``UpBlock3D``.
  """
  cross_attention: bool = True
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x: Array, skips: Sequence[Array], cond: _Conditioning,
               upsample_size: tuple[int, int] | None = None) -> Array:
    skips = list(skips)
    for j in range(self.spec.layers_per_block + 1):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = _resnet_layer(self, j, x, cond)
      if self.cross_attention:
        x = _attention_layer(self, j, x, cond)
    if self.add_upsample:
      up = Upsample(self.features, name="upsamplers_0", dtype=self.dtype,
                    param_dtype=self.param_dtype)
      x = _constrain(up(x, upsample_size))
    return x


# ----------------------------------------------------------------------------
# The generator.
# ----------------------------------------------------------------------------

class UNet3D(nn.Module):
  """The base (``sr=False``) or SR (``sr=True``) video generator; see module docstring.

  Attributes:
    spec: the architecture (``UNet3DSpec.from_config(config.unet)``).
    dtype: compute dtype (e.g. bfloat16); norms and softmax stay float32.
    param_dtype: parameter dtype (float32).
    attention_impl: ``jax.nn.dot_product_attention`` implementation.
    norm_impl: the GroupNorms' kernels (``attention.GroupNorm.implementation``:
      'auto', 'xla' or 'pallas').

  Under a mesh with ``nn.logical_axis_rules`` the video activations are
  constrained at block boundaries to ``sharding.BATCH`` on their leading axis
  (data x fsdp), so the batch must divide the mesh; elsewhere a no-op.
  """
  spec: UNet3DSpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  norm_impl: str = "auto"

  @classmethod
  def from_config(cls, unet_config, *, dtype="float32", param_dtype="float32",
                  attention_impl=None, norm_impl=None, **kwargs) -> "UNet3D":
    """From ``config.unet`` / ``config.sr_unet``; dtypes may be strings."""
    return cls(spec=UNet3DSpec.from_config(unet_config), dtype=attention.dtype_of(dtype),
               param_dtype=attention.dtype_of(param_dtype), attention_impl=attention_impl,
               norm_impl=norm_impl or "auto", **kwargs)

  def _check_inputs(self, x, context, context_mask, detail_tokens, cond_video, noise_level):
    """Shape errors at the boundary, naming the expected shape (trace time, free)."""
    s = self.spec
    if x.ndim != 5 or x.shape[-1] != s.in_channels:
      raise ValueError(f"unet: x must be [B, T, H, W, {s.in_channels}], got {x.shape}")
    b = x.shape[0]
    if context.ndim != 3 or context.shape[0] != b or context.shape[-1] != s.cross_attention_dim:
      raise ValueError(f"unet: context must be [{b}, L, {s.cross_attention_dim}], "
                       f"got {context.shape}")
    if context_mask is not None and context_mask.shape != context.shape[:2]:
      raise ValueError(f"unet: context_mask must be {context.shape[:2]} (True = attend), "
                       f"got {context_mask.shape}")
    if detail_tokens is not None:
      if not s.detail_cross_attention:
        raise ValueError("unet: detail_tokens given but this network was built without "
                         "detail_cross_attention")
      if (detail_tokens.ndim != 3 or detail_tokens.shape[0] != b
          or detail_tokens.shape[-1] != s.detail_dim):
        raise ValueError(f"unet: detail_tokens must be [{b}, N, {s.detail_dim}], "
                         f"got {detail_tokens.shape}")
    if s.sr:
      want = x.shape[:-1] + (s.cond_channels,)
      if cond_video is None or cond_video.shape != want:
        raise ValueError(f"unet: the SR network needs cond_video {want} (the upsampled "
                         f"low-res video), got {None if cond_video is None else cond_video.shape}")
      if noise_level is None:
        raise ValueError("unet: the SR network needs noise_level [B]")
    elif cond_video is not None or noise_level is not None:
      raise ValueError("unet: cond_video/noise_level are inputs of the SR network only (sr=True)")

  @nn.compact
  def __call__(self, x: Array, t: Array, context: Array, *,
               context_mask: Array | None = None,
               detail_tokens: Array | None = None,
               detail_scale: Array | float | None = None,
               cond_video: Array | None = None,
               noise_level: Array | None = None,
               deterministic: bool = True) -> Array:
    """Predicts the denoiser output for a noisy video.

    Args:
      x: ``[B, T, H, W, in_channels]`` noisy video (or latents).
      t: ``[B]`` or scalar diffusion timesteps (int or float).
      context: ``[B, L, cross_attention_dim]`` text states.
      context_mask: optional ``[B, L]`` bool (True = attend).
      detail_tokens: optional ``[B, N, detail_dim]``; None skips the detail
        branch (the same as scale 0).
      detail_scale: scalar or ``[B]`` weight of the detail branch; None takes
        the config's ``detail_scale``.
      cond_video: SR only, ``[B, T, H, W, cond_channels]`` upsampled low-res video.
      noise_level: SR only, ``[B]`` or scalar noise-augmentation level of ``cond_video``.
      deterministic: False enables the temporal convs' dropout ('dropout' rng).

    Returns:
      ``[B, T, H, W, out_channels]`` in ``dtype``.
    """
    s = self.spec
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self._check_inputs(x, context, context_mask, detail_tokens, cond_video, noise_level)
    b = x.shape[0]
    c0 = s.block_out_channels[0]
    n_blocks = len(s.block_out_channels)

    # 1. Time (+ noise-augmentation level) embedding, [B, 4 * c0].
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    temb = TimestepEmbedding(4 * c0, name="time_embedding", **kw)(timestep_embedding(t, c0))
    if s.sr:
      level = jnp.broadcast_to(jnp.asarray(noise_level), (b,))
      temb = temb + TimestepEmbedding(4 * c0, name="noise_level_embedding", **kw)(
          timestep_embedding(level, c0))
    scale = s.detail_scale if detail_scale is None else detail_scale
    cond = _Conditioning(temb=temb, context=context.astype(self.dtype),
                         context_mask=context_mask, detail_tokens=detail_tokens,
                         detail_scale=jnp.asarray(scale, jnp.float32),
                         deterministic=deterministic)

    # 2. Input conv (+ SR conditioning video) and the first temporal transformer.
    h = x.astype(self.dtype)
    if s.sr:
      h = jnp.concatenate([h, cond_video.astype(self.dtype)], axis=-1)
    h = _constrain(conv(c0, (3, 3), name="conv_in", **kw)(h))
    h = TemporalTransformer(s.transformer_in_heads, s.head_dim, s.norm_num_groups,
                            attention_impl=self.attention_impl, norm_impl=self.norm_impl,
                            name="transformer_in", **kw)(h)
    h = _constrain(h)

    block_kw = dict(spec=s, attention_impl=self.attention_impl, norm_impl=self.norm_impl,
                    **kw)
    # 3. Down.
    skips = [h]
    for i, kind in enumerate(s.down_block_types):
      h, res = DownBlock3D(features=s.block_out_channels[i],
                           cross_attention=kind == "CrossAttnDownBlock3D",
                           add_downsample=i < n_blocks - 1, name=f"down_blocks_{i}",
                           **block_kw)(h, cond)
      skips += res

    # 4. Mid.
    h = MidBlock3D(features=s.block_out_channels[-1], name="mid_block", **block_kw)(h, cond)

    # 5. Up: each block eats layers_per_block + 1 skips and upsamples to the
    # size of the next skip (2x, or the odd size a stride-2 conv rounded up).
    reversed_channels = tuple(reversed(s.block_out_channels))
    n_skips = s.layers_per_block + 1
    for i, kind in enumerate(s.up_block_types):
      res, skips = skips[-n_skips:], skips[:-n_skips]
      last = i == n_blocks - 1
      h = UpBlock3D(features=reversed_channels[i], cross_attention=kind == "CrossAttnUpBlock3D",
                    add_upsample=not last, name=f"up_blocks_{i}", **block_kw)(
          h, res, cond, upsample_size=None if last else tuple(skips[-1].shape[2:4]))

    # 6. Output.
    h = GroupNorm(s.norm_num_groups, epsilon=s.norm_eps, batch_dims=2, activation="silu",
                  implementation=self.norm_impl, name="conv_norm_out", **kw)(h)
    return conv(s.out_channels, (3, 3), name="conv_out", **kw)(h)
