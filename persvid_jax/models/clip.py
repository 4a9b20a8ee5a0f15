"""The CLIP transformer stack shared by the text and the image encoder.

Layer layout and parameter names follow ``transformers``' ``CLIPEncoderLayer``
(``self_attn/{q,k,v,out}_proj``, ``layer_norm1``, ``mlp/{fc1,fc2}``,
``layer_norm2``) so that CLIP checkpoints map onto it by a rename table.
Pre-LN residual blocks; the text tower runs it causally.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from persvid_jax import sharding as sh
from persvid_jax.models import attention

Dtype = Any


class ClipAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections: ``[B,L,D] -> [B,L,D]``."""
  heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, is_causal: bool = False) -> jax.Array:
    width = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = attention.linear(width, (sh.EMBED, sh.HEADS), name="q_proj", **kw)(x)
    k = attention.linear(width, (sh.EMBED, sh.HEADS), name="k_proj", **kw)(x)
    v = attention.linear(width, (sh.EMBED, sh.HEADS), name="v_proj", **kw)(x)
    h = attention.dot_product_attention(q, k, v, num_heads=self.heads, is_causal=is_causal,
                                        implementation=self.attention_impl)
    return attention.linear(width, (sh.HEADS, sh.EMBED), name="out_proj", **kw)(h)


class ClipEncoderLayer(nn.Module):
  """Pre-LN transformer layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""
  heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, is_causal: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = attention.layer_norm(name="layer_norm1", epsilon=self.layer_norm_eps, **kw)(x)
    h = ClipAttention(self.heads, attention_impl=self.attention_impl, name="self_attn",
                      **kw)(h.astype(self.dtype), is_causal=is_causal)
    x = x + h
    h = attention.layer_norm(name="layer_norm2", epsilon=self.layer_norm_eps, **kw)(x)
    h = attention.FeedForward(self.mlp_dim, act=self.act, name="mlp", **kw)(h.astype(self.dtype))
    x = x + h
    return nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.CHANNELS))


class ClipEncoder(nn.Module):
  """A stack of ``layers`` ``ClipEncoderLayer``s: ``[B, L, D] -> [B, L, D]``."""
  layers: int
  heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, is_causal: bool = False) -> jax.Array:
    for i in range(self.layers):
      x = ClipEncoderLayer(
          self.heads, self.mlp_dim, act=self.act, layer_norm_eps=self.layer_norm_eps,
          dtype=self.dtype, param_dtype=self.param_dtype,
          attention_impl=self.attention_impl, name=f"layers_{i}")(x, is_causal=is_causal)
    return x
