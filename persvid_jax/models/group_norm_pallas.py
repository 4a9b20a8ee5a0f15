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

With a dropout rate (the temporal convolutions' ``Dropout(0.1)`` after the
GroupNorm and SiLU) both kernels apply it too: an element is kept where a hash
of its sample's seed and its index in the sample says so (``dropout_keep``, the
same function on XLA's path), so the gradient recomputes the mask instead of
reading one, and no kernel of its own writes and reads the activation for it
(4 passes over it a layer, 5.8 GB of the ModelScope train step).

Pallas's Triton backend is deprecated from jax 0.11 (it warns once per
compile); where a later jax drops it, ``available()`` says so and the
GroupNorm's ``'auto'`` runs XLA's.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

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


def _mix(h: jax.Array) -> jax.Array:
  """A 32-bit integer hash (``lowbias32``: two multiply-xorshift rounds) of uint32 ``h``."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * jnp.uint32(0x846CA68B)
  return h ^ (h >> 16)


def dropout_keep(seed: jax.Array, index: jax.Array, rate: float) -> jax.Array:
  """Whether dropout at ``rate`` keeps the element ``index`` (int32, its place in
  its sample) of the sample whose seed is ``seed`` (uint32, broadcastable):
  ``P(keep) = 1 - rate`` to 2^-31. Pure integer arithmetic, so XLA's path and
  the Triton kernels (where it runs per tile) draw the same mask."""
  h = _mix(seed ^ _mix(index.astype(jnp.uint32)))
  return (h >> 1).astype(jnp.int32) >= jnp.int32(round(rate * 2.0 ** 31))


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


class _Layout(NamedTuple):
  """How a ``[*batch, *reduced, C]`` input is viewed and cut: ``[samples, length,
  groups, width]``, a grid of ``(samples, groups / gb)`` programs, tiles of
  ``rows`` rows."""
  batch: tuple[int, ...]
  samples: int
  length: int
  groups: int
  width: int
  gb: int
  rows: int

  @classmethod
  def of(cls, x: jax.Array, groups: int, batch_dims: int) -> "_Layout":
    batch = x.shape[:batch_dims]
    samples, length = math.prod(batch), math.prod(x.shape[batch_dims:-1])
    width = x.shape[-1] // groups
    return cls(batch, samples, length, groups, width, *tiles(samples, length, groups, width))

  def view(self, a: jax.Array) -> jax.Array:
    return a.reshape(self.samples, self.length, self.groups, self.width)

  def call(self, kernel, inputs, in_specs, out_specs, out_shape, name: str, interpret: bool):
    """``pl.pallas_call`` over this layout's grid; specs by name: ``'slab'``
    (``[L, gb, C/G]`` of a sample), ``'per_group'`` (``[gb]``), ``'params'``
    (``[gb, C/G]``, shared by the samples), ``'per_channel'`` (``[gb, C/G]`` of a
    sample)."""
    gb, width = self.gb, self.width
    specs = dict(slab=pl.BlockSpec((None, self.length, gb, width), lambda n, g: (n, 0, g, 0)),
                 per_group=pl.BlockSpec((None, gb), lambda n, g: (n, g)),
                 params=pl.BlockSpec((gb, width), lambda n, g: (g, 0)),
                 per_channel=pl.BlockSpec((None, gb, width), lambda n, g: (n, g, 0)))
    return pl.pallas_call(
        functools.partial(kernel, length=self.length, rows=self.rows),
        grid=(self.samples, self.groups // gb),
        in_specs=[specs[k] for k in in_specs], out_specs=[specs[k] for k in out_specs],
        out_shape=out_shape, compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name=name)(*inputs)


class _Slab(NamedTuple):
  """In a program: the masks and the scale and bias of its ``gb`` groups, each
  group's channels padded to ``padded`` (a power of 2)."""
  padded: int
  in_group: jax.Array      # [P]
  params_mask: jax.Array   # [gb, P]
  scale: jax.Array         # [1, gb, P] float32
  bias: jax.Array          # [1, gb, P] float32

  @classmethod
  def of(cls, scale_ref, bias_ref) -> "_Slab":
    gb, width = scale_ref.shape
    padded = pl.next_power_of_2(width)
    in_group = jnp.arange(padded) < width
    params_mask = jnp.broadcast_to(in_group[None, :], (gb, padded))
    load = lambda ref: plgpu.load(ref.at[:, pl.ds(0, padded)], mask=params_mask,
                                  other=0.0).astype(jnp.float32)[None]
    return cls(padded, in_group, params_mask, load(scale_ref), load(bias_ref))

  def window(self, i, rows: int, length: int):
    """Rows ``[i * rows, (i + 1) * rows)``: the index of a tile and its mask."""
    mask = ((i * rows + jnp.arange(rows)) < length)[:, None, None] & self.in_group[None, None]
    return (pl.ds(i * rows, rows), slice(None), pl.ds(0, self.padded)), mask


