"""The generator's transformers: spatial (over the pixels of each frame, with text and
detail cross-attention) and temporal (over the frames of each pixel).

``[B, T, H, W, C] -> same``, diffusers' ``Transformer2DModel`` and
``TransformerTemporalModel`` with their ``BasicTransformerBlock``, ``Attention`` and
GEGLU feed-forward, under diffusers' parameter names (``persvid_jax.models.unet3d``
says how they map). Norms and softmax compute in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from persvid_jax import sharding as sh
from persvid_jax.models import attention
from persvid_jax.models.attention import GroupNorm, layer_norm, linear

Dtype = Any
Array = jax.Array

# diffusers' hard-coded epsilons (not the config's norm_eps).
TRANSFORMER_GROUP_NORM_EPS = 1e-6   # Transformer2DModel / TransformerTemporalModel .norm
LAYER_NORM_EPS = 1e-5               # BasicTransformerBlock norm1..3


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


class GEGLUFeedForward(nn.Module):
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
    return x + GEGLUFeedForward(name="ff", **kw)(norm("norm3", x))


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
