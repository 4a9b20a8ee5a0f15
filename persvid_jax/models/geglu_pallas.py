"""GEGLU's gradient and its bias gradient in one Pallas (Triton) kernel, for CUDA GPUs.

``video_transformer.geglu``'s gradient is one elementwise pass over ``(y, dy)``
that writes the ``[..., 2F]`` gradient; its bias gradient is that gradient
summed over the rows. XLA does not fuse the column sum into the pass that
writes what it sums (with a barrier it reads the gradient back, a second
``[..., 2F]`` read; without one it writes the float32 product instead): in the
ModelScope train step those sums were 6.0 GB of the memory-bound traffic. Here
a Triton program owns ``chunk`` rows and 128 columns of each half, walks them
in tiles of 32 rows, writes the gradient and keeps the column sums of what it
wrote; one small XLA reduction adds the programs' sums.

Triton has no ``erf``: the normal CDF is Abramowitz & Stegun 7.1.26 (absolute
error <= 1.5e-7, below bfloat16's resolution and float32's rounding of the
product it scales), sharing its ``exp(-g^2 / 2)`` with the normal density.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from persvid_jax.models import group_norm_pallas

plgpu = group_norm_pallas.plgpu

_COLS = 128        # columns of each half a program owns
_ROWS = 32         # rows of one tile: 32 x 128 elements, 32 float32 registers a thread
_MAX_CHUNK = 1024  # rows a program owns, at most
_MIN_PROGRAMS = 256

# Abramowitz & Stegun 7.1.26: erfc(z) ~ t (a1 + t (a2 + ...)) exp(-z^2), t = 1 / (1 + p z), z >= 0.
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def fits(rows: int, features: int) -> bool:
  """Whether ``[rows, 2 * features]`` runs here: ``features`` a multiple of 128."""
  return features % _COLS == 0 and rows > 0


def chunk(rows: int, features: int) -> int:
  """Rows a program owns: the largest power of 2 from 32 to 1,024 that keeps at
  least 256 programs (32 when even that is fewer)."""
  c = _MAX_CHUNK
  while c > _ROWS and pl.cdiv(rows, c) * (features // _COLS) < _MIN_PROGRAMS:
    c //= 2
  return c


def normal_cdf_pdf(g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(Phi(g), phi(g))`` of float32 ``g`` with one ``exp`` (the kernel's; any backend)."""
  e = jnp.exp(-0.5 * g * g)
  t = 1.0 / (1.0 + _P * (jnp.abs(g) * _SQRT_HALF))
  poly = t * (_A[0] + t * (_A[1] + t * (_A[2] + t * (_A[3] + t * _A[4]))))
  half_tail = 0.5 * poly * e                        # Phi(-|g|)
  return jnp.where(g >= 0, 1.0 - half_tail, half_tail), e * _INV_SQRT_2PI


