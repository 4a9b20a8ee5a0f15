"""Attention and projection primitives shared by every network.

All attention goes through ``jax.nn.dot_product_attention`` so that the GPU
can pick cuDNN's fused kernel (``implementation='cudnn'``) without any model
change. ``'auto'`` (the configs' default) picks it where it applies: a CUDA GPU
whose cuDNN jax can use, bf16/fp16 inputs, a head width that is a multiple of 8
and at most 128, no boolean mask, even query and key lengths; everywhere else
(CPU, TPU, float32, the 77-token text cross-attention) XLA's attention. jax's
own default (``None``) is XLA even on a GPU, which issue 8 measured at 79
TFLOP/s against cuDNN's 421 on an H200. Logits and softmax run in
float32 whatever the compute dtype (both paths do this for bf16 inputs), and
norms are computed in float32 too, since bf16 statistics lose small values.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from persvid_jax import config_lib
from persvid_jax import sharding as sh

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
               param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  """LayerNorm computed in float32 (``dtype`` is only the output dtype)."""
  del dtype  # statistics always in float32, see module docstring
  return nn.LayerNorm(
      epsilon=epsilon, dtype=jnp.float32, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (sh.NORM,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (sh.NORM,)),
      name=name)


def group_norm(num_groups: int, *, name: str, epsilon: float = 1e-5,
               param_dtype: Dtype = jnp.float32) -> nn.GroupNorm:
  """GroupNorm computed in float32 (torch's ``nn.GroupNorm`` semantics)."""
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32,
      param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (sh.NORM,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (sh.NORM,)),
      name=name)


IMPLEMENTATIONS = config_lib.ATTENTION_IMPLS   # ("auto", "xla", "cudnn")

# cuDNN's fused (flash) attention: head widths it takes on every GPU jax
# supports it on (Hopper takes up to 256; 128 keeps one rule for A100 too).
_CUDNN_MAX_HEAD_DIM = 128


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
  if jax.default_backend() != "gpu":
    return False
  capability = getattr(jax.devices()[0], "compute_capability", None)
  try:
    if tuple(int(x) for x in str(capability).split(".")[:2]) < (8, 0):
      return False
  except ValueError:   # None or an unknown format (ROCm): no cuDNN
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
  """Within: ``'auto'`` resolves as if ``cudnn_available()`` answered ``available``.

  For compiling on this host for a GPU that is not here (``persvid_jax.aot``):
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
      cuDNN only when both are even: jax's cuDNN attention (0.10 and 0.11) hands
      its VJP an empty bias placeholder, so under ``jax.grad`` every call is
      checked as a biased one, and biased training needs even lengths. An odd
      length (the 77 text tokens of cross-attention) would raise
      ``NotImplementedError`` while tracing the train step; forward-only calls
      would pass, but a network cannot tell here whether it is differentiated.
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
              and all(n % 2 == 0 for n in lengths))
  return "cudnn" if eligible and (_ASSUMED[-1] if _ASSUMED else cudnn_available()) else None


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          num_heads: int, mask: jax.Array | None = None,
                          is_causal: bool = False,
                          implementation: str | None = None) -> jax.Array:
  """Multi-head attention on flattened heads.

  Args:
    q: ``[B, Lq, H*Dh]`` queries.
    k: ``[B, Lk, H*Dh]`` keys.
    v: ``[B, Lk, H*Dh]`` values.
    num_heads: ``H``.
    mask: optional boolean ``[B, Lk]`` (True = attend) key-padding mask.
    is_causal: causal masking (text encoder).
    implementation: ``'auto'``, ``'xla'``, ``'cudnn'`` or ``None`` (XLA); see
      ``resolve_implementation``.

  Returns:
    ``[B, Lq, H*Dh]`` in the dtype of ``q``.
  """
  b, lq, width = q.shape
  lk = k.shape[1]
  if width % num_heads:
    raise ValueError(f"width {width} is not divisible by {num_heads} heads")
  dh = width // num_heads
  q = q.reshape(b, lq, num_heads, dh)
  k = k.reshape(b, lk, num_heads, dh)
  v = v.reshape(b, lk, num_heads, dh)
  attn_mask = None
  if mask is not None:
    attn_mask = mask[:, None, None, :].astype(bool)   # [B, 1, 1, Lk]
  impl = resolve_implementation(implementation, q.dtype, dh, lengths=(lq, lk),
                                has_mask=mask is not None)
  # Both paths accumulate logits and run the softmax in float32 for bf16
  # inputs (XLA: preferred_element_type=float32; cuDNN: by construction).
  # BTNH is one of cuDNN's two native layouts: no transpose either way.
  out = jax.nn.dot_product_attention(q, k, v, mask=attn_mask, is_causal=is_causal,
                                     implementation=impl)
  return out.reshape(b, lq, width)


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
