"""The generator's transformers: spatial (over the pixels of each frame, with text and
detail cross-attention) and temporal (over the frames of each pixel).

``[B, T, H, W, C] -> same``, diffusers' ``Transformer2DModel`` and
``TransformerTemporalModel`` with their ``BasicTransformerBlock``, ``Attention`` and
GEGLU feed-forward, under diffusers' parameter names (``persvid_jax.models.unet3d``
says how they map). Norms and softmax compute in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from persvid_jax import sharding as sh
from persvid_jax.models import attention, geglu_pallas
from persvid_jax.models.attention import GroupNorm, linear

Dtype = Any
Array = jax.Array

# The flax collection of the cross-attentions' keys and values (``Attention``).
KV_CACHE = "kv_cache"

# diffusers' hard-coded epsilons (not the config's norm_eps).
TRANSFORMER_GROUP_NORM_EPS = 1e-6   # Transformer2DModel / TransformerTemporalModel .norm
LAYER_NORM_EPS = 1e-5               # BasicTransformerBlock norm1..3


class Attention(nn.Module):
  """Multi-head attention ``[N, Lq, D] -> [N, Lq, D]`` (diffusers ``Attention``);
  self-attention also ``[B, Lq, P, D]``: over ``Lq`` for each of ``P`` positions.

  ``to_q/to_k/to_v`` without bias, ``to_out_0`` with bias. Self-attention when
  ``context`` is None. With ``detail_dim > 0`` (spatial ``attn2`` only) the
  decoupled detail branch of IP-Adapter: own ``to_k_detail``/``to_v_detail``
  on the detail tokens, the same queries, and
  ``out = attn(q, K_text, V_text) + scale * attn(q, K_detail, V_detail)``
  before the shared ``to_out_0``.

  Cross-attention keys and values depend only on the text (and detail tokens),
  which a sampler holds fixed over its steps, so they can be computed once per
  video in the ``KV_CACHE`` collection (flax's decoding-cache idiom): applied
  with ``mutable=[KV_CACHE]`` the module stores ``k``, ``v`` ``[B, Lk', H*Dh]``
  (``detail_k``, ``detail_v`` for the detail branch), padded by one key where
  cuDNN would pad them at every call, with ``lengths`` / ``detail_lengths``
  ``[B]``; applied with the collection as a variable it reads them instead of
  running ``to_k``/``to_v``. Self-attention ignores the collection.
  """
  heads: int
  head_dim: int
  detail_dim: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  # Return ``(out without to_out_0's bias, that bias)``: the block adds it with
  # the residual (``attention.add_layer_norm``).
  bias_apart: bool = False

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None,
               context_mask: Array | None = None,
               detail_tokens: Array | None = None,
               detail_scale: Array | None = None) -> Array | tuple[Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.head_dim
    width = x.shape[-1]
    q = linear(inner, (sh.EMBED, sh.HEADS), name="to_q", use_bias=False, **kw)(x)
    to_k = linear(inner, (sh.KV, sh.HEADS), name="to_k", use_bias=False, **kw)
    to_v = linear(inner, (sh.KV, sh.HEADS), name="to_v", use_bias=False, **kw)
    if context is None:
      k, v, lengths = to_k(x), to_v(x), None
    else:
      k, v, lengths = self._keys_values("", to_k, to_v, context, q.shape[1],
                                        context_mask is not None)
    out = attention.dot_product_attention(q, k, v, num_heads=self.heads, mask=context_mask,
                                          implementation=self.attention_impl,
                                          kv_lengths=lengths)
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
        dk, dv, dlengths = self._keys_values("detail_", to_k_detail, to_v_detail,
                                             detail_tokens, q.shape[1], False)
        detail_out = attention.dot_product_attention(
            q, dk, dv, num_heads=self.heads, implementation=self.attention_impl,
            kv_lengths=dlengths)
        scale = jnp.asarray(1.0 if detail_scale is None else detail_scale, jnp.float32)
        scale = scale.reshape(scale.shape + (1,) * (3 - scale.ndim))   # [] or [N] -> bcast
        out = out + (scale * detail_out).astype(self.dtype)
    if self.bias_apart:
      return linear_bias_apart(width, (sh.HEADS, sh.EMBED), name="to_out_0", **kw)(out)
    return linear(width, (sh.HEADS, sh.EMBED), name="to_out_0", **kw)(out)

  def _keys_values(self, prefix: str, to_k: nn.Module, to_v: nn.Module, tokens: Array,
                   query_len: int, masked: bool) -> tuple[Array, Array, Array | None]:
    """``tokens [B, Lk, Dc]`` -> ``(k, v [B, Lk', H*Dh], lengths [B] or None)``: read
    from the ``KV_CACHE`` collection where it is given, else projected (and
    stored, padded as cuDNN needs them, where the collection is mutable)."""
    names = (prefix + "k", prefix + "v", prefix + "lengths")
    filling = self.is_mutable_collection(KV_CACHE) and not self.is_initializing()
    if not filling and self.has_variable(KV_CACHE, names[0]):
      k, v = self.get_variable(KV_CACHE, names[0]), self.get_variable(KV_CACHE, names[1])
      lengths = (self.get_variable(KV_CACHE, names[2])
                 if self.has_variable(KV_CACHE, names[2]) else None)
      return k, v, lengths
    tokens = tokens.astype(self.dtype)
    k, v, lengths = to_k(tokens), to_v(tokens), None
    if filling:
      # Padded here once, as dot_product_attention would pad them at every step.
      impl = attention.resolve_implementation(
          self.attention_impl, k.dtype, self.head_dim, lengths=(query_len, k.shape[1]),
          has_mask=masked)
      if impl == "cudnn" and k.shape[1] % 2 and not masked:
        k, v, lengths = attention.pad_keys(k, v)
        self.put_variable(KV_CACHE, names[2], lengths)
      self.put_variable(KV_CACHE, names[0], k)
      self.put_variable(KV_CACHE, names[1], v)
    return k, v, lengths


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def geglu(y: Array, bias: Array, implementation: str = "xla") -> Array:
  """``h = y + bias [..., 2F] -> hidden * gelu(gate) [..., F]`` (exact GELU;
  ``hidden, gate`` the two halves of ``h``): diffusers' ``GEGLU`` after its
  projection ``y`` (without its bias ``[2F]``, added here as ``nn.Dense`` adds it).

  Its gradient is written out (``jax.custom_vjp``) to give XLA one pass over
  ``(y, dy)`` that writes the ``[..., 2F]`` gradient (and the bias gradient's
  partial sums) and nothing else; the forward writes only its output. Autodiff
  writes ``gelu(gate)`` as a second forward output, each half's gradient in a
  pass of its own and then their concatenation (for an H200, one feed-forward at
  the top level of the train step: 2.7 -> 1.3 GB moved).

  ``implementation`` (static; ``attention.resolve_group_norm``'s answer): with
  ``'pallas'`` and ``F`` a multiple of 128 the gradient is
  ``geglu_pallas.geglu_bwd``'s one Triton kernel, which also sums the bias
  gradient (XLA reads the ``[..., 2F]`` gradient back for it); else XLA's pass.
  ``'interpret'``: that kernel in Pallas's interpreter (tests on a CPU).
  """
  hidden, gate = jnp.split(y + _row(bias.astype(y.dtype), y.ndim), 2, axis=-1)
  return hidden * jax.nn.gelu(gate, approximate=False)


def _row(v: Array, ndim: int) -> Array:
  return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


def _geglu_fwd(y, bias, implementation):
  return geglu(y, bias, implementation), (y, bias)


def _geglu_bwd(implementation, res, dy):
  y, bias = res
  if implementation != "xla" and geglu_pallas.fits(math.prod(y.shape[:-1]), y.shape[-1] // 2):
    dh, sums = attention.per_batch_shard(functools.partial(
        geglu_pallas.geglu_bwd, interpret=implementation == "interpret"), (y, dy), (bias,))
    return dh, jnp.sum(sums, 0).astype(bias.dtype)
  return _geglu_bwd_xla(res, dy)


def _geglu_bwd_xla(res, dy):
  """XLA's gradient of ``geglu``: ``(dh [..., 2F], dbias [2F])``."""
  # The barrier keeps XLA from sharing the forward's GELU (it would write it
  # out for here). Then each element of the gradient is computed from its own
  # pair (hidden, gate): with the halves swapped (h_swap) every element finds its
  # partner, and one elementwise pass writes the [..., 2F] gradient with one GELU
  # per element. (From the two halves, XLA writes each half in float32 and then
  # concatenates them in a kernel of its own.)
  y, bias, dy = jax.lax.optimization_barrier((*res, dy))
  f = y.shape[-1] // 2
  h = (y + _row(bias.astype(y.dtype), y.ndim)).astype(jnp.float32)
  h_swap = jnp.concatenate([h[..., f:], h[..., :f]], axis=-1)
  first = jax.lax.broadcasted_iota(jnp.int32, h.shape, h.ndim - 1) < f
  gate = jnp.where(first, h_swap, h)
  hidden = jnp.where(first, h, h_swap)
  cdf = 0.5 * jax.lax.erfc(gate * -_SQRT_HALF)              # Phi(gate)
  pdf = jnp.exp(-0.5 * gate * gate) * _INV_SQRT_2PI         # phi(gate)
  dyf = dy.astype(jnp.float32)
  dh = jnp.concatenate([dyf, dyf], axis=-1) * jnp.where(
      first, gate * cdf,                                    # d hidden = dy * gelu(gate)
      hidden * (cdf + gate * pdf))                          # d gate = dy * hidden * gelu'(gate)
  # Written once in y's dtype, the bias gradient summed from that (XLA would
  # otherwise write the float32 product for the sum).
  dh = jax.lax.optimization_barrier(dh.astype(y.dtype))
  dbias = jnp.sum(dh, tuple(range(dh.ndim - 1)), dtype=jnp.float32).astype(bias.dtype)
  return dh, dbias


geglu.defvjp(_geglu_fwd, _geglu_bwd)
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


class _DenseBiasApart(nn.Dense):
  """``nn.Dense`` (same parameters) returning ``(x @ kernel, bias)``: the product
  in ``dtype``, the bias as stored (``param_dtype``), added by its consumer in
  ``dtype`` (``geglu``; ``attention.add_layer_norm`` for an attention's
  ``to_out_0`` and a transformer's ``proj_in``). Cast here, the bias of a
  Triton kernel (the GEGLU gradient's) made XLA cast the train state's whole
  packed vector buffer first and slice every vector from it in a kernel of its
  own (~300 more launches in the ModelScope train step); as stored, its slice
  is a float32 one like the GroupNorms' scales and biases."""

  @nn.compact
  def __call__(self, inputs: Array) -> tuple[Array, Array]:
    kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    inputs, kernel = self.promote_dtype(inputs, kernel, dtype=self.dtype)
    y = jax.lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision)
    return y, bias


def linear_bias_apart(features: int, axes: tuple[str, str], *, name: str,
                      dtype: Dtype = jnp.float32,
                      param_dtype: Dtype = jnp.float32) -> _DenseBiasApart:
  """``attention.linear``'s layer (same parameters, names, initialisation and
  logical axes) returning ``(x @ kernel, bias)`` for a consumer that adds the bias."""
  return _DenseBiasApart(
      features, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name)


class GEGLU(nn.Module):
  """``proj`` to ``2 * features`` then ``hidden * gelu(gate)`` (diffusers ``GEGLU``).

  ``norm_impl``: ``'pallas'`` (or ``'auto'`` where that resolves to it, as for
  the GroupNorms: ``attention.resolve_group_norm``) runs the gradient as one
  Triton kernel (``geglu``); the forward is XLA's either way.
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    proj = linear_bias_apart(2 * self.features, (sh.EMBED, sh.MLP), name="proj",
                             dtype=self.dtype, param_dtype=self.param_dtype)
    return geglu(*proj(x), attention.resolve_group_norm(self.norm_impl))


class GEGLUFeedForward(nn.Module):
  """GEGLU MLP ``[..., D] -> [..., 4D] -> [..., D]`` (names ``net_0/proj``, ``net_2``)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    h = GEGLU(self.mult * width, name="net_0", norm_impl=self.norm_impl, **kw)(x)
    return linear(width, (sh.MLP, sh.EMBED), name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LN block ``[N, L, D] -> [N, L, D]``: self-attn, attn2, GEGLU MLP (without
  ``context`` also ``[B, L, P, D]``: attention over ``L`` for each of ``P`` positions).

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
  # The LayerNorms' (``attention.AddLayerNorm``) and the GEGLU gradient's kernels.
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, *, frames: int = 1, context: Array | None = None,
               context_mask: Array | None = None, detail_tokens: Array | None = None,
               detail_scale: Array | None = None, x_bias: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(heads=self.heads, head_dim=self.head_dim,
                   attention_impl=self.attention_impl, bias_apart=True, **kw)

    def norm(name, r, r_bias=None, stream=None):
      """``(s, y)``: the stream after ``stream + (r + r_bias)``, then its LayerNorm
      (with ``norm_impl`` 'pallas': one Triton kernel each way, the gradient
      summing ``r_bias``'s too; ``attention.add_layer_norm``)."""
      return attention.AddLayerNorm(epsilon=LAYER_NORM_EPS, implementation=self.norm_impl,
                                    name=name, **kw)(r, r_bias, stream)

    x, h = norm("norm1", x, x_bias)   # x_bias: proj_in's, added with the first norm
    x, h = norm("norm2", *Attention(name="attn1", **attn_kw)(h), x)
    if context is None:
      out, out_bias = Attention(name="attn2", **attn_kw)(h)
    else:
      n, length, width = h.shape
      h = h.reshape(n // frames, frames * length, width)
      out, out_bias = Attention(name="attn2", detail_dim=self.detail_dim, **attn_kw)(
          h, context, context_mask, detail_tokens, detail_scale)
      out = out.reshape(n, length, width)
    x, h = norm("norm3", out, out_bias, x)
    ff = GEGLUFeedForward(name="ff", norm_impl=self.norm_impl, **kw)
    return x + ff(h)


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
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array, context: Array, context_mask: Array | None = None,
               detail_tokens: Array | None = None,
               detail_scale: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, h, w, c = x.shape
    inner = self.heads * self.head_dim
    y = GroupNorm(self.norm_num_groups, epsilon=TRANSFORMER_GROUP_NORM_EPS, batch_dims=2,
                  implementation=self.norm_impl, name="norm", **kw)(x).reshape(b * t, h * w, c)
    # proj_in's bias is added with the block's first LayerNorm (one kernel in training).
    y, y_bias = linear_bias_apart(inner, (sh.EMBED, sh.HEADS), name="proj_in", **kw)(y)
    y = BasicTransformerBlock(self.heads, self.head_dim, detail_dim=self.detail_dim,
                              attention_impl=self.attention_impl, norm_impl=self.norm_impl,
                              name="transformer_blocks_0", **kw)(
        y, frames=t, context=context, context_mask=context_mask,
        detail_tokens=detail_tokens, detail_scale=detail_scale, x_bias=y_bias)
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

  It runs in the video's own ``[B, T, H*W, C]`` layout, the pixels as more
  attention heads (``attention.dot_product_attention``), where diffusers
  transposes to ``[B*H*W, T, C]`` and back: the same sums, without the two
  transposes forward and two backward (4 passes over the activation a block).
  """
  heads: int
  head_dim: int
  norm_num_groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  norm_impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, t, h, w, c = x.shape
    inner = self.heads * self.head_dim
    y = GroupNorm(self.norm_num_groups, epsilon=TRANSFORMER_GROUP_NORM_EPS, batch_dims=1,
                  implementation=self.norm_impl, name="norm", **kw)(x)
    y = y.reshape(b, t, h * w, c)
    y, y_bias = linear_bias_apart(inner, (sh.EMBED, sh.HEADS), name="proj_in", **kw)(y)
    y = BasicTransformerBlock(self.heads, self.head_dim, attention_impl=self.attention_impl,
                              norm_impl=self.norm_impl, name="transformer_blocks_0", **kw)(
        y, x_bias=y_bias)
    y = linear(c, (sh.HEADS, sh.EMBED), name="proj_out",
               kernel_init=nn.initializers.zeros_init(), **kw)(y)
    return x + y.reshape(b, t, h, w, c)
