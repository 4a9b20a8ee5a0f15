"""A transformer block's residual add + LayerNorm, forward and gradient, each one
Pallas (Triton) kernel, for CUDA GPUs.

In a pre-LN block ``s = x + (r + b)`` (the residual stream, ``r + b`` the
previous sublayer's output projection with its bias) is followed by ``y =
LayerNorm(s)``. XLA writes ``s`` with the row statistics in one pass and reads it
again to normalise; backward it sums the scale and bias gradients in a column
reduction, writes ``ds = g + LN'(dy)`` (``g`` the residual stream's gradient) in a
row kernel, and reads ``ds`` once more for ``b``'s gradient: the row and column
reductions of one tile cannot share an XLA kernel. A Triton program holds whole
rows, so here:

- forward: read ``x`` and ``r``, write ``s`` and ``y`` (the statistics two-pass,
  in registers);
- gradient: read ``s``, ``dy`` and ``g``, write ``ds``, and per program the column
  sums of ``dy``, ``dy * x_hat`` and ``ds`` over its rows, which one small XLA
  reduction turns into the LayerNorm's bias and scale gradients and ``b``'s.

The numbers are ``attention.layer_norm_f32``'s: float32, ``E[(s - E[s])^2]``,
``epsilon`` inside the rsqrt; ``r + b`` and ``x + (r + b)`` rounded to ``x``'s
dtype as XLA rounds them. Widths 320, 640, 1280 load padded to the next power of
2 with a mask. Like ``group_norm_pallas`` (whose ``plgpu`` this uses), it needs
Pallas's Triton backend.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from persvid_jax.models.group_norm_pallas import plgpu

_TILE = 4096          # elements of one loaded tile (as in group_norm_pallas)
_SPAN = 64            # rows a gradient program owns, at least
_GRAD_PROGRAMS = 256  # gradient programs, at most: each writes a row of column sums


def tile_rows(width: int) -> int:
  """Rows of one tile: a power of 2 filling ~4,096 elements of ``width`` padded."""
  return max(1, _TILE // pl.next_power_of_2(width))


def grad_span(rows: int, width: int) -> int:
  """Rows a gradient program owns: a multiple of ``tile_rows``, at least 64, and
  few enough programs (<= 256) that their column sums stay small."""
  tile = tile_rows(width)
  span = max(_SPAN, pl.cdiv(rows, _GRAD_PROGRAMS))
  return pl.cdiv(span, tile) * tile


def _window(start, tile: int, rows: int, width: int):
  padded = pl.next_power_of_2(width)
  row_ok = (start + jnp.arange(tile)) < rows
  col_ok = jnp.arange(padded) < width
  return (pl.ds(start, tile), pl.ds(0, padded)), row_ok[:, None] & col_ok[None, :], col_ok


def _load_vec(ref, col_ok):
  padded = col_ok.shape[0]
  return plgpu.load(ref.at[pl.ds(0, padded)], mask=col_ok, other=0.0).astype(jnp.float32)


def _fwd_kernel(*refs, rows: int, tile: int, epsilon: float, has_x: bool, has_bias: bool):
  """Program ``j``: rows ``[j * tile, (j + 1) * tile)``. Refs in order: ``r [rows,
  C]``, (``b [C]``), (``x [rows, C]``), ``scale, bias [C]``; out ``y``, (``s``)."""
  refs = list(refs)
  r_ref = refs.pop(0)
  b_ref = refs.pop(0) if has_bias else None
  x_ref = refs.pop(0) if has_x else None
  scale_ref, bias_ref, y_ref = refs[:3]
  s_ref = refs[3] if (has_x or has_bias) else None
  f32, width = jnp.float32, r_ref.shape[-1]
  dtype = (x_ref if has_x else r_ref).dtype
  index, mask, col_ok = _window(pl.program_id(0) * tile, tile, rows, width)
  s = plgpu.load(r_ref.at[index], mask=mask, other=0.0).astype(f32)
  if has_bias:   # r + b in r's dtype, as the projection adds its bias (cast to it)
    b = _load_vec(b_ref, col_ok).astype(r_ref.dtype).astype(f32)
    s = (s + b[None]).astype(r_ref.dtype).astype(f32)
  if has_x:      # the residual add, rounded to the stream's dtype
    s = (plgpu.load(x_ref.at[index], mask=mask, other=0.0).astype(f32) + s
         ).astype(dtype).astype(f32)
  if s_ref is not None:
    plgpu.store(s_ref.at[index], s.astype(s_ref.dtype), mask=mask)
  mean = s.sum(-1) / width
  d = jnp.where(mask, s - mean[:, None], 0.0)
  rstd = jax.lax.rsqrt((d * d).sum(-1) / width + epsilon)
  y = d * (rstd[:, None] * _load_vec(scale_ref, col_ok)[None]) + _load_vec(bias_ref, col_ok)[None]
  plgpu.store(y_ref.at[index], y.astype(y_ref.dtype), mask=mask)


def add_layer_norm_fwd(r: jax.Array, r_bias: jax.Array | None, x: jax.Array | None,
                       scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Any, *,
                       interpret: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """``s = x + (r + r_bias)`` and ``y = LayerNorm(s)`` over the last axis, one kernel.

  Args:
    r: ``[..., C]``: the residual branch (or, with neither ``r_bias`` nor ``x``,
      the LayerNorm's input itself).
    r_bias: ``[C]`` or None: the branch's bias, added (in ``r``'s dtype) first.
    x: ``r``'s shape or None: the residual stream.
    scale, bias: ``[C]``. epsilon: inside the rsqrt. dtype: ``y``'s dtype.
    interpret: run Pallas's interpreter (any backend; for tests on a CPU).

  Returns:
    ``y`` (``r``'s shape, ``dtype``) and ``s`` (``x``'s dtype; None when it is
    ``r`` itself).
  """
  width = r.shape[-1]
  rows = math.prod(r.shape[:-1])
  tile = tile_rows(width)
  has_x, has_bias = x is not None, r_bias is not None
  stream = (x if has_x else r).dtype
  inputs = [r.reshape(rows, width)] + ([r_bias] if has_bias else []) + (
      [x.reshape(rows, width)] if has_x else []) + [scale, bias]
  out_shape = [jax.ShapeDtypeStruct((rows, width), jnp.dtype(dtype))]
  if has_x or has_bias:
    out_shape.append(jax.ShapeDtypeStruct((rows, width), stream))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, rows=rows, tile=tile, epsilon=epsilon, has_x=has_x,
                        has_bias=has_bias),
      grid=(pl.cdiv(rows, tile),), out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="add_layer_norm",
  )(*inputs)
  y = outs[0].reshape(r.shape)
  return y, (outs[1].reshape(r.shape) if len(outs) > 1 else None)


def _bwd_kernel(s_ref, dy_ref, g_ref, scale_ref, ds_ref, sums_ref, *, rows: int, tile: int,
                span: int, epsilon: float):
  """Program ``j``: rows ``[j * span, (j + 1) * span)`` in tiles of ``tile``;
  ``s_ref, dy_ref, g_ref, ds_ref [rows, C]``, ``scale_ref [C]``, ``sums_ref [3,
  C]``: its column sums of ``dy``, ``dy * x_hat`` and ``ds``."""
  f32, width = jnp.float32, s_ref.shape[-1]
  padded = pl.next_power_of_2(width)
  col_ok = jnp.arange(padded) < width
  scale = _load_vec(scale_ref, col_ok)[None]
  first = pl.program_id(0) * span

  def step(t, carry):
    index, mask, _ = _window(first + t * tile, tile, rows, width)
    s = plgpu.load(s_ref.at[index], mask=mask, other=0.0).astype(f32)
    dy = plgpu.load(dy_ref.at[index], mask=mask, other=0.0).astype(f32)   # 0 where masked
    g = plgpu.load(g_ref.at[index], mask=mask, other=0.0).astype(f32)
    mean = s.sum(-1) / width
    d = jnp.where(mask, s - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt((d * d).sum(-1) / width + epsilon)
    x_hat = d * rstd[:, None]
    gy = dy * scale
    mean_g = gy.sum(-1) / width
    mean_gx = (gy * x_hat).sum(-1) / width
    ds = (g + rstd[:, None] * (gy - mean_g[:, None] - x_hat * mean_gx[:, None])
          ).astype(ds_ref.dtype)
    plgpu.store(ds_ref.at[index], ds, mask=mask)
    return (carry[0] + dy.sum(0), carry[1] + (dy * x_hat).sum(0),
            carry[2] + ds.astype(f32).sum(0))

  zero = jnp.zeros((padded,), f32)
  sums = jax.lax.fori_loop(0, span // tile, step, (zero, zero, zero))
  for k in range(3):
    plgpu.store(sums_ref.at[pl.ds(k, 1), pl.ds(0, padded)], sums[k][None], mask=col_ok[None])


def add_layer_norm_bwd(s: jax.Array, dy: jax.Array, g: jax.Array, scale: jax.Array,
                       epsilon: float, *, interpret: bool = False
                       ) -> tuple[jax.Array, jax.Array]:
  """The gradient of ``add_layer_norm_fwd`` in one kernel.

  Args:
    s: ``[..., C]``: the LayerNorm's input (the stream after the add).
    dy: ``s``'s shape: the gradient at ``y``.
    g: ``s``'s shape: the gradient reaching ``s`` by the residual stream.
    scale: ``[C]``. epsilon: the forward's.

  Returns:
    ``ds = g + LayerNorm'(dy)`` (``s``'s shape and dtype: the gradient of ``x``,
    ``r`` and, summed over the rows, ``r_bias``) and ``[P, 3, C]`` float32, each
    gradient program's column sums of ``dy``, ``dy * x_hat`` and ``ds``: summed
    over ``P`` the LayerNorm's bias and scale gradients and ``r_bias``'s.
  """
  width = s.shape[-1]
  rows = math.prod(s.shape[:-1])
  tile = tile_rows(width)
  span = grad_span(rows, width)
  programs = pl.cdiv(rows, span)
  v = lambda a: a.reshape(rows, width)
  ds, sums = pl.pallas_call(
      functools.partial(_bwd_kernel, rows=rows, tile=tile, span=span, epsilon=epsilon),
      grid=(programs,),
      out_specs=[pl.BlockSpec((rows, width), lambda j: (0, 0)),
                 pl.BlockSpec((None, 3, width), lambda j: (j, 0, 0))],
      out_shape=[jax.ShapeDtypeStruct((rows, width), s.dtype),
                 jax.ShapeDtypeStruct((programs, 3, width), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="add_layer_norm_bwd",
  )(v(s), v(dy), v(g), scale)
  return ds.reshape(s.shape), sums