def _dropped(v, i, rows: int, seed_ref, first_channel, padded: int, channels: int,
             rate: float):
  """Tile ``i``'s values ``v [rows, gb, P]`` after dropout (``dropout_keep`` of the
  sample's seed ``seed_ref [gb]`` and each element's index in its sample, ``l *
  channels + c``), for a program's ``[gb, P]`` channels from ``first_channel``
  (``[gb, 1]``: its groups' first); both kernels draw the same mask so."""
  row = (i * rows + jnp.arange(rows))[:, None, None]
  element = row * channels + first_channel[None] + jnp.arange(padded)[None, None, :]
  keep = dropout_keep(seed_ref[...][None, :, None], element, rate)
  return jnp.where(keep, v * (1.0 / (1.0 - rate)), 0.0)


def _first_channels(scale_ref):
  """``[gb, 1]`` int32: the first channel of each of the program's groups (at
  the kernel's top level: the interpreter has no program id inside a loop)."""
  gb, width = scale_ref.shape
  return ((pl.program_id(1) * gb + jnp.arange(gb)) * width)[:, None]


def _kernel(x_ref, scale_ref, bias_ref, *refs, length: int, rows: int, epsilon: float,
            silu: bool, rate: float, channels: int):
  """One program: ``x_ref, y_ref [L, gb, C/G]``, ``scale_ref, bias_ref [gb, C/G]``,
  (with dropout: ``seed_ref [gb]``, its sample's seed) ``mean_ref, rstd_ref [gb]``."""
  f32 = jnp.float32
  seed_ref, (y_ref, mean_ref, rstd_ref) = (refs[0], refs[1:]) if rate else (None, refs)
  slab = _Slab.of(scale_ref, bias_ref)
  first = _first_channels(scale_ref) if rate else None

  def load(i):
    index, mask = slab.window(i, rows, length)
    return plgpu.load(x_ref.at[index], mask=mask, other=0.0).astype(f32), index, mask

  def sums(i, carry):
    x = load(i)[0]                                                        # [rows, gb, P]
    return carry[0] + x.sum(0), carry[1] + (x * x).sum(0)

  zero = jnp.zeros(slab.params_mask.shape, f32)
  steps = pl.cdiv(length, rows)
  s, ss = jax.lax.fori_loop(0, steps, sums, (zero, zero))
  count = length * x_ref.shape[-1]
  mean = s.sum(-1) / count                                                # [gb]
  rstd = jax.lax.rsqrt(jnp.maximum(ss.sum(-1) / count - mean * mean, 0.0) + epsilon)

  def normalise(i, _):
    x, index, mask = load(i)
    z = (x - mean[None, :, None]) * rstd[None, :, None] * slab.scale + slab.bias
    if silu:
      z = z * jax.nn.sigmoid(z)
    if rate:
      z = _dropped(z, i, rows, seed_ref, first, slab.padded, channels, rate)
    plgpu.store(y_ref.at[index], z.astype(y_ref.dtype), mask=mask)
    return 0

  jax.lax.fori_loop(0, steps, normalise, 0)
  mean_ref[...] = mean
  rstd_ref[...] = rstd


