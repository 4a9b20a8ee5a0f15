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
    kernel size and dilation (claim 7: the SR network uses another one).
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
from persvid_jax.models.attention import GroupNorm, conv, layer_norm, linear

Dtype = Any
Array = jax.Array

# Activation layout of the video at block boundaries.
VIDEO_AXES = (sh.BATCH, sh.FRAMES, sh.HEIGHT, sh.WIDTH, sh.CHANNELS)

# diffusers' hard-coded epsilons (not the config's norm_eps).
TRANSFORMER_GROUP_NORM_EPS = 1e-6   # Transformer2DModel / TransformerTemporalModel .norm
TEMPORAL_CONV_GROUP_NORM_EPS = 1e-5  # TemporalConvLayer: torch nn.GroupNorm default
LAYER_NORM_EPS = 1e-5               # BasicTransformerBlock norm1..3


@dataclasses.dataclass(frozen=True)
class UNet3DSpec:
  """Hashable copy of a ``config.unet`` / ``config.sr_unet`` ConfigDict.

  Linen module attributes must be hashable, which ``ConfigDict`` is not. The
  fields are the ``unet_config`` schema of ``configs/tiny.py``.
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


def spatial_conv(features: int, kernel_size: int, dilation: int, *, name: str,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 kernel_init=nn.initializers.lecun_normal()) -> nn.Conv:
  """The k x k (dilated) spatial conv of the factorised space-time block.

  Stride 1, ``SAME`` padding: ``(k - 1) * d`` pixels split over both sides
  (symmetric for odd ``k``), so the frame size is kept whatever the kernel.
  Applied per frame (flax flattens the leading ``[B, T]`` batch dims).
  """
  return conv(features, (kernel_size, kernel_size), name=name, padding="SAME",
              dilation=(dilation, dilation), dtype=dtype, param_dtype=param_dtype,
              kernel_init=kernel_init)


def _constrain(x: Array) -> Array:
  """Pins a video activation's batch axis to the mesh (no-op without a mesh)."""
  return nn.with_logical_constraint(x, VIDEO_AXES)


def _nearest_resize_hw(x: Array, size: tuple[int, int]) -> Array:
  """Nearest upsampling of ``[B, T, H, W, C]`` to ``size`` (torch's index rule).

  ``src = floor(dst * in / out)``, i.e. torch ``F.interpolate(mode='nearest')``:
  a plain 2x repeat when ``out == 2 * in``, and the same pixels as diffusers
  when an odd-sized skip forces another size.
  """
  (h, w), (oh, ow) = x.shape[2:4], size
  rows = (jnp.arange(oh) * h) // oh
  cols = (jnp.arange(ow) * w) // ow
  return jnp.take(jnp.take(x, rows, axis=2), cols, axis=3)


# ----------------------------------------------------------------------------
# Embeddings, attention, transformers.
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


