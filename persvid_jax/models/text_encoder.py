"""The first encoder: a CLIP text transformer returning per-token states.

``token_ids [B, L] -> (states [B, L, D], pooled [B, D])``. Token embedding +
learned position embedding, a causal pre-LN ``ClipEncoder``, a final
LayerNorm; ``pooled`` is the final state at the first end-of-text token (what
``transformers``' ``CLIPTextModel`` returns as ``pooler_output``).

The concept swap needs to enter the encoder between the lookup and the
transformer (swap at the *input*, textual-inversion style), so the lookup is a
separate method, ``embed_tokens``, and ``__call__`` accepts ``inputs_embeds``
in place of the lookup.
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


class TextEncoder(nn.Module):
  """CLIP text tower (parameter names as ``transformers``' ``CLIPTextTransformer``).

  Attributes:
    vocab_size: rows of the token table, concept placeholders included.
    max_length: ``L``, rows of the position table.
    width: ``D``.
    layers, heads, mlp_dim, act, layer_norm_eps: the transformer.
    eos_token_id: id whose first occurrence gives ``pooled``.
  """
  vocab_size: int
  max_length: int
  width: int
  layers: int
  heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @classmethod
  def from_config(cls, text_config, *, eos_token_id: int = 1, dtype="float32",
                  param_dtype="float32", attention_impl=None, **kwargs) -> "TextEncoder":
    """Builds the encoder from ``config.text``."""
    return cls(vocab_size=text_config.vocab_size, max_length=text_config.max_length,
               width=text_config.width, layers=text_config.layers,
               heads=text_config.heads, mlp_dim=text_config.mlp_dim,
               act=text_config.act, layer_norm_eps=text_config.layer_norm_eps,
               eos_token_id=eos_token_id, dtype=attention.dtype_of(dtype),
               param_dtype=attention.dtype_of(param_dtype),
               attention_impl=attention_impl, **kwargs)

  def setup(self):
    self.token_embedding = nn.Embed(
        self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                    (sh.VOCAB, sh.EMBED)))
    self.position_embedding = self.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.01), (sh.TOKENS, sh.EMBED)),
        (self.max_length, self.width), self.param_dtype)
    self.encoder = ClipEncoder(
        self.layers, self.heads, self.mlp_dim, act=self.act,
        layer_norm_eps=self.layer_norm_eps, dtype=self.dtype,
        param_dtype=self.param_dtype, attention_impl=self.attention_impl)
    self.final_layer_norm = attention.layer_norm(
        name="final_layer_norm", epsilon=self.layer_norm_eps, dtype=self.dtype,
        param_dtype=self.param_dtype)

  def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
    """Token lookup only: ``[B, L] int -> [B, L, D]`` (compute dtype)."""
    return self.token_embedding(token_ids)

  def __call__(self, token_ids: jax.Array, *,
               inputs_embeds: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Encodes a batch of prompts.

    Args:
      token_ids: ``[B, L]`` int32, ``L <= max_length``.
      inputs_embeds: optional ``[B, L, D]`` used instead of ``embed_tokens``
        (the concept swap at the encoder input).

    Returns:
      ``states [B, L, D]`` (after the final LayerNorm, compute dtype) and
      ``pooled [B, D]`` (the state at the first EOS token).
    """
    length = token_ids.shape[1]
    if length > self.max_length:
      raise ValueError(f"prompt length {length} exceeds max_length {self.max_length}")
    x = self.embed_tokens(token_ids) if inputs_embeds is None else inputs_embeds
    x = x.astype(self.dtype) + self.position_embedding[:length].astype(self.dtype)
    x = self.encoder(x, is_causal=True)
    states = self.final_layer_norm(x).astype(self.dtype)
    # First EOS position (argmax of a boolean returns the first True); a row
    # without EOS pools its last position.
    is_eos = token_ids == self.eos_token_id
    eos_pos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1), length - 1)
    pooled = jnp.take_along_axis(states, eos_pos[:, None, None], axis=1)[:, 0]
    return states, pooled
