"""Which attention kernel runs: ``attention_impl='auto'`` picks cuDNN where it applies.

cuDNN cannot run on this CPU, so the GPU decision is tested by pretending the
probe found it (``cudnn_available``) and recording what every attention call of
a network would ask jax for, with the call itself done by XLA.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax import bench, config_lib
from persvid_jax.models import attention
from persvid_jax.models.text_encoder import TextEncoder
from persvid_jax.models.unet3d import UNet3D


@pytest.fixture
def on_a_cudnn_gpu(monkeypatch):
  """Pretend cuDNN is there; returns the list of (head_dim, dtype, has_mask, choice,
  (Lq, Lk)) of every call."""
  calls = []
  real = attention.resolve_implementation
  monkeypatch.setattr(attention, "cudnn_available", lambda: True)

  def recording(implementation, dtype, head_dim, *, lengths, has_mask=False):
    choice = real(implementation, dtype, head_dim, lengths=lengths, has_mask=has_mask)
    calls.append((head_dim, jnp.dtype(dtype).name, has_mask, choice, lengths))
    return None   # XLA does the work: cuDNN cannot run here
  monkeypatch.setattr(attention, "resolve_implementation", recording)
  return calls


def test_the_cpu_has_no_cudnn_and_auto_is_xla():
  assert not attention.cudnn_available()
  assert attention.resolve_implementation("auto", jnp.bfloat16, 64, lengths=(64, 64)) is None


@pytest.mark.parametrize("capability, lowered", [("7.5", False), ("7.0", False), (None, False),
                                                 ("9.0", True), ("8.0", True)])
def test_gpus_before_ampere_are_not_probed(monkeypatch, capability, lowered):
  """A T4 (7.5) or V100 (7.0) is answered 'no' before the probe; Ampere and
  newer are probed (here the probe itself fails: no cuDNN on a CPU)."""
  class Device:
    compute_capability = capability
  probed = []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax, "devices", lambda *a: [Device()])
  monkeypatch.setattr(jax, "jit", lambda *a, **k: probed.append(1) or jax.numpy.asarray)
  attention.cudnn_available.cache_clear()
  try:
    assert attention.cudnn_available() is False
  finally:
    attention.cudnn_available.cache_clear()
  assert bool(probed) == lowered


@pytest.mark.parametrize("impl, dtype, head_dim, lengths, mask, want", [
    ("auto", jnp.bfloat16, 64, (1024, 1024), False, "cudnn"),
    ("auto", jnp.float16, 128, (16, 16), False, "cudnn"),
    ("auto", jnp.bfloat16, 40, (4096, 78), False, "cudnn"),
    ("auto", jnp.float32, 64, (1024, 1024), False, None),   # cuDNN's kernel is bf16/fp16 only
    ("auto", jnp.bfloat16, 12, (1024, 1024), False, None),  # not a multiple of 8
    ("auto", jnp.bfloat16, 512, (1024, 1024), False, None), # the VAE's one wide head
    ("auto", jnp.bfloat16, 64, (1024, 1024), True, None),   # a mask would become a bias tensor
    ("auto", jnp.bfloat16, 64, (1024, 77), False, "cudnn"), # odd keys: padded to 78, masked
    ("auto", jnp.bfloat16, 64, (15, 15), False, None),      # odd queries: jax's cuDNN VJP
                                                            # refuses them (15 frames)
    ("xla", jnp.bfloat16, 64, (1024, 1024), False, None),
    (None, jnp.bfloat16, 64, (1024, 1024), False, None),
    ("cudnn", jnp.float32, 64, (1024, 77), False, "cudnn"), # asked for: jax then says why not
])
def test_auto_rule(monkeypatch, impl, dtype, head_dim, lengths, mask, want):
  monkeypatch.setattr(attention, "cudnn_available", lambda: True)
  assert attention.resolve_implementation(impl, dtype, head_dim, lengths=lengths,
                                          has_mask=mask) == want


def test_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match="'flash'; use one of auto, xla, cudnn"):
    attention.resolve_implementation("flash", jnp.bfloat16, 64, lengths=(64, 64))


@pytest.mark.parametrize("option, field", [("attention", "attention_impl"),
                                           ("norm", "norm_impl")])
def test_unknown_kernel_option_is_refused(option, field):
  """The attention and GroupNorm kernels: a bad variant or config field is one
  ConfigError, before any model is built."""
  with pytest.raises(config_lib.ConfigError, match=f"{option}='flash'"):
    config_lib.load_config(f"tiny:{option}=flash")
  config = config_lib.load_config("tiny")
  config[field] = "flash"   # as --config.FIELD=flash would
  with pytest.raises(config_lib.ConfigError, match=f"config.{field}='flash'"):
    config_lib.check_train_config(config, paths=False)


def test_every_generator_attention_takes_cudnn_at_the_issue_layout(on_a_cudnn_gpu):
  """The benchmark's ModelScope generator (bf16, 64-wide heads): on a GPU every
  attention of its forward pass is cuDNN's, the 77-token text cross-attention
  included (its keys padded to 78; traced abstractly, no weights)."""
  config = config_lib.load_config("modelscope")
  assert config.attention_impl == "auto" and config.dtype == "bfloat16"
  unet = UNet3D.from_config(bench.bench_unet_config(config), dtype=config.dtype,
                            param_dtype=config.param_dtype,
                            attention_impl=config.attention_impl)
  x = jax.ShapeDtypeStruct((2, 16, 32, 32, 4), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  ctx = jax.ShapeDtypeStruct((2, 77, 1024), jnp.float32)
  params = jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx)
  on_a_cudnn_gpu.clear()
  jax.eval_shape(lambda p, *a: unet.apply(nn.meta.unbox(p), *a), params, x, t, ctx)
  # 16 spatial transformers (self + cross) + 16 temporal ones and transformer_in,
  # each two self-attentions over the frames (diffusers' double_self_attention).
  assert len(on_a_cudnn_gpu) == 16 * 2 + 17 * 2, len(on_a_cudnn_gpu)
  cross = [c for c in on_a_cudnn_gpu if c[4][1] == 77]
  assert len(cross) == 16, cross
  assert {(c[0], c[1], c[3]) for c in on_a_cudnn_gpu} == {(64, "bfloat16", "cudnn")}


@pytest.mark.parametrize("lk", [77, 5])
def test_odd_keys_are_padded_and_masked_for_cudnn(monkeypatch, lk):
  """cuDNN's path pads an odd key length by one and hides the pad with its padding
  mask (``key_value_seq_lengths``); run here by XLA's kernel with the same
  arguments, forward and gradients equal the unpadded attention's."""
  real = jax.nn.dot_product_attention
  seen = []

  def as_xla(q, k, v, **kw):
    seen.append((k.shape[1], kw["key_value_seq_lengths"], kw["implementation"]))
    return real(q, k, v, **{**kw, "implementation": None})
  monkeypatch.setattr(jax.nn, "dot_product_attention", as_xla)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3 * 8)), jnp.float32)
             for n in (6, lk, lk))
  f = lambda impl: (lambda q, k, v: attention.dot_product_attention(
      q, k, v, num_heads=3, implementation=impl))
  padded, plain = f("cudnn"), f("xla")
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), rtol=1e-6, atol=1e-6)
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a)))
  for a, b in zip(jax.grad(loss(padded), (0, 1, 2))(q, k, v),
                  jax.grad(loss(plain), (0, 1, 2))(q, k, v)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert seen[0][0] == lk + 1 and seen[0][2] == "cudnn"
  np.testing.assert_array_equal(seen[0][1], [lk, lk])


def test_float32_stays_on_xla_and_auto_equals_xla_on_cpu(on_a_cudnn_gpu):
  """The tiny text encoder in float32 asks for XLA even on a cuDNN GPU; and on
  this CPU 'auto' computes exactly what 'xla' does."""
  config = config_lib.load_config("tiny")
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 500, (2, 16)), jnp.int32)
  outs = {}
  for impl in ("auto", "xla"):
    enc = TextEncoder.from_config(config.text, eos_token_id=1, attention_impl=impl)
    params = enc.init(jax.random.key(0), ids)
    outs[impl] = enc.apply(params, ids)[0]
  assert {c[3] for c in on_a_cudnn_gpu} == {None}
  np.testing.assert_array_equal(outs["auto"], outs["xla"])