def group_norm_silu_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                        epsilon: float, batch_dims: int, silu: bool, dtype: Any, *,
                        seeds: jax.Array | None = None, rate: float = 0.0,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """GroupNorm (+ SiLU) of ``x [*batch, *reduced, C]`` in one kernel.

  Args:
    x: any float dtype; the first ``batch_dims`` axes are samples, statistics
      run over the others and each group's ``C // groups`` channels.
    scale, bias: ``[C]``.
    groups, epsilon, silu: as ``attention.group_norm_silu``.
    dtype: the output's dtype.
    seeds, rate: dropout after the (SiLU) output at ``rate`` when ``rate > 0``,
      each sample's mask from its seed (``seeds [*batch]`` uint32; ``dropout_keep``).
    interpret: run Pallas's interpreter (any backend; for tests on a CPU).

  Returns:
    ``y`` (``x``'s shape, ``dtype``), ``mean`` and ``rstd`` (``[*batch, G]``
    float32), what ``attention._group_norm_fwd`` returns.
  """
  layout = _Layout.of(x, groups, batch_dims)
  stats = jax.ShapeDtypeStruct((layout.samples, groups), jnp.float32)
  extra, extra_specs = _dropout_inputs(layout, seeds, rate)
  y, mean, rstd = layout.call(
      functools.partial(_kernel, epsilon=epsilon, silu=silu, rate=rate,
                        channels=x.shape[-1]),
      (layout.view(x), scale.reshape(groups, -1), bias.reshape(groups, -1), *extra),
      ("slab", "params", "params", *extra_specs), ("slab", "per_group", "per_group"),
      [jax.ShapeDtypeStruct(layout.view(x).shape, jnp.dtype(dtype)), stats, stats],
      "group_norm_silu", interpret)
  batch = layout.batch
  return y.reshape(x.shape), mean.reshape(batch + (groups,)), rstd.reshape(batch + (groups,))


def _dropout_inputs(layout: _Layout, seeds: jax.Array | None, rate: float):
  """The kernels' extra input and its spec with dropout: each sample's seed on
  its groups (``[samples, G]``, read as the group statistics are)."""
  if not rate:
    return (), ()
  if seeds is None or not 0.0 < rate < 1.0:
    raise ValueError(f"GroupNorm dropout: rate {rate} needs 0 < rate < 1 and the seeds")
  seeds = jnp.broadcast_to(seeds.reshape(layout.samples, 1), (layout.samples, layout.groups))
  return (seeds.astype(jnp.uint32),), ("per_group",)