def _kernel(y_ref, b_hidden_ref, b_gate_ref, dy_ref, dh_ref, sums_ref, *, rows: int,
            chunk: int):
  """One program: ``y_ref, dh_ref [rows, 2, 128]`` (its column block of both
  halves, all rows), ``dy_ref [rows, 128]``, ``b_*_ref [128]``, ``sums_ref
  [2, 128]`` (its rows' column sums of ``dh``)."""
  f32, dtype = jnp.float32, dh_ref.dtype
  first = pl.program_id(0) * chunk
  # y + bias as the forward adds them: the bias in y's dtype, the sum rounded to it.
  b_hidden = b_hidden_ref[...].astype(dtype).astype(f32)[None]
  b_gate = b_gate_ref[...].astype(dtype).astype(f32)[None]
  add = lambda a, b: (a + b).astype(dtype).astype(f32)

  def tile(k, carry):
    start = first + k * _ROWS
    at = pl.ds(start, _ROWS)
    mask = ((start + jnp.arange(_ROWS)) < rows)[:, None]
    half = lambda h: (at, pl.ds(h, 1), slice(None))      # [32, 1, 128] of half h
    load = lambda ref, ix, m: plgpu.load(ref.at[ix], mask=m, other=0.0).astype(f32)
    hidden = add(load(y_ref, half(0), mask[:, None]).reshape(_ROWS, _COLS), b_hidden)
    gate = add(load(y_ref, half(1), mask[:, None]).reshape(_ROWS, _COLS), b_gate)
    dy = load(dy_ref, (at, slice(None)), mask)   # 0 on masked rows: nothing added to the sums
    cdf, pdf = normal_cdf_pdf(gate)
    d_hidden = (dy * gate * cdf).astype(dtype)                    # dy * gelu(gate)
    d_gate = (dy * hidden * (cdf + gate * pdf)).astype(dtype)   # dy * hidden * gelu'(gate)
    plgpu.store(dh_ref.at[half(0)], d_hidden[:, None, :], mask=mask[:, None])
    plgpu.store(dh_ref.at[half(1)], d_gate[:, None, :], mask=mask[:, None])
    return carry[0] + d_hidden.astype(f32).sum(0), carry[1] + d_gate.astype(f32).sum(0)

  zero = jnp.zeros((_COLS,), f32)
  # The same tiles in every program; the last program's past ``rows`` are masked.
  s_hidden, s_gate = jax.lax.fori_loop(0, chunk // _ROWS, tile, (zero, zero))
  sums_ref[pl.ds(0, 1), :] = s_hidden[None]
  sums_ref[pl.ds(1, 1), :] = s_gate[None]


def geglu_bwd(y: jax.Array, dy: jax.Array, bias: jax.Array, *, interpret: bool = False
              ) -> tuple[jax.Array, jax.Array]:
  """The gradient of ``hidden * gelu(gate)`` (``hidden, gate`` the halves of ``y +
  bias``) for the output gradient ``dy``, in one kernel.

  Args:
    y: ``[..., 2F]`` (the projection without its bias), ``F`` a multiple of 128.
    dy: ``[..., F]``.
    bias: ``[2F]``, any float dtype (cast to ``y``'s, as the forward adds it).
    interpret: run Pallas's interpreter (any backend; for tests on a CPU).

  Returns:
    ``dh`` (``y``'s shape and dtype: the gradient at ``y + bias``) and the column
    sums of ``dh`` as written (rounded to ``y``'s dtype) by row chunk, ``[P,
    2F]`` float32: summed over ``P`` they are the bias gradient
    (``video_transformer._geglu_bwd_xla``'s sum). Per chunk so that under a
    mesh each device's rows give rows of sums (``attention.per_batch_shard``).
  """
  features = y.shape[-1] // 2
  rows = math.prod(y.shape[:-1])
  if not fits(rows, features):
    raise ValueError(f"geglu_bwd: F={features} is not a multiple of {_COLS}")
  c = chunk(rows, features)
  grid = (pl.cdiv(rows, c), features // _COLS)
  whole = lambda *block: pl.BlockSpec(block, lambda i, j: (0,) * (len(block) - 1) + (j,))
  dh, sums = pl.pallas_call(
      functools.partial(_kernel, rows=rows, chunk=c),
      grid=grid,
      in_specs=[whole(rows, 2, _COLS),
                pl.BlockSpec((None, _COLS), lambda i, j: (0, j)),   # the hidden half's bias
                pl.BlockSpec((None, _COLS), lambda i, j: (1, j)),   # the gate's
                whole(rows, _COLS)],
      out_specs=[whole(rows, 2, _COLS),
                 pl.BlockSpec((None, 2, _COLS), lambda i, j: (i, 0, j))],
      out_shape=[jax.ShapeDtypeStruct((rows, 2, features), y.dtype),
                 jax.ShapeDtypeStruct((grid[0], 2, features), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret, name="geglu_bwd",
  )(y.reshape(rows, 2, features), bias.reshape(2, features), bias.reshape(2, features),
    dy.reshape(rows, features))
  return dh.reshape(y.shape), sums.reshape(grid[0], 2 * features)
