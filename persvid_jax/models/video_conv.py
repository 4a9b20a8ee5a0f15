"""The generator's convolutional layers: the per-frame resnet block (the spatial convs
whose kernel size the SR network changes), the temporal conv layer over frames, and the
down / upsamplers. ``[B, T, H, W, C]`` channels-last, diffusers' parameter names.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from persvid_jax import sharding as sh
from persvid_jax.models import attention
from persvid_jax.models.attention import GroupNorm, conv, linear

Dtype = Any
Array = jax.Array

# diffusers' hard-coded epsilon (not the config's norm_eps).
TEMPORAL_CONV_GROUP_NORM_EPS = 1e-5  # TemporalConvLayer: torch nn.GroupNorm default


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


def _nearest_resize_hw(x: Array, size: tuple[int, int]) -> Array:
  """Nearest upsampling of ``[B, T, H, W, C]`` to ``size`` (torch's index rule).

  ``src = floor(dst * in / out)``, i.e. torch ``F.interpolate(mode='nearest')``:
  a plain 2x repeat when ``out == 2 * in``, and the same pixels as diffusers
  when an odd-sized skip forces another size.

  An integer factor is a broadcast and a reshape, whose gradient is a sum over
  each pixel's copies (a gather's is a scatter-add: atomics on a GPU).
  """
  (h, w), (oh, ow) = x.shape[2:4], size
  if oh % h == 0 and ow % w == 0:
    fh, fw = oh // h, ow // w
    b, t, _, _, c = x.shape
    x = jnp.broadcast_to(x[:, :, :, None, :, None, :], (b, t, h, fh, w, fw, c))
    return x.reshape(b, t, oh, ow, c)
  rows = (jnp.arange(oh) * h) // oh
  cols = (jnp.arange(ow) * w) // ow
  return jnp.take(jnp.take(x, rows, axis=2), cols, axis=3)



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
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def norm(name, y):   # per frame, then SiLU
      return GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, batch_dims=2,
                       activation="silu", implementation=self.norm_impl, name=name, **kw)(y)

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
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    # The dropout inside the norm: in its Triton kernels it costs no pass of its own.
    h = GroupNorm(self.norm_num_groups, epsilon=TEMPORAL_CONV_GROUP_NORM_EPS, batch_dims=1,
                  activation="silu", implementation=self.norm_impl, dropout=self.dropout,
                  name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(
                      x, deterministic=deterministic)
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
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, norm_impl=self.norm_impl)
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
