"""LayerNorm forward and gradient, each one Pallas (Triton) kernel, for CUDA GPUs.

``attention.layer_norm_f32`` on XLA's path is one fused kernel forward, but a
differentiated one also sums the row statistics the gradient needs in a second
pass, and its gradient reads ``x`` and ``dy`` twice (a column reduction for the
scale and bias gradients, a row kernel for ``dx``): six kernels and ~6 reads or
writes of the activation for a forward + backward. A row's statistics are its
own, so here each kernel reads its rows once: the forward writes ``y`` and the
row mean and rstd; the gradient writes ``dx`` and, per program, the column sums
of ``dy`` and ``dy * x_hat`` over its rows, which one small XLA reduction turns
into the scale and bias gradients.

The numbers are ``layer_norm_f32``'s: float32, the two-pass variance ``E[(x -
E[x])^2]`` (here both passes over a tile held in registers), ``epsilon`` inside
the rsqrt. Widths that are not a power of 2 (320, 640, 1280) load padded with a
mask. Like ``group_norm_pallas`` (whose ``plgpu`` this uses), it needs Pallas's
Triton backend.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from persvid_jax.models.group_norm_pallas import plgpu

# Elements of one loaded tile (as in group_norm_pallas).
_TILE = 4096
# Programs of the gradient: each writes a row of column sums, so fewer programs
# are fewer partial sums to add; ~8 per SM of an H100/H200 keeps them all busy.
_GRAD_PROGRAMS = 1024


def _rows_per_tile(width: int) -> int:
  """A power of 2: rows of ``width`` (padded) filling a tile of ~4,096 elements."""
  return max(1, _TILE // pl.next_power_of_2(width))


def _columns(width: int):
  """``(padded, in_row)``: the padded width and its mask ``[P]``."""
  padded = pl.next_power_of_2(width)
  return padded, jnp.arange(padded) < width


def _fwd_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, rows: int,
                tile: int, epsilon: float):
  """Program ``j``: rows ``[j * tile, (j + 1) * tile)``; ``x_ref, y_ref [rows, C]``,
  ``scale_ref, bias_ref [C]``, ``mean_ref, rstd_ref [rows]``."""
  f32 = jnp.float32
  width = x_ref.shape[-1]
  padded, in_row = _columns(width)
  start = pl.program_id(0) * tile
  row_ok = (start + jnp.arange(tile)) < rows
  mask = row_ok[:, None] & in_row[None, :]
  index = (pl.ds(start, tile), pl.ds(0, padded))
  x = plgpu.load(x_ref.at[index], mask=mask, other=0.0).astype(f32)      # [tile, P]
  mean = x.sum(-1) / width
  d = jnp.where(mask, x - mean[:, None], 0.0)
  rstd = jax.lax.rsqrt((d * d).sum(-1) / width + epsilon)
  scale = plgpu.load(scale_ref.at[pl.ds(0, padded)], mask=in_row, other=0.0).astype(f32)
  bias = plgpu.load(bias_ref.at[pl.ds(0, padded)], mask=in_row, other=0.0).astype(f32)
  y = d * rstd[:, None] * scale[None] + bias[None]
  plgpu.store(y_ref.at[index], y.astype(y_ref.dtype), mask=mask)
  plgpu.store(mean_ref.at[pl.ds(start, tile)], mean, mask=row_ok)
  plgpu.store(rstd_ref.at[pl.ds(start, tile)], rstd, mask=row_ok)


def _rows(x: jax.Array) -> jax.Array:
  """``[..., C] -> [rows, C]``."""
  return x.reshape(-1, x.shape[-1])


def layer_norm_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                   dtype: Any, *, interpret: bool = False
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """LayerNorm over the last axis of ``x [..., C]`` in one kernel.

  Args:
    x: any float dtype. scale, bias: ``[C]``. epsilon: inside the rsqrt.
    dtype: the output's dtype.
    interpret: run Pallas's interpreter (any backend; for tests on a CPU).

  Returns:
    ``y`` (``x``'s shape, ``dtype``), the row ``mean`` and ``rstd`` (``x``'s shape
    without ``C``, float32).
  """
  v = _rows(x)
  rows, width = v.shape
  tile = _rows_per_tile(width)
  stats = jax.ShapeDtypeStruct((rows,), jnp.float32)
  y, mean, rstd = pl.pallas_call(
      functools.partial(_fwd_kernel, rows=rows, tile=tile, epsilon=epsilon),
      grid=(pl.cdiv(rows, tile),),
      out_shape=[jax.ShapeDtypeStruct(v.shape, jnp.dtype(dtype)), stats, stats],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="layer_norm",
  )(v, scale, bias)
  return y.reshape(x.shape), mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


def _bwd_kernel(x_ref, dy_ref, mean_ref, rstd_ref, scale_ref, dx_ref, sum_dy_ref,
                sum_dy_xhat_ref, *, rows: int, tile: int, span: int):
  """Program ``j``: rows ``[j * span, (j + 1) * span)`` in tiles of ``tile``;
  ``x_ref, dy_ref, dx_ref [rows, C]``, ``mean_ref, rstd_ref [rows]``, ``scale_ref
  [C]``, its column sums ``sum_dy_ref, sum_dy_xhat_ref [k, C]`` (its row ``j``)."""
  f32 = jnp.float32
  width = x_ref.shape[-1]
  padded, in_row = _columns(width)
  scale = plgpu.load(scale_ref.at[pl.ds(0, padded)], mask=in_row, other=0.0).astype(f32)
  j = pl.program_id(0)
  first = j * span

  def step(t, carry):
    start = first + t * tile
    row_ok = (start + jnp.arange(tile)) < rows
    mask = row_ok[:, None] & in_row[None, :]
    index = (pl.ds(start, tile), pl.ds(0, padded))
    x = plgpu.load(x_ref.at[index], mask=mask, other=0.0).astype(f32)
    dy = plgpu.load(dy_ref.at[index], mask=mask, other=0.0).astype(f32)   # 0 where masked
    mean = plgpu.load(mean_ref.at[pl.ds(start, tile)], mask=row_ok, other=0.0)
    rstd = plgpu.load(rstd_ref.at[pl.ds(start, tile)], mask=row_ok, other=0.0)
    x_hat = jnp.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * scale[None]
    mean_g = g.sum(-1) / width
    mean_gx = (g * x_hat).sum(-1) / width
    dx = rstd[:, None] * (g - mean_g[:, None] - x_hat * mean_gx[:, None])
    plgpu.store(dx_ref.at[index], dx.astype(dx_ref.dtype), mask=mask)
    return carry[0] + dy.sum(0), carry[1] + (dy * x_hat).sum(0)

  zero = jnp.zeros((padded,), f32)
  sum_dy, sum_dy_xhat = jax.lax.fori_loop(0, span // tile, step, (zero, zero))
  plgpu.store(sum_dy_ref.at[j, pl.ds(0, padded)], sum_dy, mask=in_row)
  plgpu.store(sum_dy_xhat_ref.at[j, pl.ds(0, padded)], sum_dy_xhat, mask=in_row)


def layer_norm_bwd(x: jax.Array, dy: jax.Array, mean: jax.Array, rstd: jax.Array,
                   scale: jax.Array, *, interpret: bool = False
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The gradient of ``layer_norm_fwd`` at ``x`` for the output gradient ``dy``
  (``x``'s shape), from its row ``mean`` and ``rstd``, in one kernel.

  Returns:
    ``dx`` (``x``'s shape and dtype) and the column sums of ``dy`` and ``dy *
    x_hat`` over each program's rows, ``[k, C]`` float32 (``k`` <= 1,024
    programs): summed over ``k`` they are the bias and scale gradients.
  """
  v = _rows(x)
  rows, width = v.shape
  tile = _rows_per_tile(width)
  span = pl.cdiv(pl.cdiv(rows, min(_GRAD_PROGRAMS, pl.cdiv(rows, tile))), tile) * tile
  k = pl.cdiv(rows, span)
  sums = jax.ShapeDtypeStruct((k, width), jnp.float32)
  dx, sum_dy, sum_dy_xhat = pl.pallas_call(
      functools.partial(_bwd_kernel, rows=rows, tile=tile, span=span),
      grid=(k,),
      out_shape=[jax.ShapeDtypeStruct(v.shape, x.dtype), sums, sums],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="layer_norm_bwd",
  )(v, _rows(dy), mean.reshape(rows), rstd.reshape(rows), scale)
  return dx.reshape(x.shape), sum_dy, sum_dy_xhat
