"""Attention, normalisation and projection primitives shared by every network.

All attention goes through ``jax.nn.dot_product_attention`` so that the GPU
can pick cuDNN's fused kernel (``implementation='cudnn'``) without any model
change. ``'auto'`` (the configs' default) picks it where it applies: a CUDA GPU
whose cuDNN jax can use, bf16/fp16 inputs, a head width that is a multiple of 8
and at most 128, no boolean mask and an even query length. An odd key length
(the 77 text tokens) is padded to an even one and the pad hidden by cuDNN's
padding mask. Everywhere else (CPU, TPU, float32, masked calls) XLA's attention
runs; jax's own default (``None``) is XLA even on a GPU, which measured 79
TFLOP/s against cuDNN's 421 on an H200. Logits and softmax run in float32
whatever the compute dtype (both paths do this for bf16 inputs), and norms are
computed in float32 too, since bf16 statistics lose small values."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from persvid_jax import config_lib
from persvid_jax import sharding as sh
from persvid_jax.models import group_norm_pallas, layer_norm_pallas

Dtype = Any


def dtype_of(name: str | Dtype) -> Dtype:
  """``'bfloat16'`` -> ``jnp.bfloat16`` (configs store dtypes as strings)."""
  return jnp.dtype(name) if isinstance(name, str) else name


def linear(features: int, axes: tuple[str, str], *, name: str, use_bias: bool = True,
           dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
           kernel_init=nn.initializers.lecun_normal(),
           bias_axis: str | None = None) -> nn.Dense:
  """An ``nn.Dense`` whose kernel ``[in, out]`` carries logical axis names."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                             (bias_axis or axes[1],)),
      name=name)