class Attention(nn.Module):
  """Multi-head attention ``[N, Lq, D] -> [N, Lq, D]`` (diffusers ``Attention``).

  ``to_q/to_k/to_v`` without bias, ``to_out_0`` with bias. Self-attention when
  ``context`` is None. With ``detail_dim > 0`` (spatial ``attn2`` only) the
  decoupled detail branch of IP-Adapter: own ``to_k_detail``/``to_v_detail``
  on the detail tokens, the same queries, and
  ``out = attn(q, K_text, V_text) + scale * attn(q, K_detail, V_detail)``
  before the shared ``to_out_0``.
  """
  heads: int
  head_dim: int
  detail_dim: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None,
               context_mask: Array | None = None,
               detail_tokens: Array | None = None,
               detail_scale: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.head_dim
    width = x.shape[-1]
    ctx = x if context is None else context.astype(self.dtype)
    q = linear(inner, (sh.EMBED, sh.HEADS), name="to_q", use_bias=False, **kw)(x)
    k = linear(inner, (sh.KV, sh.HEADS), name="to_k", use_bias=False, **kw)(ctx)
    v = linear(inner, (sh.KV, sh.HEADS), name="to_v", use_bias=False, **kw)(ctx)
    out = attention.dot_product_attention(q, k, v, num_heads=self.heads, mask=context_mask,
                                          implementation=self.attention_impl)
    if self.detail_dim:
      to_k_detail = linear(inner, (sh.KV, sh.HEADS), name="to_k_detail", use_bias=False, **kw)
      to_v_detail = linear(inner, (sh.KV, sh.HEADS), name="to_v_detail", use_bias=False, **kw)
      if detail_tokens is None:
        if self.is_initializing():
          # Create the branch's params even when init sees no detail tokens, so
          # the params tree never depends on the example inputs.
          dummy = jnp.zeros((1, 1, self.detail_dim), self.dtype)
          to_k_detail(dummy)
          to_v_detail(dummy)
      else:
        tokens = detail_tokens.astype(self.dtype)
        dk, dv = to_k_detail(tokens), to_v_detail(tokens)
        detail_out = attention.dot_product_attention(
            q, dk, dv, num_heads=self.heads, implementation=self.attention_impl)
        scale = jnp.asarray(1.0 if detail_scale is None else detail_scale, jnp.float32)
        scale = scale.reshape(scale.shape + (1,) * (3 - scale.ndim))   # [] or [N] -> bcast
        out = out + (scale * detail_out).astype(self.dtype)
    return linear(width, (sh.HEADS, sh.EMBED), name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
  """``proj`` to ``2 * features`` then ``hidden * gelu(gate)`` (diffusers ``GEGLU``)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = linear(2 * self.features, (sh.EMBED, sh.MLP), name="proj",
               dtype=self.dtype, param_dtype=self.param_dtype)(x)
    hidden, gate = jnp.split(h, 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU MLP ``[..., D] -> [..., 4D] -> [..., D]`` (names ``net_0/proj``, ``net_2``)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    h = GEGLU(self.mult * width, name="net_0", **kw)(x)
    return linear(width, (sh.MLP, sh.EMBED), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LN block ``[N, L, D] -> [N, L, D]``: self-attn, attn2, GEGLU MLP.

  ``attn2`` is cross-attention to ``context`` (spatial transformers) or a
  second self-attention when ``context`` is None (diffusers'
  ``double_self_attention`` of the temporal transformers).

  For cross-attention the input holds ``frames`` consecutive frames per video
  (``N = B * frames``); they are folded into the query length so that each
  video's ``context [B, Lc, Dc]`` serves all its frames without copies.
  """
  heads: int
  head_dim: int
  detail_dim: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, *, frames: int = 1, context: Array | None = None,
               context_mask: Array | None = None, detail_tokens: Array | None = None,
               detail_scale: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(heads=self.heads, head_dim=self.head_dim,
                   attention_impl=self.attention_impl, **kw)

    def norm(name, y):
      return layer_norm(name=name, epsilon=LAYER_NORM_EPS, **kw)(y).astype(self.dtype)

    x = x + Attention(name="attn1", **attn_kw)(norm("norm1", x))
    h = norm("norm2", x)
    if context is None:
      x = x + Attention(name="attn2", **attn_kw)(h)
    else:
      n, length, width = h.shape
      h = h.reshape(n // frames, frames * length, width)
      h = Attention(name="attn2", detail_dim=self.detail_dim, **attn_kw)(
          h, context, context_mask, detail_tokens, detail_scale)
      x = x + h.reshape(n, length, width)
    return x + FeedForward(name="ff", **kw)(norm("norm3", x))


class SpatialTransformer(nn.Module):
  """Per-frame transformer ``[B, T, H, W, C] -> same`` (diffusers ``Transformer2DModel``).

  GroupNorm per frame (eps 1e-6), linear ``proj_in`` (diffusers'
  ``use_linear_projection=True`` in the 3D UNet), one block attending over the
  ``H*W`` pixels of a frame and to the text (+ detail tokens), linear
  ``proj_out``, residual. Heads = C // head_dim, each ``head_dim`` wide.
  """
  heads: int
  head_dim: int
  norm_num_groups: int
  detail_dim: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array, context: Array, context_mask: Array | None = None,
               detail_tokens: Array | None = None,
               detail_scale: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, h, w, c = x.shape
    inner = self.heads * self.head_dim
    y = GroupNorm(self.norm_num_groups, epsilon=TRANSFORMER_GROUP_NORM_EPS, batch_dims=2,
                  name="norm", **kw)(x).reshape(b * t, h * w, c)
    y = linear(inner, (sh.EMBED, sh.HEADS), name="proj_in", **kw)(y)
    y = BasicTransformerBlock(self.heads, self.head_dim, detail_dim=self.detail_dim,
                              attention_impl=self.attention_impl,
                              name="transformer_blocks_0", **kw)(
        y, frames=t, context=context, context_mask=context_mask,
        detail_tokens=detail_tokens, detail_scale=detail_scale)
    y = linear(c, (sh.HEADS, sh.EMBED), name="proj_out", **kw)(y)
    return x + y.reshape(b, t, h, w, c)


class TemporalTransformer(nn.Module):
  """Per-pixel transformer over frames ``[B, T, H, W, C] -> same``.

  diffusers ``TransformerTemporalModel``: GroupNorm over the whole video
  (``(T, H, W, group)`` statistics per sample, eps 1e-6, as torch's norm of
  ``[B, C, T, H, W]``), linear ``proj_in`` to ``heads * head_dim``, a block
  with two self-attentions over the ``T`` frames of each pixel, linear
  ``proj_out`` (zero-initialised: identity at init), residual. No positional
  embedding, as in diffusers.
  """
  heads: int
  head_dim: int
  norm_num_groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, h, w, c = x.shape
    inner = self.heads * self.head_dim
    y = GroupNorm(self.norm_num_groups, epsilon=TRANSFORMER_GROUP_NORM_EPS, batch_dims=1,
                  name="norm", **kw)(x)
    y = y.transpose(0, 2, 3, 1, 4).reshape(b * h * w, t, c)
    y = linear(inner, (sh.EMBED, sh.HEADS), name="proj_in", **kw)(y)
    y = BasicTransformerBlock(self.heads, self.head_dim, attention_impl=self.attention_impl,
                              name="transformer_blocks_0", **kw)(y)
    y = linear(c, (sh.HEADS, sh.EMBED), name="proj_out",
               kernel_init=nn.initializers.zeros_init(), **kw)(y)
    return x + y.reshape(b, h, w, t, c).transpose(0, 3, 1, 2, 4)


# ----------------------------------------------------------------------------
# Convolutional layers.
# ----------------------------------------------------------------------------

class ResnetBlock(nn.Module):
  """Per-frame residual block ``[B, T, H, W, Cin], temb [B, E] -> [B, T, H, W, C]``.

  diffusers ``ResnetBlock2D``: norm1 -> SiLU -> conv1 -> + time_emb_proj(SiLU
  temb) -> norm2 -> SiLU -> conv2, plus a 1x1 ``conv_shortcut`` when the width
  changes. ``conv1``/``conv2`` are the spatial convs of the factorised
  space-time block, ``kernel_size`` x ``kernel_size`` with ``dilation``.
  """
  features: int
  norm_num_groups: int
  norm_eps: float
  kernel_size: int = 3
  dilation: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def norm(name, y):   # per frame, then SiLU
      return GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, batch_dims=2,
                       activation="silu", name=name, **kw)(y)

    h = norm("norm1", x)
    h = spatial_conv(self.features, self.kernel_size, self.dilation, name="conv1", **kw)(h)
    temb = linear(self.features, (sh.MLP, sh.EMBED), name="time_emb_proj", **kw)(nn.silu(temb))
    h = h + temb[:, None, None, None, :]
    h = norm("norm2", h)
    h = spatial_conv(self.features, self.kernel_size, self.dilation, name="conv2", **kw)(h)
    if x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), name="conv_shortcut", **kw)(x)
    return x + h


