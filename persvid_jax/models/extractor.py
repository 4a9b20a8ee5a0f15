"""The personalization extraction network: subject image (+mask) -> N detail tokens.

``image [B, H, W, 3] in [-1, 1], mask [B, H, W, 1] in {0, 1}, has_image [B]
bool -> detail_tokens [B, N, Dd]``. The masked image and the mask (4 channels)
are patchified by a conv, position-embedded, run through a small ViT, and N
learned queries attend over the patches (Perceiver resampler) to give the
detail tokens that enter the generator's decoupled cross-attention.

Rows with ``has_image == False`` get the learned **null** detail tokens
(the text mode: plain text, no concept). Selecting by mask instead of by Python
branch keeps all inference modes in one compiled graph. Masking the image to
the subject is what keeps backgrounds out of the detail features (the recipe's
"reference != target" lesson).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from persvid_jax import sharding as sh
from persvid_jax.models import attention
from persvid_jax.models.clip import ClipEncoder

Dtype = Any


class DetailExtractor(nn.Module):
  """See module docstring. ``num_tokens`` = N, ``detail_dim`` = Dd."""
  num_tokens: int
  detail_dim: int
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @classmethod
  def from_config(cls, config, *, dtype="float32", param_dtype="float32",
                  attention_impl=None, **kwargs) -> "DetailExtractor":
    """From the full config: N = concepts.detail_tokens, the rest from config.extractor."""
    e = config.extractor
    return cls(num_tokens=config.concepts.detail_tokens, detail_dim=e.detail_dim,
               image_size=e.image_size, patch_size=e.patch_size, width=e.width,
               layers=e.layers, heads=e.heads, mlp_dim=e.mlp_dim,
               dtype=attention.dtype_of(dtype), param_dtype=attention.dtype_of(param_dtype),
               attention_impl=attention_impl, **kwargs)

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    self.patch_embedding = attention.conv(self.width, (p, p), strides=(p, p),
                                          padding="VALID", name="patch_embedding", **kw)
    self.position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (sh.TOKENS, sh.EMBED)),
        ((self.image_size // p) ** 2, self.width), self.param_dtype)
    self.encoder = ClipEncoder(self.layers, self.heads, self.mlp_dim, act="gelu",
                               attention_impl=self.attention_impl, **kw)
    self.resampler = attention.CrossAttentionPool(
        self.num_tokens, self.width, 1, self.heads, self.mlp_dim,
        attention_impl=self.attention_impl, **kw)
    self.norm_out = attention.layer_norm(name="norm_out", **kw)
    self.proj_out = attention.linear(self.detail_dim, (sh.EMBED, sh.MLP), name="proj_out", **kw)
    self.null_detail_tokens = self.param(
        "null_detail_tokens",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (sh.TOKENS, sh.MLP)),
        (self.num_tokens, self.detail_dim), self.param_dtype)

  def null_tokens(self, batch_size: int) -> jax.Array:
    """The learned null detail tokens, ``[batch_size, N, Dd]``."""
    null = self.null_detail_tokens.astype(self.dtype)
    return jnp.broadcast_to(null, (batch_size,) + null.shape)

  def __call__(self, image: jax.Array, mask: jax.Array,
               has_image: jax.Array | None = None) -> jax.Array:
    """Extracts detail tokens.

    Args:
      image: ``[B, H, W, 3]`` in [-1, 1]; resized to ``image_size`` if needed.
      mask: ``[B, H, W, 1]`` subject mask in [0, 1].
      has_image: optional ``[B]`` bool; False rows return the null tokens.

    Returns:
      ``[B, N, Dd]`` detail tokens (compute dtype).
    """
    b = image.shape[0]
    x = jnp.concatenate([image.astype(jnp.float32) * mask, mask.astype(jnp.float32)], -1)
    if x.shape[1:3] != (self.image_size, self.image_size):
      x = jax.image.resize(x, (b, self.image_size, self.image_size, 4), "linear")
    x = self.patch_embedding(x.astype(self.dtype)).reshape(b, -1, self.width)
    x = x + self.position_embedding.astype(self.dtype)[None]
    x = self.encoder(x)
    x = self.resampler(x)
    x = self.norm_out(x).astype(self.dtype)
    tokens = self.proj_out(x)
    if has_image is None:
      return tokens
    return jnp.where(has_image[:, None, None], tokens, self.null_tokens(b))