def layer_norm(*, name: str, epsilon: float = 1e-5, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> "LayerNorm":
  """LayerNorm computed in float32 (``dtype`` is only the output dtype)."""
  del dtype  # statistics always in float32, see module docstring
  return LayerNorm(epsilon=epsilon, param_dtype=param_dtype, name=name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_f32(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                   dtype: Any = jnp.float32) -> jax.Array:
  """LayerNorm over the last axis of ``x [..., C]`` in float32, cast to ``dtype``;
  ``scale``, ``bias``: ``[C]``.

  The forward is flax's ``nn.LayerNorm(use_fast_variance=False)`` op for op: the
  two-pass variance ``E[(x - E[x])^2]``, which XLA turns into one Triton kernel on
  a GPU (statistics and normalisation in one pass over ``x``; the fast form
  ``E[x^2] - E[x]^2`` costs three, and cancels when ``|mean| >> std``).

  Its gradient is written out (``jax.custom_vjp``): the scale and bias gradients
  in one column reduction of ``(dy, dy * x_hat)``, ``dx`` in one row kernel, each
  reading ``x`` and ``dy`` (``x_hat`` recomputed in both, from behind a barrier:
  shared, XLA writes it in float32 and reads it back twice). The row statistics
  the gradient needs are saved from one pass over ``x`` that sums ``d = x - x[0]``
  and ``d^2`` (shifted by the row's first element: no cancellation unless that
  element is an outlier of many standard deviations). Autodiff of the forward
  writes a float32 ``dy * x_hat`` and reads it back (for an H200, a transformer
  block's three LayerNorms and their gradients move ~40 % fewer bytes).
  """
  return _layer_norm_fwd(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, dtype):
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, -1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
  y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale.astype(jnp.float32)) + bias.astype(
      jnp.float32)
  # The statistics for the gradient, in one reduction (a forward without
  # gradient drops them).
  first = xf[..., :1]
  d = xf - first
  zero = jnp.zeros((), jnp.float32)
  s1, s2 = jax.lax.reduce((d, d * d), (zero, zero), lambda p, q: (p[0] + q[0], p[1] + q[1]),
                          (x.ndim - 1,))
  mean_d, n = s1[..., None] / x.shape[-1], x.shape[-1]
  rstd = jax.lax.rsqrt(jnp.maximum(s2[..., None] / n - mean_d * mean_d, 0.0) + epsilon)
  return y.astype(dtype), (x, scale, bias, first + mean_d, rstd)


def _layer_norm_bwd(epsilon, dtype, res, dy):
  del epsilon, dtype
  x, scale, bias, mean, rstd = res
  zero = jnp.zeros((), jnp.float32)
  dyf = dy.astype(jnp.float32)
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  dbias, dscale = jax.lax.reduce((dyf, dyf * x_hat), (zero, zero),
                                 lambda p, q: (p[0] + q[0], p[1] + q[1]),
                                 tuple(range(x.ndim - 1)))
  x, dy = jax.lax.optimization_barrier((x, dy))
  x_hat = (x.astype(jnp.float32) - mean) * rstd
  g = dy.astype(jnp.float32) * scale.astype(jnp.float32)
  dx = rstd * (g - jnp.mean(g, -1, keepdims=True)
               - x_hat * jnp.mean(g * x_hat, -1, keepdims=True))
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm_f32.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _norm_params(module: nn.Module, channels: int) -> tuple[jax.Array, jax.Array]:
  """A norm's ``scale`` (ones) and ``bias`` (zeros), ``[C]`` in the module's
  ``param_dtype`` on the ``NORM`` logical axis (nn.LayerNorm's / nn.GroupNorm's)."""
  return tuple(module.param(name, nn.with_logical_partitioning(init, (sh.NORM,)), (channels,),
                            module.param_dtype)
               for name, init in (("scale", nn.initializers.ones_init()),
                                  ("bias", nn.initializers.zeros_init())))


class LayerNorm(nn.Module):
  """``nn.LayerNorm`` (two-pass variance, in float32) with a written-out gradient.

  ``x [..., C] -> [..., C]`` in ``dtype``, normalised over ``C``; the same
  parameters (``scale``, ``bias``: ``[C]``) and forward as ``nn.LayerNorm(
  dtype=float32, use_fast_variance=False)`` then a cast; ``layer_norm_f32`` says
  why. (The cast inside: the gradient then arrives in ``dtype``, not as a
  float32 copy.)
  """
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32          # output dtype
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale, bias = _norm_params(self, c)
    return layer_norm_f32(x, scale, bias, float(self.epsilon), jnp.dtype(self.dtype))


def add_layer_norm(x: jax.Array | None, r: jax.Array, r_bias: jax.Array | None,
                   scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Any,
                   kernel: str = "xla") -> tuple[jax.Array, jax.Array]:
  """A pre-LN block's residual add and LayerNorm: ``(s, y)``, ``s = x + (r +
  r_bias)`` (``r + r_bias`` and the sum in ``r``'s dtype, as a projection with its
  bias and the add give them; without ``x`` or ``r_bias`` those terms drop out),
  ``y = layer_norm_f32(s)`` in ``dtype``.

  ``kernel``: ``'xla'`` (exactly those ops), ``'pallas'``
  (``layer_norm_pallas``: one Triton kernel each way when differentiated; the
  gradient also sums ``r_bias``'s, which XLA reads ``ds`` back for; XLA's ops
  when not) or ``'interpret'`` (those kernels in Pallas's interpreter, for tests
  on a CPU).
  """
  if kernel == "xla":
    s = r if r_bias is None else r + r_bias.astype(r.dtype)
    s = s if x is None else x + s
    return s, layer_norm_f32(s, scale, bias, epsilon, dtype)
  return _add_layer_norm_kernel(x, r, r_bias, scale, bias, epsilon, jnp.dtype(dtype),
                                kernel == "interpret")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _add_layer_norm_kernel(x, r, r_bias, scale, bias, epsilon, dtype, interpret):
  # Not differentiated (sampling): XLA's ops, which fuse the add into the next
  # GEMM's operand loads and write no stream; the forward kernel writes it, which
  # pays only where the gradient needs the statistics pass XLA adds (denoise256:
  # 12.5 GB with XLA's, 14.1 GB with the kernel's).
  del interpret
  return add_layer_norm(x, r, r_bias, scale, bias, epsilon, dtype, "xla")


def _add_layer_norm_fwd(x, r, r_bias, scale, bias, epsilon, dtype, interpret):
  has_x, has_bias = x is not None, r_bias is not None
  shared = ((r_bias,) if has_bias else ()) + (scale, bias)

  def fn(r, *rest):
    x = rest[0] if has_x else None
    rest = rest[1:] if has_x else rest
    b = rest[0] if has_bias else None
    y, s = layer_norm_pallas.add_layer_norm_fwd(r, b, x, *rest[-2:], epsilon, dtype,
                                                interpret=interpret)
    return (y,) if s is None else (y, s)
  outs = per_batch_shard(fn, (r, x) if has_x else (r,), shared)
  y, s = outs[0], (outs[1] if len(outs) > 1 else r)
  # Residuals are arrays: whether x was given rides on an empty one.
  return (s, y), (s, scale, r_bias, jnp.zeros((0,)) if has_x else None)


def _add_layer_norm_bwd(epsilon, dtype, interpret, res, cts):
  del dtype
  s, scale, r_bias, x_given = res
  g, dy = cts
  ds, sums = per_batch_shard(
      lambda s, dy, g, scale: layer_norm_pallas.add_layer_norm_bwd(
          s, dy, g, scale, epsilon, interpret=interpret), (s, dy, g), (scale,))
  dbias, dscale, dr_bias = jnp.sum(sums, 0)
  return (None if x_given is None else ds, ds,
          None if r_bias is None else dr_bias.astype(r_bias.dtype),
          dscale.astype(scale.dtype), dbias.astype(scale.dtype))


_add_layer_norm_kernel.defvjp(_add_layer_norm_fwd, _add_layer_norm_bwd)


class AddLayerNorm(nn.Module):
  """``LayerNorm`` (same parameters) applied after a pre-LN block's residual add:
  ``__call__(r, r_bias=None, x=None) -> (s, y)``, ``add_layer_norm``'s.

  ``implementation``: as ``GroupNorm``'s (``'auto'``: the Triton kernels of
  ``layer_norm_pallas`` where the GroupNorm's run, XLA's elsewhere).
  """
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32          # y's dtype
  param_dtype: Dtype = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, r: jax.Array, r_bias: jax.Array | None = None,
               x: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    c = r.shape[-1]
    scale, bias = _norm_params(self, c)
    return add_layer_norm(x, r, r_bias, scale, bias, float(self.epsilon), jnp.dtype(self.dtype),
                          resolve_group_norm(self.implementation))


def group_norm(num_groups: int, *, name: str, epsilon: float = 1e-5,
               param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """GroupNorm computed in float32 (torch's ``nn.GroupNorm`` semantics)."""
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32,
      param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (sh.NORM,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (sh.NORM,)),
      name=name)


def _partial_sums(a: jax.Array, b: jax.Array, axes: tuple[int, ...], *, variadic: bool
                  ) -> tuple[jax.Array, jax.Array]:
  """``a, b [*batch, *reduced, C]`` each summed over the two innermost of the
  reduced ``axes`` (``[H, W]``): two ``[*batch, *outer, C]`` from one pass over the
  activations.

  A whole video's ``[T, H, W]`` summed at once is one long column, which XLA
  splits into two stages with a kernel per sum; here the frames ``T`` are left to
  the small group kernel, and the barrier keeps XLA from merging the two back.
  ``variadic``: one reduction of the pair (what XLA fuses into one kernel when
  ``a`` and ``b`` share an expensive producer, as in the gradient); else two
  sibling sums (which XLA fuses when they do not, and then also fuses the group
  statistics that follow).
  """
  inner = tuple(axes[-2:])
  if variadic:
    zero = jnp.zeros((), a.dtype)
    sums = jax.lax.reduce((a, b), (zero, zero), lambda p, q: (p[0] + q[0], p[1] + q[1]),
                          inner)
  else:
    sums = jnp.sum(a, inner), jnp.sum(b, inner)
  return jax.lax.optimization_barrier(sums) if len(axes) > 2 else sums


def _group_means(a: jax.Array, b: jax.Array, batch_dims: int, groups: int, count: int
                 ) -> tuple[jax.Array, jax.Array]:
  """Two ``[*batch, *outer, C]`` partial sums -> two ``[*batch, G]`` means over each
  group's ``count`` elements.

  The pair is reduced together where XLA would give each sum kernels of its
  own: over a whole video (``outer = [T]``: two kernels each, the group's
  channels then the frames) and per frame from 32 channels a group (a
  reduction kernel each). For an H200, a video GroupNorm forward 5 -> 4
  kernels (11 -> 8 with its gradient), a per-frame one at 1280 channels 5 -> 4
  (9 -> 8). Per frame with fewer channels a group, two sibling sums fuse with
  the statistics that follow into one kernel, which the pair would not.
  """
  a = a.reshape(a.shape[:-1] + (groups, -1))
  b = b.reshape(b.shape[:-1] + (groups, -1))
  axes = tuple(range(batch_dims, a.ndim - 2)) + (a.ndim - 1,)
  if len(axes) == 1 and a.shape[-1] < 32:
    # Per frame, under a warp's width of channels a group: XLA sums such short
    # rows in a loop, and two sibling sums fuse with the statistics that follow.
    return a.sum(axes) / count, b.sum(axes) / count
  zero = jnp.zeros((), a.dtype)
  sa, sb = jax.lax.reduce((a, b), (zero, zero), lambda p, q: (p[0] + q[0], p[1] + q[1]), axes)
  return sa / count, sb / count


def _per_channel(v: jax.Array, channels: int, ndim: int) -> jax.Array:
  """``[*batch, G] -> [*batch, 1, ..., 1, C]`` (each group's value on its channels),
  broadcastable against a rank-``ndim`` input."""
  v = jnp.repeat(v, channels // v.shape[-1], axis=-1)
  return v.reshape(v.shape[:-1] + (1,) * (ndim - v.ndim) + (channels,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8, 9))
def group_norm_silu(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                    epsilon: float, batch_dims: int, silu: bool, dtype: Any,
                    kernel: str = "xla", rate: float = 0.0,
                    seeds: jax.Array | None = None) -> jax.Array:
  """GroupNorm (+ SiLU) of ``x [*batch, *reduced, C]`` in float32, cast to ``dtype``.

  The first ``batch_dims`` axes are samples; statistics run over the other axes
  and the ``C // groups`` channels of each group (torch's ``nn.GroupNorm`` on a
  channels-first tensor). ``scale``, ``bias``: ``[C]``. Variance as flax computes
  it, ``E[x^2] - E[x]^2`` (clamped at 0), with ``epsilon`` inside the rsqrt.

  Its gradient is written out (``jax.custom_vjp``) so that XLA gets one reduction
  pass over ``(x, dy)`` (the per-channel sums of ``dz`` and ``dz * x_hat``, which
  give the scale and bias gradients and both group means of ``dx``), a tiny
  group kernel and one elementwise pass for ``dx``, the SiLU's derivative
  recomputed inside. Autodiff of the forward gives XLA a float32 copy of the
  normalised activations and two more reduction stages.

  ``kernel``: ``'xla'`` (the above: three or four kernels each way on a GPU),
  ``'pallas'`` (``group_norm_pallas``: one Triton kernel forward, one for the
  gradient plus a small reduction for the scale and bias gradients; CUDA GPUs)
  or ``'interpret'`` (those kernels in Pallas's interpreter, for tests on a CPU).

  ``rate > 0``: dropout of the output at that rate, sample ``n``'s mask drawn
  from ``seeds[n]`` (``[*batch]`` uint32) by ``group_norm_pallas.dropout_keep``,
  the same on both paths; the gradient draws it again (nothing stored). In the
  Triton kernels it costs no pass over the activation of its own.
  """
  return _group_norm_fwd(x, scale, bias, groups, epsilon, batch_dims, silu, dtype, kernel,
                         rate, seeds)[0]


def _dropout(v: jax.Array, seeds: jax.Array, rate: float, batch_dims: int) -> jax.Array:
  """XLA's path of the GroupNorm's dropout: ``v [*batch, ...]`` float32 masked by
  ``dropout_keep`` of each sample's seed and each element's index in its sample,
  scaled by ``1 / (1 - rate)``."""
  inner = v.shape[batch_dims:]
  index = jnp.arange(math.prod(inner), dtype=jnp.int32).reshape(inner)
  seed = seeds.astype(jnp.uint32).reshape(seeds.shape + (1,) * len(inner))
  keep = group_norm_pallas.dropout_keep(seed, index, rate)
  return jnp.where(keep, v * (1.0 / (1.0 - rate)), 0.0)


def _group_norm_fwd(x, scale, bias, groups, epsilon, batch_dims, silu, dtype, kernel="xla",
                    rate=0.0, seeds=None):
  if rate and (seeds is None or seeds.shape != x.shape[:batch_dims]):
    raise ValueError(f"GroupNorm dropout: seeds of shape {x.shape[:batch_dims]} needed, "
                     f"got {None if seeds is None else seeds.shape}")
  if kernel != "xla":
    batched = (x, seeds) if rate else (x,)
    y, mean, rstd = per_batch_shard(
        lambda x, *rest: group_norm_pallas.group_norm_silu_fwd(
            x, *rest[len(batched) - 1:], groups=groups, epsilon=epsilon,
            batch_dims=batch_dims, silu=silu, dtype=dtype, rate=rate,
            seeds=rest[0] if rate else None, interpret=kernel == "interpret"),
        batched, (scale, bias))
    return y, (x, scale, bias, mean, rstd, seeds)
  xf = x.astype(jnp.float32)
  c = x.shape[-1]
  axes = tuple(range(batch_dims, x.ndim - 1))
  count = math.prod(x.shape[a] for a in axes) * (c // groups)
  sums, squares = _partial_sums(xf, xf * xf, axes, variadic=False)
  mean, mean_sq = _group_means(sums, squares, batch_dims, groups, count)     # [*batch, G]
  rstd = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + epsilon)
  # (x - mean) * rstd, not x * rstd - mean * rstd: no cancellation when |mean| >> std.
  z = ((xf - _per_channel(mean, c, x.ndim)) * _per_channel(rstd, c, x.ndim)
       * scale.astype(jnp.float32) + bias.astype(jnp.float32))
  y = jax.nn.silu(z) if silu else z
  if rate:
    y = _dropout(y, seeds, rate, batch_dims)
  return y.astype(dtype), (x, scale, bias, mean, rstd, seeds)


def per_batch_shard(fn, batched: tuple, shared: tuple):
  """``fn(*batched, *shared)``, whose ``batched`` arguments and results are all
  ``[B, ...]`` (``shared``: replicated, as a norm's scale and bias), run on each
  device's shard of the batch under a mesh of several devices (the Triton
  kernels: the GroupNorms, ``add_layer_norm``, ``video_transformer.geglu``'s
  gradient).

  XLA's partitioner cannot split a kernel's custom call; the norm's samples are
  independent, so ``shard_map`` over the mesh axes the batch is laid out on
  (``sharding.BATCH`` under the active logical rules; the whole call on every
  device where there are none) gives each device its own samples.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(*batched, *shared)
  batch = nn.logical_to_mesh_axes((sh.BATCH,))
  spec = jax.sharding.PartitionSpec(batch[0] if batch is not None else None)
  replicated = jax.sharding.PartitionSpec()
  return jax.shard_map(fn, in_specs=(spec,) * len(batched) + (replicated,) * len(shared),
                       out_specs=spec, check_vma=False)(*batched, *shared)


def _group_norm_bwd(groups, epsilon, batch_dims, silu, dtype, kernel, rate, res, dy):
  del epsilon, dtype
  x, scale, bias, mean, rstd, seeds = res
  # Integer seeds have no gradient (jax's float0 zeros).
  dseeds = None if seeds is None else np.zeros(seeds.shape, jax.dtypes.float0)
  zero = jnp.zeros((), jnp.float32)
  if kernel != "xla":
    batched = (x, dy, mean, rstd) + ((seeds,) if rate else ())
    dx, sum_dz, sum_dz_xhat = per_batch_shard(
        lambda x, dy, mean, rstd, *rest: group_norm_pallas.group_norm_silu_bwd(
            x, dy, mean, rstd, *rest[-2:], groups=groups, batch_dims=batch_dims, silu=silu,
            rate=rate, seeds=rest[0] if rate else None, interpret=kernel == "interpret"),
        batched, (scale, bias))
    dbias, dscale = jax.lax.reduce((sum_dz, sum_dz_xhat), (zero, zero),
                                   lambda p, q: (p[0] + q[0], p[1] + q[1]),
                                   tuple(range(batch_dims)))
    return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype), dseeds
  c = x.shape[-1]
  axes = tuple(range(batch_dims, x.ndim - 1))
  count = math.prod(x.shape[a] for a in axes) * (c // groups)
  scale_f = scale.astype(jnp.float32)

  def dz_and_x_hat(x, dy, mean, rstd):
    """The gradient at the SiLU's input ``dz`` and ``x_hat``, from ``x`` and ``dy``."""
    x_hat = ((x.astype(jnp.float32) - _per_channel(mean, c, x.ndim))
             * _per_channel(rstd, c, x.ndim))
    dz = dy.astype(jnp.float32)
    if rate:   # the forward's mask, drawn again
      dz = _dropout(dz, seeds, rate, batch_dims)
    if silu:
      z = x_hat * scale_f + bias.astype(jnp.float32)
      s = jax.nn.sigmoid(z)
      dz = dz * s * (1.0 + z * (1.0 - s))
    return dz, x_hat

  dz, x_hat = dz_and_x_hat(x, dy, mean, rstd)
  sum_dz, sum_dz_xhat = _partial_sums(dz, dz * x_hat, axes,   # [*batch, *outer, C]
                                      variadic=True)
  dbias, dscale = jax.lax.reduce((sum_dz, sum_dz_xhat), (zero, zero),    # one kernel
                                 lambda p, q: (p[0] + q[0], p[1] + q[1]),
                                 tuple(range(sum_dz.ndim - 1)))
  dbias, dscale = dbias.astype(bias.dtype), dscale.astype(scale.dtype)
  # dx = rstd * (g - mean_group(g) - x_hat * mean_group(g * x_hat)), g = dz * scale.
  mean_g, mean_gx = _group_means(sum_dz * scale_f, sum_dz_xhat * scale_f, batch_dims, groups,
                                 count)
  mean_g, mean_gx = _per_channel(mean_g, c, x.ndim), _per_channel(mean_gx, c, x.ndim)
  # dz again, from the bf16 inputs behind a barrier: XLA would otherwise write
  # the float32 dz once (its sigmoid is too dear to repeat) and read it twice;
  # recomputed, the sums and dx each read x and dy (twice the bytes less).
  dz, x_hat = dz_and_x_hat(*jax.lax.optimization_barrier((x, dy, mean, rstd)))
  dx = _per_channel(rstd, c, x.ndim) * (dz * scale_f - mean_g - x_hat * mean_gx)
  return dx.astype(x.dtype), dscale, dbias, dseeds


group_norm_silu.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """GroupNorm (torch's ``nn.GroupNorm`` semantics) in float32, with an optional SiLU.

  ``x [*batch, *reduced, C] -> same shape`` in ``dtype``: the first
  ``batch_dims`` axes are independent samples; statistics run over all the other
  axes and the ``C // num_groups`` channels of each group. ``batch_dims=2`` on a
  video ``[B, T, H, W, C]`` normalises each frame; ``batch_dims=1`` the whole video.

  Same parameters (``scale``, ``bias``) and values as ``nn.GroupNorm`` (within
  float32 rounding), computed by ``group_norm_silu`` in the order XLA fuses into
  three kernels on a GPU (per-channel sums of ``x`` and ``x^2`` in one pass, the
  group statistics on ``[*batch, G]``, one elementwise pass that normalises,
  applies SiLU and casts) and three or four for the gradient. ``nn.GroupNorm``
  reduces over a ``[.., G, C/G]`` view whose reduced axes are not contiguous, and
  costs four to six kernels forward and about seven backward.

  ``implementation``: the forward's and gradient's kernels, ``'auto'`` (the
  Triton kernels of ``group_norm_pallas`` where cuDNN's attention runs: a CUDA
  GPU of compute capability 8.0 or newer; XLA's elsewhere), ``'xla'`` or
  ``'pallas'``.

  ``dropout``: a rate of dropout after the output (the temporal convolutions'),
  applied unless ``deterministic``, each sample's mask drawn from the
  ``'dropout'`` RNG (``group_norm_silu``): inside the Triton kernels, no pass of
  its own.
  """
  num_groups: int
  epsilon: float = 1e-5
  batch_dims: int = 1
  activation: str | None = None       # None or "silu"
  dtype: Dtype = jnp.float32          # output dtype
  param_dtype: Dtype = jnp.float32
  implementation: str = "auto"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible by {self.num_groups} groups")
    if not 0 <= self.batch_dims < x.ndim - 1:
      raise ValueError(f"GroupNorm: batch_dims {self.batch_dims} for an input of rank {x.ndim}")
    if self.activation not in (None, "silu"):
      raise ValueError(f"GroupNorm: unknown activation {self.activation!r}")
    scale, bias = _norm_params(self, c)
    rate, seeds = 0.0, None
    if self.dropout and not deterministic:
      rate = float(self.dropout)
      seeds = jax.random.bits(self.make_rng("dropout"), x.shape[:self.batch_dims], jnp.uint32)
    return group_norm_silu(x, scale, bias, self.num_groups, float(self.epsilon),
                           self.batch_dims, self.activation == "silu", jnp.dtype(self.dtype),
                           resolve_group_norm(self.implementation), rate, seeds)


GROUP_NORM_IMPLS = config_lib.NORM_IMPLS   # ("auto", "xla", "pallas")


def resolve_group_norm(implementation: str | None) -> str:
  """``'xla'`` or ``'pallas'``: what ``implementation`` (``'auto'``, ``'xla'``,
  ``'pallas'`` or ``None`` = ``'auto'``) runs here; ``'auto'`` is ``'pallas'`` on a
  CUDA GPU of compute capability 8.0 or newer (or within ``assume_cudnn(True)``)
  when this jax has Pallas's Triton backend.

  Raises:
    ValueError: an unknown implementation, or ``'pallas'`` without that backend.
  """
  implementation = implementation or "auto"
  if implementation not in GROUP_NORM_IMPLS:
    raise ValueError(f"GroupNorm implementation {implementation!r}; use one of "
                     f"{', '.join(GROUP_NORM_IMPLS)}")
  if implementation == "pallas" and not group_norm_pallas.available():
    raise ValueError("GroupNorm implementation 'pallas' needs Pallas's Triton backend, which "
                     f"jax {jax.__version__} lacks; use 'xla' or 'auto'")
  if implementation != "auto":
    return implementation
  gpu = _ASSUMED[-1] if _ASSUMED else _cuda_ampere_or_newer()
  return "pallas" if gpu and group_norm_pallas.available() else "xla"


IMPLEMENTATIONS = config_lib.ATTENTION_IMPLS   # ("auto", "xla", "cudnn")

# cuDNN's fused (flash) attention: head widths it takes on every GPU jax
# supports it on (Hopper takes up to 256; 128 keeps one rule for A100 too).
_CUDNN_MAX_HEAD_DIM = 128


def _cuda_ampere_or_newer() -> bool:
  """The default backend is a CUDA GPU of compute capability 8.0 or newer."""
  if jax.default_backend() != "gpu":
    return False
  capability = getattr(jax.devices()[0], "compute_capability", None)
  try:
    return tuple(int(x) for x in str(capability).split(".")[:2]) >= (8, 0)
  except ValueError:   # None or an unknown format (ROCm)
    return False


@functools.lru_cache(maxsize=None)
def cudnn_available() -> bool:
  """True when this process can trace cuDNN fused attention on its default backend.

  Probes once (cached): a GPU of compute capability 8.0 or newer (cuDNN's flash
  attention needs Ampere; a Colab T4 or a V100 would fail only when compiling,
  as jax does not check the generation while tracing), then a ``[1, 128, 1,
  64]`` bf16 attention with ``implementation='cudnn'`` lowered for it. jax
  raises at trace time where it cannot run it (no CUDA GPU, no cuDNN it can
  load), so the probe answers with jax's own rules instead of a copy of them.
  """
  if not _cuda_ampere_or_newer():
    return False
  spec = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
  try:
    jax.jit(functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
            ).lower(spec, spec, spec)
  except Exception:   # noqa: BLE001 -- any refusal means "use XLA's attention"
    return False
  return True


_ASSUMED: list[bool] = []   # innermost assume_cudnn() answer, if any


@contextlib.contextmanager
def assume_cudnn(available: bool):
  """Within: ``'auto'`` resolves as if ``cudnn_available()`` answered ``available``
  (the attention's, and the GroupNorm's: its Triton kernel where cuDNN's attention runs).

  For compiling on this host for a GPU that is not here (``persvid_jax.bench.aot``):
  the programs must be traced as that GPU would trace them. Tracing only; what
  runs here is unchanged.
  """
  _ASSUMED.append(bool(available))
  try:
    yield
  finally:
    _ASSUMED.pop()


def resolve_implementation(implementation: str | None, dtype, head_dim: int, *,
                           lengths: tuple[int, int], has_mask: bool = False) -> str | None:
  """The ``implementation`` to pass to ``jax.nn.dot_product_attention``.

  Args:
    implementation: ``'auto'``, ``'xla'``, ``'cudnn'`` or ``None`` (= ``'xla'``).
    dtype: the dtype of q/k/v.
    head_dim: the width of one head.
    lengths: ``(Lq, Lk)``, the query and key sequence lengths. ``'auto'`` takes
      cuDNN only for an even ``Lq``: jax's cuDNN attention (0.10 and 0.11) hands
      its VJP an empty bias placeholder, so under ``jax.grad`` every call is
      checked as a biased one, and biased training needs even lengths (an odd
      length raises ``NotImplementedError`` while tracing the train step;
      forward-only calls would pass, but a network cannot tell here whether it
      is differentiated). An odd ``Lk`` without a mask (the 77 text tokens of
      cross-attention) is fine: ``dot_product_attention`` pads the keys by one
      and hides the pad with cuDNN's padding mask (``key_value_seq_lengths``,
      no bias tensor).
    has_mask: whether a boolean mask is passed (``'auto'`` leaves those to XLA:
      cuDNN would turn the mask into a bias tensor, a slower kernel).

  Returns:
    ``'cudnn'`` or ``None`` (XLA; jax's name for it). ``'cudnn'`` is returned as
    asked, so that an explicit request fails loudly where cuDNN cannot run.

  Raises:
    ValueError: an unknown implementation.
  """
  if implementation not in IMPLEMENTATIONS and implementation is not None:
    raise ValueError(f"attention implementation {implementation!r}; use one of "
                     f"{', '.join(IMPLEMENTATIONS)}")
  if implementation == "cudnn":
    return "cudnn"
  if implementation != "auto":
    return None
  eligible = (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
              and head_dim % 8 == 0 and head_dim <= _CUDNN_MAX_HEAD_DIM and not has_mask
              and lengths[0] % 2 == 0)
  return "cudnn" if eligible and (_ASSUMED[-1] if _ASSUMED else cudnn_available()) else None


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          num_heads: int, mask: jax.Array | None = None,
                          is_causal: bool = False,
                          implementation: str | None = None,
                          kv_lengths: jax.Array | None = None) -> jax.Array:
  """Multi-head attention on flattened heads.

  Args:
    q: ``[B, Lq, H*Dh]`` queries, or ``[B, Lq, *P, H*Dh]``: then each of the ``P``
      positions attends on its own, as ``prod(P) * H`` heads (a video's frames
      in its ``[B, T, H*W, C]`` layout: no transpose to ``[B*H*W, T, C]``).
    k: ``[B, Lk, H*Dh]`` keys (``[B, Lk, *P, H*Dh]`` with such queries).
    v: as ``k``, values.
    num_heads: ``H``.
    mask: optional boolean ``[B, Lk]`` (True = attend) key-padding mask.
    is_causal: causal masking (text encoder).
    implementation: ``'auto'``, ``'xla'``, ``'cudnn'`` or ``None`` (XLA); see
      ``resolve_implementation``.
    kv_lengths: optional int32 ``[B]``: only the first ``kv_lengths`` keys are
      real, the rest padding (keys padded ahead of time by ``pad_keys``, e.g. in
      a cache of the text's keys; no boolean ``mask`` with it).

  Returns:
    ``q``'s shape, in the dtype of ``q``.
  """
  shape = q.shape
  b, lq, width = shape[0], shape[1], shape[-1]
  lk = k.shape[1]
  if width % num_heads:
    raise ValueError(f"width {width} is not divisible by {num_heads} heads")
  if k.shape[2:-1] != shape[2:-1] or v.shape != k.shape:
    raise ValueError(f"dot_product_attention: keys {k.shape} / values {v.shape} do not "
                     f"match queries {shape} but for their length")
  dh = width // num_heads
  heads = num_heads * math.prod(shape[2:-1])   # positions as more heads: BTNH still
  q = q.reshape(b, lq, heads, dh)
  k = k.reshape(b, lk, heads, dh)
  v = v.reshape(b, lk, heads, dh)
  attn_mask = None
  if mask is not None:
    attn_mask = mask[:, None, None, :].astype(bool)   # [B, 1, 1, Lk]
  impl = resolve_implementation(implementation, q.dtype, dh, lengths=(lq, lk),
                                has_mask=mask is not None)
  if kv_lengths is not None and mask is not None:
    raise ValueError("dot_product_attention: pass a mask or kv_lengths, not both")
  if impl == "cudnn" and lk % 2 and mask is None and kv_lengths is None:
    k, v, kv_lengths = pad_keys(k, v)
  # Both paths accumulate logits and run the softmax in float32 for bf16
  # inputs (XLA: preferred_element_type=float32; cuDNN: by construction).
  # BTNH is one of cuDNN's two native layouts: no transpose either way.
  out = jax.nn.dot_product_attention(q, k, v, mask=attn_mask, is_causal=is_causal,
                                     key_value_seq_lengths=kv_lengths, implementation=impl)
  return out.reshape(shape)


def pad_keys(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One zero key and value appended: ``[B, Lk, ...] -> [B, Lk + 1, ...]`` each
  (heads split ``[.., N, H]`` or flat ``[.., N*H]``), and ``[B]`` int32 lengths
  ``Lk`` that tell cuDNN's padding mask to ignore it.

  jax's cuDNN attention needs even lengths under ``jax.grad`` (see
  ``resolve_implementation``); the text's 77 tokens become 78, the 78th masked, so
  the text cross-attention runs fused instead of as XLA's four kernels.
  """
  b, lk = k.shape[:2]
  pad = ((0, 0), (0, 1)) + ((0, 0),) * (k.ndim - 2)
  # A numpy constant: part of the program, not a kernel that fills it per call.
  return jnp.pad(k, pad), jnp.pad(v, pad), jnp.asarray(np.full((b,), lk, np.int32))


class FeedForward(nn.Module):
  """Two-layer MLP ``[..., D] -> [..., mlp_dim] -> [..., D]`` (CLIP names fc1/fc2)."""
  mlp_dim: int
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = linear(self.mlp_dim, (sh.EMBED, sh.MLP), name="fc1", **kw)(x)
    h = activation(self.act)(h)
    return linear(width, (sh.MLP, sh.EMBED), name="fc2", **kw)(h)


def activation(name: str):
  """``quick_gelu`` (OpenAI CLIP), ``gelu`` (exact, OpenCLIP), ``silu``."""
  if name == "quick_gelu":
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "silu":
    return jax.nn.silu
  raise ValueError(f"unknown activation {name!r}")


class CrossAttentionPool(nn.Module):
  """Learned queries attend to a token set: ``[B, L, Dk] -> [B, Q, D]``.

  A Perceiver-resampler layer stack (queries self-attend jointly with the
  inputs as keys, then MLP), used by the mapper and the extractor to turn a
  variable set of image tokens into a fixed number of output tokens.
  """
  num_queries: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b = tokens.shape[0]
    queries = self.param(
        "queries",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (sh.TOKENS, sh.EMBED)),
        (self.num_queries, self.width), self.param_dtype)
    x = jnp.broadcast_to(queries.astype(self.dtype), (b,) + queries.shape)
    ctx = linear(self.width, (sh.KV, sh.EMBED), name="proj_in", **kw)(tokens.astype(self.dtype))
    for i in range(self.layers):
      ln_q = layer_norm(name=f"layers_{i}_norm_q", **kw)(x).astype(self.dtype)
      ln_c = layer_norm(name=f"layers_{i}_norm_kv", **kw)(ctx).astype(self.dtype)
      kv_in = jnp.concatenate([ln_c, ln_q], axis=1)
      q = linear(self.width, (sh.EMBED, sh.HEADS), name=f"layers_{i}_to_q", use_bias=False, **kw)(ln_q)
      k = linear(self.width, (sh.EMBED, sh.HEADS), name=f"layers_{i}_to_k", use_bias=False, **kw)(kv_in)
      v = linear(self.width, (sh.EMBED, sh.HEADS), name=f"layers_{i}_to_v", use_bias=False, **kw)(kv_in)
      h = dot_product_attention(q, k, v, num_heads=self.heads, implementation=self.attention_impl)
      x = x + linear(self.width, (sh.HEADS, sh.EMBED), name=f"layers_{i}_to_out", **kw)(h)
      h = layer_norm(name=f"layers_{i}_norm_ff", **kw)(x).astype(self.dtype)
      x = x + FeedForward(self.mlp_dim, act="gelu", name=f"layers_{i}_ff", **kw)(h)
    return x


def conv_kernel_axes(ndim: int) -> tuple[str, ...]:
  """Logical axes of an ``nn.Conv`` kernel ``[*taps, in, out]``.

  Each tap axis has its own name (flax refuses a logical name twice in one
  array): ``(conv_h, conv_w)`` for 2-D kernels, ``(conv_t, conv_h, conv_w)``
  for 3-D ones. Taps map to no mesh axis.
  """
  taps = {1: (sh.CONV_T,), 2: (sh.CONV_H, sh.CONV_W), 3: (sh.CONV_T, sh.CONV_H, sh.CONV_W)}
  return taps[ndim] + (sh.CONV_IN, sh.CONV_OUT)


def conv(features: int, kernel_size: Sequence[int], *, name: str, strides=None,
         padding="SAME", dilation=None, use_bias: bool = True,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         kernel_init=nn.initializers.lecun_normal()) -> nn.Conv:
  """An ``nn.Conv`` (channels-last) whose kernel carries logical axis names."""
  kernel_size = tuple(kernel_size)
  return nn.Conv(
      features, kernel_size, strides=strides, padding=padding,
      kernel_dilation=dilation, use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, conv_kernel_axes(len(kernel_size))),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (sh.CONV_OUT,)),
      name=name)