def _bwd_kernel(x_ref, dy_ref, mean_ref, rstd_ref, scale_ref, bias_ref, *refs, length: int,
                rows: int, silu: bool, rate: float, channels: int):
  """One program of the gradient: ``x_ref, dy_ref, dx_ref [L, gb, C/G]``,
  ``mean_ref, rstd_ref [gb]``, ``scale_ref, bias_ref [gb, C/G]``, (with dropout:
  ``seed_ref [gb]``), and the per-channel sums of ``dz`` and ``dz * x_hat`` over
  the slab, ``[gb, C/G]``."""
  f32 = jnp.float32
  seed_ref, (dx_ref, sum_dz_ref, sum_dz_xhat_ref) = (
      (refs[0], refs[1:]) if rate else (None, refs))
  slab = _Slab.of(scale_ref, bias_ref)
  first = _first_channels(scale_ref) if rate else None
  mean = mean_ref[...][None, :, None]
  rstd = rstd_ref[...][None, :, None]

  def load(i):
    """``(dz, x_hat, index, mask)`` of tile ``i``; ``dz`` is 0 where masked."""
    index, mask = slab.window(i, rows, length)
    x = plgpu.load(x_ref.at[index], mask=mask, other=0.0).astype(f32)
    dz = plgpu.load(dy_ref.at[index], mask=mask, other=0.0).astype(f32)
    if rate:   # the forward's mask, drawn again: the gradient at the SiLU's output
      dz = _dropped(dz, i, rows, seed_ref, first, slab.padded, channels, rate)
    x_hat = (x - mean) * rstd      # where masked, dz is 0: no term of either sum
    if silu:
      z = x_hat * slab.scale + slab.bias
      sig = jax.nn.sigmoid(z)
      dz = dz * sig * (1.0 + z * (1.0 - sig))
    return dz, x_hat, index, mask

  def sums(i, carry):
    dz, x_hat = load(i)[:2]
    return carry[0] + dz.sum(0), carry[1] + (dz * x_hat).sum(0)

  zero = jnp.zeros(slab.params_mask.shape, f32)
  steps = pl.cdiv(length, rows)
  sum_dz, sum_dz_xhat = jax.lax.fori_loop(0, steps, sums, (zero, zero))
  count = length * x_ref.shape[-1]
  mean_g = ((sum_dz * slab.scale[0]).sum(-1) / count)[None, :, None]
  mean_gx = ((sum_dz_xhat * slab.scale[0]).sum(-1) / count)[None, :, None]

  def dx(i, _):
    dz, x_hat, index, mask = load(i)
    out = rstd * (dz * slab.scale - mean_g - x_hat * mean_gx)
    plgpu.store(dx_ref.at[index], out.astype(dx_ref.dtype), mask=mask)
    return 0

  jax.lax.fori_loop(0, steps, dx, 0)
  window = (slice(None), pl.ds(0, slab.padded))
  plgpu.store(sum_dz_ref.at[window], sum_dz, mask=slab.params_mask)
  plgpu.store(sum_dz_xhat_ref.at[window], sum_dz_xhat, mask=slab.params_mask)


def group_norm_silu_bwd(x: jax.Array, dy: jax.Array, mean: jax.Array, rstd: jax.Array,
                        scale: jax.Array, bias: jax.Array, groups: int, batch_dims: int,
                        silu: bool, *, seeds: jax.Array | None = None, rate: float = 0.0,
                        interpret: bool = False
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The gradient of ``group_norm_silu_fwd`` at ``x`` for the output gradient
  ``dy`` (``x``'s shape), from its ``mean``, ``rstd`` (``[*batch, G]``), in one
  kernel; ``seeds``, ``rate``: the forward's dropout.

  Returns:
    ``dx`` (``x``'s shape and dtype) and the per-sample, per-channel sums of
    ``dz`` and ``dz * x_hat`` (``[*batch, C]`` float32; ``dz`` the gradient at the
    SiLU's input): summed over the samples they are the bias and scale gradients.
  """
  layout = _Layout.of(x, groups, batch_dims)
  sums = jax.ShapeDtypeStruct((layout.samples, groups, layout.width), jnp.float32)
  extra, extra_specs = _dropout_inputs(layout, seeds, rate)
  dx, sum_dz, sum_dz_xhat = layout.call(
      functools.partial(_bwd_kernel, silu=silu, rate=rate, channels=x.shape[-1]),
      (layout.view(x), layout.view(dy), mean.reshape(layout.samples, groups),
       rstd.reshape(layout.samples, groups), scale.reshape(groups, -1),
       bias.reshape(groups, -1), *extra),
      ("slab", "slab", "per_group", "per_group", "params", "params", *extra_specs),
      ("slab", "per_channel", "per_channel"),
      [jax.ShapeDtypeStruct(layout.view(x).shape, x.dtype), sums, sums],
      "group_norm_silu_bwd", interpret)
  channels = layout.batch + (x.shape[-1],)
  return dx.reshape(x.shape), sum_dz.reshape(channels), sum_dz_xhat.reshape(channels)
