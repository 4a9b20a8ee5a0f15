"""The second encoder: a ViT in CLIP-vision layout returning pooled + patch tokens.

``images [B, H, W, 3] in [-1, 1] -> ImageFeatures(pooled [B, D],
patch_tokens [B, P, D], image_embeds [B, E] or None)``. Parameter names follow
``transformers``' ``CLIPVisionTransformer`` (``embeddings/{class_embedding,
patch_embedding, position_embedding}``, ``pre_layrnorm`` — sic —,
``encoder/layers_i``, ``post_layernorm``, optional ``visual_projection``) so
that CLIP vision checkpoints import by renaming.

Images arrive in the codebase's [-1, 1] range and are normalised here with
CLIP's mean/std, so that imported weights see what they were trained on; a
size other than ``image_size`` is resized (bicubic, antialiased).
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from persvid_jax import sharding as sh
from persvid_jax.models import attention
from persvid_jax.models.clip import ClipEncoder

Dtype = Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@chex.dataclass(frozen=True)
class ImageFeatures:
  """The image tower's outputs for a batch of B images (D: width, P: patches)."""
  pooled: chex.Array         # [B, D] post-LayerNorm class token
  patch_tokens: chex.Array   # [B, P, D] last hidden states of the patches
  image_embeds: chex.Array | None = None  # [B, E] projected pooled (CLIP space)


def clip_normalize(images: jax.Array) -> jax.Array:
  """``[..., 3]`` in [-1, 1] -> CLIP-normalised pixels (float32)."""
  x = (images.astype(jnp.float32) + 1.0) * 0.5
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


class ImageEncoder(nn.Module):
  """CLIP vision tower. See module docstring for shapes and names."""
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 0   # 0: no visual_projection
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @classmethod
  def from_config(cls, image_config, *, dtype="float32", param_dtype="float32",
                  attention_impl=None, **kwargs) -> "ImageEncoder":
    """Builds the encoder from ``config.image``."""
    c = image_config
    return cls(image_size=c.image_size, patch_size=c.patch_size, width=c.width,
               layers=c.layers, heads=c.heads, mlp_dim=c.mlp_dim, act=c.act,
               layer_norm_eps=c.layer_norm_eps, projection_dim=c.projection_dim,
               dtype=attention.dtype_of(dtype), param_dtype=attention.dtype_of(param_dtype),
               attention_impl=attention_impl, **kwargs)

  @property
  def num_patches(self) -> int:
    """P: patch tokens per image."""
    return (self.image_size // self.patch_size) ** 2

  @nn.compact
  def __call__(self, images: jax.Array) -> ImageFeatures:
    """Encodes ``images [B, H, W, 3]`` in [-1, 1] (see ``ImageFeatures``)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, _ = images.shape
    x = clip_normalize(images)
    if (h, w) != (self.image_size, self.image_size):
      x = jax.image.resize(x, (b, self.image_size, self.image_size, 3), "bicubic")
    embeddings = _VisionEmbeddings(self.image_size, self.patch_size, self.width,
                                   name="embeddings", **kw)
    x = embeddings(x.astype(self.dtype))                       # [B, 1+P, D]
    x = attention.layer_norm(name="pre_layrnorm", epsilon=self.layer_norm_eps, **kw)(x)
    x = ClipEncoder(self.layers, self.heads, self.mlp_dim, act=self.act,
                    layer_norm_eps=self.layer_norm_eps, attention_impl=self.attention_impl,
                    name="encoder", **kw)(x.astype(self.dtype))
    pooled = attention.layer_norm(name="post_layernorm", epsilon=self.layer_norm_eps,
                                  **kw)(x[:, 0]).astype(self.dtype)
    image_embeds = None
    if self.projection_dim:
      image_embeds = attention.linear(self.projection_dim, (sh.EMBED, sh.MLP),
                                      use_bias=False, name="visual_projection", **kw)(pooled)
    return ImageFeatures(pooled=pooled, patch_tokens=x[:, 1:].astype(self.dtype),
                         image_embeds=image_embeds)


class _VisionEmbeddings(nn.Module):
  """Class token + non-overlapping patch conv (no bias) + learned positions."""
  image_size: int
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    b = pixels.shape[0]
    p = self.patch_size
    patches = attention.conv(self.width, (p, p), strides=(p, p), padding="VALID",
                             use_bias=False, name="patch_embedding", dtype=self.dtype,
                             param_dtype=self.param_dtype)(pixels)
    patches = patches.reshape(b, -1, self.width)               # [B, P, D]
    cls = self.param("class_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(self.width ** -0.5),
                                                  (sh.EMBED,)),
                     (self.width,), self.param_dtype)
    num_positions = (self.image_size // p) ** 2 + 1
    pos = self.param("position_embedding",
                     nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                  (sh.TOKENS, sh.EMBED)),
                     (num_positions, self.width), self.param_dtype)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls, patches.astype(self.dtype)], axis=1)
    return x + pos.astype(self.dtype)[None]
