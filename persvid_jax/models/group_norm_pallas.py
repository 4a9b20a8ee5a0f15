"""GroupNorm (+ SiLU) forward and gradient, each one Pallas (Triton) kernel, for CUDA GPUs.

XLA cannot fuse a normalisation's reduction with the pass that uses its result:
on a GPU a GroupNorm forward is three kernels (per-channel sums of ``x`` and
``x^2``, the group statistics, the normalising pass) and four over a whole
video, about 560 of the sampler's 1,390 kernels at the ModelScope size. Here
each Triton program owns ``gb`` groups of one sample, streams that ``[L, gb,
C/G]`` slab twice (the sums, then normalise + SiLU + cast) and writes the group
mean and rstd that the gradient reads. The gradient (``group_norm_silu_bwd``)
is one kernel too: per program, the sums of ``dz`` and ``dz * x_hat`` over its
slab, then ``dx`` on a second read; the scale and bias gradients are those sums
added over the samples (one small XLA reduction). Both reads of a slab are in
one kernel, so L2 should serve most of the second (a wave of programs' slabs at
256 px is ~20 MB, the H200's L2 50 MB); unmeasured until a GPU run.

The numbers are ``attention.group_norm_silu``'s: float32 sums, ``E[x^2] -
E[x]^2`` clamped at 0, ``epsilon`` inside the rsqrt, ``(x - mean) * rstd *
scale + bias``. Triton tensors have power-of-2 sizes, so a group's ``C/G``
channels (10, 20 or 40 at 320/640/1280 channels and 32 groups) are loaded as
the next power of 2 with a mask; the rows of a slab as tiles of ``rows``, the
last one masked.

Pallas's Triton backend is deprecated from jax 0.11 (it warns once per
compile); where a later jax drops it, ``available()`` says so and the
GroupNorm's ``'auto'`` runs XLA's.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:   # Pallas's Triton backend: deprecated in jax 0.11 in favour of Mosaic GPU
  from jax.experimental.pallas import triton as plgpu
except ImportError:   # a jax without it: attention.resolve_group_norm answers 'xla'
  plgpu = None

# A grid of at least this many programs (about two per SM on an H100/H200)
# before a program takes more than one group: more groups a program give longer
# contiguous runs of channels (better coalesced), fewer programs less parallelism.
_MIN_PROGRAMS = 256
# Elements of one loaded tile: 4,096 is 32 float32 registers a thread at 4 warps.
_TILE = 4096


def available() -> bool:
  """Whether this jax has Pallas's Triton backend (the kernel's)."""
  return plgpu is not None


def tiles(samples: int, length: int, groups: int, group_width: int) -> tuple[int, int]:
  """``(gb, rows)``: groups per program and rows per tile for a ``[samples, length,
  groups, group_width]`` input.

  ``gb``: the largest power of 2 dividing ``groups`` that keeps ``samples *
  groups / gb >= 256`` programs (1 when even that is fewer), at most 256
  channels. ``rows``: a power of 2 filling a tile of ~4,096 elements, at most
  ``length`` rounded up to a power of 2.
  """
  gb = 1
  while (groups % (2 * gb) == 0 and samples * groups // (2 * gb) >= _MIN_PROGRAMS
         and 2 * gb * group_width <= 256):
    gb *= 2
  width = gb * pl.next_power_of_2(group_width)
  rows = max(1, min(_TILE // width, pl.next_power_of_2(length)))
  return gb, rows


def _kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, length: int, rows: int,
            epsilon: float, silu: bool):
  """One program: ``x_ref, y_ref [L, gb, C/G]``, ``scale_ref, bias_ref [gb, C/G]``,
  ``mean_ref, rstd_ref [gb]``."""
  f32 = jnp.float32
  gb, width = x_ref.shape[-2:]
  padded = pl.next_power_of_2(width)
  in_group = jnp.arange(padded) < width                                   # [P]
  params_mask = jnp.broadcast_to(in_group[None, :], (gb, padded))

  def tile(i):
    """Rows ``[i * rows, (i + 1) * rows)``: a view of the tile and its mask."""
    in_rows = (i * rows + jnp.arange(rows)) < length
    mask = in_rows[:, None, None] & in_group[None, None, :]
    return x_ref.at[pl.ds(i * rows, rows), :, pl.ds(0, padded)], mask

  def sums(i, carry):
    s, ss = carry
    view, mask = tile(i)
    x = plgpu.load(view, mask=mask, other=0.0).astype(f32)               # [rows, gb, P]
    return s + x.sum(0), ss + (x * x).sum(0)

  zero = jnp.zeros((gb, padded), f32)
  steps = pl.cdiv(length, rows)
  s, ss = jax.lax.fori_loop(0, steps, sums, (zero, zero))
  count = length * width
  mean = s.sum(-1) / count                                                # [gb]
  rstd = jax.lax.rsqrt(jnp.maximum(ss.sum(-1) / count - mean * mean, 0.0) + epsilon)
  scale = plgpu.load(scale_ref.at[:, pl.ds(0, padded)], mask=params_mask, other=0.0)
  bias = plgpu.load(bias_ref.at[:, pl.ds(0, padded)], mask=params_mask, other=0.0)
  scale, bias = scale.astype(f32)[None], bias.astype(f32)[None]          # [1, gb, P]

  def normalise(i, _):
    view, mask = tile(i)
    x = plgpu.load(view, mask=mask, other=0.0).astype(f32)
    z = (x - mean[None, :, None]) * rstd[None, :, None] * scale + bias
    if silu:
      z = z * jax.nn.sigmoid(z)
    plgpu.store(y_ref.at[pl.ds(i * rows, rows), :, pl.ds(0, padded)], z.astype(y_ref.dtype),
                mask=mask)
    return 0

  jax.lax.fori_loop(0, steps, normalise, 0)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def group_norm_silu_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                        epsilon: float, batch_dims: int, silu: bool, dtype: Any, *,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """GroupNorm (+ SiLU) of ``x [*batch, *reduced, C]`` in one kernel.

  Args:
    x: any float dtype; the first ``batch_dims`` axes are samples, statistics
      run over the others and each group's ``C // groups`` channels.
    scale, bias: ``[C]``.
    groups, epsilon, silu: as ``attention.group_norm_silu``.
    dtype: the output's dtype.
    interpret: run Pallas's interpreter (any backend; for tests on a CPU).

  Returns:
    ``y`` (``x``'s shape, ``dtype``), ``mean`` and ``rstd`` (``[*batch, G]``
    float32), what ``attention._group_norm_fwd`` returns.
  """
  batch = x.shape[:batch_dims]
  c = x.shape[-1]
  samples = math.prod(batch)
  length = math.prod(x.shape[batch_dims:-1])
  width = c // groups
  gb, rows = tiles(samples, length, groups, width)
  kernel = functools.partial(_kernel, length=length, rows=rows, epsilon=epsilon, silu=silu)
  slab = pl.BlockSpec((None, length, gb, width), lambda n, g: (n, 0, g, 0))
  per_group = pl.BlockSpec((None, gb), lambda n, g: (n, g))
  params = pl.BlockSpec((gb, width), lambda n, g: (g, 0))
  stats = jax.ShapeDtypeStruct((samples, groups), jnp.float32)
  y, mean, rstd = pl.pallas_call(
      kernel, grid=(samples, groups // gb),
      in_specs=[slab, params, params], out_specs=[slab, per_group, per_group],
      out_shape=[jax.ShapeDtypeStruct((samples, length, groups, width), jnp.dtype(dtype)),
                 stats, stats],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="group_norm_silu",
  )(x.reshape(samples, length, groups, width), scale.reshape(groups, width),
    bias.reshape(groups, width))
  return y.reshape(x.shape), mean.reshape(batch + (groups,)), rstd.reshape(batch + (groups,))


def _bwd_kernel(x_ref, dy_ref, mean_ref, rstd_ref, scale_ref, bias_ref, dx_ref, sum_dz_ref,
                sum_dz_xhat_ref, *, length: int, rows: int, silu: bool):
  """One program of the gradient: ``x_ref, dy_ref, dx_ref [L, gb, C/G]``,
  ``mean_ref, rstd_ref [gb]``, ``scale_ref, bias_ref [gb, C/G]``, and the
  per-channel sums of ``dz`` and ``dz * x_hat`` over the slab, ``[gb, C/G]``."""
  f32 = jnp.float32
  gb, width = x_ref.shape[-2:]
  padded = pl.next_power_of_2(width)
  in_group = jnp.arange(padded) < width
  params_mask = jnp.broadcast_to(in_group[None, :], (gb, padded))
  mean = mean_ref[...][None, :, None]
  rstd = rstd_ref[...][None, :, None]
  scale = plgpu.load(scale_ref.at[:, pl.ds(0, padded)], mask=params_mask, other=0.0)
  bias = plgpu.load(bias_ref.at[:, pl.ds(0, padded)], mask=params_mask, other=0.0)
  scale, bias = scale.astype(f32)[None], bias.astype(f32)[None]          # [1, gb, P]

  def tile(i):
    """``(dz, x_hat, mask)`` of rows ``[i * rows, (i + 1) * rows)``; zero where masked."""
    in_rows = (i * rows + jnp.arange(rows)) < length
    mask = in_rows[:, None, None] & in_group[None, None, :]
    window = (pl.ds(i * rows, rows), slice(None), pl.ds(0, padded))
    x = plgpu.load(x_ref.at[window], mask=mask, other=0.0).astype(f32)
    dz = plgpu.load(dy_ref.at[window], mask=mask, other=0.0).astype(f32)
    x_hat = (x - mean) * rstd      # where masked, dz is 0: no term of either sum
    if silu:
      z = x_hat * scale + bias
      s = jax.nn.sigmoid(z)
      dz = dz * s * (1.0 + z * (1.0 - s))
    return dz, x_hat, mask

  def sums(i, carry):
    a, b = carry
    dz, x_hat, _ = tile(i)
    return a + dz.sum(0), b + (dz * x_hat).sum(0)

  zero = jnp.zeros((gb, padded), f32)
  steps = pl.cdiv(length, rows)
  sum_dz, sum_dz_xhat = jax.lax.fori_loop(0, steps, sums, (zero, zero))
  count = length * width
  mean_g = ((sum_dz * scale[0]).sum(-1) / count)[None, :, None]
  mean_gx = ((sum_dz_xhat * scale[0]).sum(-1) / count)[None, :, None]

  def dx(i, _):
    dz, x_hat, mask = tile(i)
    out = rstd * (dz * scale - mean_g - x_hat * mean_gx)
    plgpu.store(dx_ref.at[pl.ds(i * rows, rows), :, pl.ds(0, padded)],
                out.astype(dx_ref.dtype), mask=mask)
    return 0

  jax.lax.fori_loop(0, steps, dx, 0)
  plgpu.store(sum_dz_ref.at[:, pl.ds(0, padded)], sum_dz, mask=params_mask)
  plgpu.store(sum_dz_xhat_ref.at[:, pl.ds(0, padded)], sum_dz_xhat, mask=params_mask)


def group_norm_silu_bwd(x: jax.Array, dy: jax.Array, mean: jax.Array, rstd: jax.Array,
                        scale: jax.Array, bias: jax.Array, groups: int, batch_dims: int,
                        silu: bool, *, interpret: bool = False
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The gradient of ``group_norm_silu_fwd`` at ``x`` for the output gradient
  ``dy`` (``x``'s shape), from its ``mean``, ``rstd`` (``[*batch, G]``), in one kernel.

  Returns:
    ``dx`` (``x``'s shape and dtype) and the per-sample, per-channel sums of
    ``dz`` and ``dz * x_hat`` (``[*batch, C]`` float32; ``dz`` the gradient at the
    SiLU's input): summed over the samples they are the bias and scale gradients.
  """
  batch = x.shape[:batch_dims]
  c = x.shape[-1]
  samples = math.prod(batch)
  length = math.prod(x.shape[batch_dims:-1])
  width = c // groups
  gb, rows = tiles(samples, length, groups, width)
  kernel = functools.partial(_bwd_kernel, length=length, rows=rows, silu=silu)
  slab = pl.BlockSpec((None, length, gb, width), lambda n, g: (n, 0, g, 0))
  per_group = pl.BlockSpec((None, gb), lambda n, g: (n, g))
  params = pl.BlockSpec((gb, width), lambda n, g: (g, 0))
  per_channel = pl.BlockSpec((None, gb, width), lambda n, g: (n, g, 0))
  sums = jax.ShapeDtypeStruct((samples, groups, width), jnp.float32)
  view = lambda a: a.reshape(samples, length, groups, width)
  dx, sum_dz, sum_dz_xhat = pl.pallas_call(
      kernel, grid=(samples, groups // gb),
      in_specs=[slab, slab, per_group, per_group, params, params],
      out_specs=[slab, per_channel, per_channel],
      out_shape=[jax.ShapeDtypeStruct(view(x).shape, x.dtype), sums, sums],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="group_norm_silu_bwd",
  )(view(x), view(dy), mean.reshape(samples, groups), rstd.reshape(samples, groups),
    scale.reshape(groups, width), bias.reshape(groups, width))
  return (dx.reshape(x.shape), sum_dz.reshape(batch + (c,)),
          sum_dz_xhat.reshape(batch + (c,)))