class NormSiLUConv3d(nn.Module):
  """GroupNorm over the video -> SiLU -> (dropout) -> 3x1x1 conv over frames."""
  features: int
  norm_num_groups: int
  dropout: float = 0.0
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    h = GroupNorm(self.norm_num_groups, epsilon=TEMPORAL_CONV_GROUP_NORM_EPS, batch_dims=1,
                  activation="silu", name="norm", dtype=self.dtype,
                  param_dtype=self.param_dtype)(x)
    if self.dropout:
      h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    init = nn.initializers.zeros_init() if self.zero_init else nn.initializers.lecun_normal()
    return FrameConv(self.features, kernel_init=init, name="conv", dtype=self.dtype,
                     param_dtype=self.param_dtype)(h)


class FrameConv(nn.Module):
  """The 3x1x1 conv over frames, ``[B, T, H, W, Cin] -> [B, T, H, W, C]``, zero-padded.

  Parameters as flax's ``nn.Conv`` of kernel ``(3, 1, 1)`` (``kernel [3, 1, 1, Cin,
  C]``, ``bias [C]``, same initialisation and logical axes), computed as a 2-D
  conv of kernel ``(3, 1)`` over ``[B, T, H*W, Cin]`` (frames as rows, pixels as
  columns): the same sums. As a 3-D conv, XLA gives cuDNN the NCDHW layout on a
  GPU, with a transpose of the activations around each of the 88 temporal convs
  and of the weight gradient in training; the 2-D one stays channels-last.
  """
  features: int
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, t, h, w, cin = x.shape
    kernel = self.param("kernel", nn.with_logical_partitioning(
        self.kernel_init, attention.conv_kernel_axes(3)), (3, 1, 1, cin, self.features),
        self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros_init(), (sh.CONV_OUT,)), (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.conv_general_dilated(
        x.reshape(b, t, h * w, cin), kernel.reshape(3, 1, cin, self.features),
        window_strides=(1, 1), padding=((1, 1), (0, 0)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y + bias).reshape(b, t, h, w, self.features)


class TemporalConvLayer(nn.Module):
  """Four norm-SiLU-conv(3x1x1) layers over frames + residual (diffusers names conv1..4).

  Norm statistics over the whole video (diffusers norms ``[B, C, T, H, W]``).
  ``conv4`` is zero-initialised so the layer is the identity at init.
  """
  norm_num_groups: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    h = x
    for i in range(1, 5):
      h = NormSiLUConv3d(c, self.norm_num_groups, dropout=0.0 if i == 1 else self.dropout,
                         zero_init=i == 4, name=f"conv{i}", **kw)(h, deterministic)
    return x + h


class Downsample(nn.Module):
  """3x3 conv, stride 2, padding 1 per frame (diffusers ``Downsample2D``)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # Explicit (1, 1) padding, not 'SAME' (which pads (0, 1) for even sizes).
    return conv(self.features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv",
                dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
  """Nearest upsampling to ``size`` (2x by default), then 3x3 conv (``Upsample2D``)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, size: tuple[int, int] | None = None) -> Array:
    size = size or (2 * x.shape[2], 2 * x.shape[3])
    x = _nearest_resize_hw(x, size)
    return conv(self.features, (3, 3), name="conv", dtype=self.dtype,
                param_dtype=self.param_dtype)(x)


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


# The two layer groups every block repeats. Free functions, not methods: linen
# only lets a module create submodules inside its (single) compact method, and
# a function called from there creates them in that module's scope.

def _resnet_layer(block: _BlockBase, j: int, x: Array, cond: _Conditioning) -> Array:
  """``resnets_{j}`` (spatial) then ``temp_convs_{j}`` (temporal)."""
  s = block.spec
  kw = dict(dtype=block.dtype, param_dtype=block.param_dtype)
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
            attention_impl=block.attention_impl)
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

  Under a mesh with ``nn.logical_axis_rules`` the video activations are
  constrained at block boundaries to ``sharding.BATCH`` on their leading axis
  (data x fsdp), so the batch must divide the mesh; elsewhere a no-op.
  """
  spec: UNet3DSpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @classmethod
  def from_config(cls, unet_config, *, dtype="float32", param_dtype="float32",
                  attention_impl=None, **kwargs) -> "UNet3D":
    """From ``config.unet`` / ``config.sr_unet``; dtypes may be strings."""
    return cls(spec=UNet3DSpec.from_config(unet_config), dtype=attention.dtype_of(dtype),
               param_dtype=attention.dtype_of(param_dtype), attention_impl=attention_impl,
               **kwargs)

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
                            attention_impl=self.attention_impl, name="transformer_in", **kw)(h)
    h = _constrain(h)

    block_kw = dict(spec=s, attention_impl=self.attention_impl, **kw)
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
                  name="conv_norm_out", **kw)(h)
    return conv(s.out_channels, (3, 3), name="conv_out", **kw)(h)
