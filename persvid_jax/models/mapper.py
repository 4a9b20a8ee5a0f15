"""The reference mapper: image-encoder features -> K pseudo-word embeddings.

``ImageFeatures(pooled [B, Dv], patch_tokens [B, P, Dv]) -> [B, K, Dt]`` in the
text encoder's embedding space: K learned queries attend over the pooled token
and the patch tokens (a Perceiver-resampler stack), then a LayerNorm and a
projection to the text width. These K tokens are what the concept swap writes
into the prompt for a concept (stored in the bank at registration, or computed
on the fly from a target image).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from persvid_jax import sharding as sh
from persvid_jax.models import attention
from persvid_jax.models.image_encoder import ImageFeatures

Dtype = Any


class ReferenceMapper(nn.Module):
  """Maps image features to ``num_tokens`` (K) embeddings of width ``out_width``."""
  num_tokens: int
  out_width: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @classmethod
  def from_config(cls, config, *, dtype="float32", param_dtype="float32",
                  attention_impl=None, **kwargs) -> "ReferenceMapper":
    """From the full config: K = concepts.ref_tokens, output = text.width."""
    m = config.mapper
    return cls(num_tokens=config.concepts.ref_tokens, out_width=config.text.width,
               width=m.width, layers=m.layers, heads=m.heads, mlp_dim=m.mlp_dim,
               dtype=attention.dtype_of(dtype), param_dtype=attention.dtype_of(param_dtype),
               attention_impl=attention_impl, **kwargs)

  @nn.compact
  def __call__(self, features: ImageFeatures) -> jax.Array:
    """``features`` -> ``ref_tokens [B, K, out_width]``."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tokens = jnp.concatenate([features.pooled[:, None], features.patch_tokens], axis=1)
    x = attention.CrossAttentionPool(
        self.num_tokens, self.width, self.layers, self.heads, self.mlp_dim,
        attention_impl=self.attention_impl, name="resampler", **kw)(tokens)
    x = attention.layer_norm(name="norm_out", **kw)(x).astype(self.dtype)
    return attention.linear(self.out_width, (sh.MLP, sh.EMBED), name="proj_out", **kw)(x)
