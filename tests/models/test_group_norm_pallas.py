"""The Triton GroupNorm kernel (``group_norm_pallas``) against XLA's GroupNorm.

The kernel runs here in Pallas's interpreter (the same kernel body, its masked
loads and stores included); that it lowers and compiles for a GPU is tested in
tests/launch/test_aot.py where jax's CUDA plugin is installed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax.models import attention, group_norm_pallas
from persvid_jax.models.attention import GroupNorm


def _inputs(shape, dtype=jnp.bfloat16, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  c = shape[-1]
  x = (jax.random.normal(k[0], shape) * 3.0 + 1.5).astype(dtype)    # |mean| > std
  return x, 1.0 + 0.3 * jax.random.normal(k[1], (c,)), 0.3 * jax.random.normal(k[2], (c,))


@pytest.mark.parametrize("shape, batch_dims, groups", [
    ((2, 3, 6, 10, 320), 2, 32),    # per frame, 10 channels a group (loaded as 16)
    ((2, 3, 5, 7, 64), 1, 32),      # a whole video, 2 a group; 105 rows: the last tile masked
    ((4, 100, 24), 1, 8),           # 3 a group
    ((3, 2, 4, 4, 256), 2, 8),      # 32 a group, several groups a program
])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_matches_xla(shape, batch_dims, groups, silu, dtype):
  x, scale, bias = _inputs(shape)
  y, mean, rstd = group_norm_pallas.group_norm_silu_fwd(
      x, scale, bias, groups, 1e-5, batch_dims, silu, dtype, interpret=True)
  want, (_, _, _, want_mean, want_rstd, _) = attention._group_norm_fwd(
      x, scale, bias, groups, 1e-5, batch_dims, silu, dtype)
  assert y.dtype == jnp.dtype(dtype) and y.shape == x.shape
  assert mean.shape == rstd.shape == shape[:batch_dims] + (groups,)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(rstd, want_rstd, rtol=1e-5)   # sums in another order
  # float32: rounding apart; bf16: at most one unit in the last place.
  tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -7
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32),
                             rtol=tol, atol=tol)


def test_kernel_differs_where_the_statistics_differ():
  """Not vacuous: a group's statistics come from its own channels only."""
  x, scale, bias = _inputs((2, 16, 64))
  x = x.at[:, :, :8].add(20.0)                         # the first group only
  y, mean, _ = group_norm_pallas.group_norm_silu_fwd(x, scale, bias, 8, 1e-5, 1, False,
                                                      jnp.float32, interpret=True)
  _, (_, _, _, want_mean, _, _) = attention._group_norm_fwd(x, scale, bias, 8, 1e-5, 1, False,
                                                         jnp.float32)
  np.testing.assert_allclose(mean, want_mean, rtol=1e-6)
  assert float(jnp.abs(mean[:, 0]).min()) > 5 * float(jnp.abs(mean[:, 1:]).max())


@pytest.mark.parametrize("shape, batch_dims, groups, silu", [
    ((2, 3, 4, 4, 64), 2, 8, True),      # per frame, 8 channels a group
    ((2, 3, 5, 7, 96), 1, 32, True),     # a whole video, 3 a group, a masked last tile
    ((2, 3, 4, 4, 320), 2, 32, False),   # 10 a group, no SiLU
])
def test_gradient_kernel_matches_xla(shape, batch_dims, groups, silu):
  """The backward kernel (the sums of dz and dz * x_hat, then dx) and the
  scale / bias gradients from its sums: equal to the all-XLA gradient."""
  x, scale, bias = _inputs(shape, jnp.float32)
  w = jax.random.normal(jax.random.key(9), x.shape)

  def loss(kernel):
    return lambda x, s, b: jnp.sum(
        attention.group_norm_silu(x, s, b, groups, 1e-6, batch_dims, silu, jnp.float32,
                                  kernel) * w)
  got = jax.grad(loss("interpret"), (0, 1, 2))(x, scale, bias)
  want = jax.grad(loss("xla"), (0, 1, 2))(x, scale, bias)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_gradient_kernel_in_bf16():
  """bf16 activations and output gradient: ``dx`` in bf16 within its rounding."""
  x, scale, bias = _inputs((2, 3, 4, 4, 320))
  dy = jax.random.normal(jax.random.key(5), x.shape).astype(jnp.bfloat16)
  _, (_, _, _, mean, rstd, _) = attention._group_norm_fwd(x, scale, bias, 32, 1e-6, 2, True,
                                                       jnp.bfloat16)
  got = attention._group_norm_bwd(32, 1e-6, 2, True, jnp.bfloat16, "interpret", 0.0,
                                  (x, scale, bias, mean, rstd, None), dy)[:3]
  want = attention._group_norm_bwd(32, 1e-6, 2, True, jnp.bfloat16, "xla", 0.0,
                                   (x, scale, bias, mean, rstd, None), dy)[:3]
  assert got[0].dtype == jnp.bfloat16
  for a, b in zip(got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=2.0 ** -7, atol=2.0 ** -7 * float(np.abs(b).max()))


@pytest.mark.parametrize("samples, length, groups, width", [
    (32, 1024, 32, 10), (2, 16384, 32, 20), (32, 256, 32, 40), (1, 7, 4, 3), (512, 64, 32, 8)])
def test_tiles(samples, length, groups, width):
  gb, rows = group_norm_pallas.tiles(samples, length, groups, width)
  assert groups % gb == 0 and gb * width <= 256
  programs = samples * groups // gb
  assert gb == 1 or programs >= 256, "more groups a program only while the grid stays wide"
  assert groups % (2 * gb) or programs // 2 < 256 or 2 * gb * width > 256, "gb is the largest"
  padded = gb * group_norm_pallas.pl.next_power_of_2(width)
  assert rows & (rows - 1) == 0 and rows * padded <= 4096
  assert rows <= group_norm_pallas.pl.next_power_of_2(length)


def test_auto_picks_the_kernel_where_cudnn_runs(monkeypatch):
  assert attention.resolve_group_norm("auto") == "xla"       # this CPU
  assert attention.resolve_group_norm(None) == "xla"
  with attention.assume_cudnn(True):
    assert attention.resolve_group_norm("auto") == "pallas"
    assert attention.resolve_group_norm("xla") == "xla"
  assert attention.resolve_group_norm("pallas") == "pallas"
  with pytest.raises(ValueError, match="GroupNorm implementation 'triton'; use one of auto"):
    attention.resolve_group_norm("triton")
  with pytest.raises(ValueError, match="GroupNorm implementation 'fast'"):
    GroupNorm(4, implementation="fast").init(jax.random.key(0), jnp.ones((1, 4, 8)))
  # A jax without Pallas's Triton backend (deprecated from 0.11): XLA's, or a clear refusal.
  monkeypatch.setattr(group_norm_pallas, "plgpu", None)
  with attention.assume_cudnn(True):
    assert attention.resolve_group_norm("auto") == "xla"
  with pytest.raises(ValueError, match="needs Pallas's Triton backend"):
    attention.resolve_group_norm("pallas")


@pytest.mark.parametrize("norm, kernels", [("pallas", True), ("xla", False), ("auto", False)])
def test_every_generator_group_norm_takes_the_configs_implementation(norm, kernels):
  """``config.norm_impl`` reaches every GroupNorm of both generators (traced on
  this CPU, where 'auto' is XLA's): one Pallas call per GroupNorm, or none."""
  from flax import linen as nn
  from persvid_jax import config_lib
  from persvid_jax.models.stack import ModelStack
  stack = ModelStack.from_config(config_lib.load_config(f"tiny:norm={norm}"))
  for net in (stack.unet, stack.sr_unet):
    args, kwargs = stack.example_inputs()["sr_unet" if net is stack.sr_unet else "unet"]
    calls = []

    def count(f, args, kwargs, context):
      if isinstance(context.module, GroupNorm) and context.method_name == "__call__":
        calls.append(context.module.implementation)
      return f(*args, **kwargs)
    with nn.intercept_methods(count):
      jaxpr = jax.make_jaxpr(lambda: net.init(jax.random.key(0), *args, **kwargs))()
    assert len(calls) > 10 and set(calls) == {norm}
    assert str(jaxpr).count("pallas_call") == (len(calls) if kernels else 0)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_kernel_runs_per_batch_shard_under_a_mesh(rate):
  """Under a mesh of several devices the kernel (a custom call XLA cannot
  partition) runs on each device's samples: same values and gradient as XLA's
  path (with dropout: the same masks, each sample's from its own seed), the
  output still split by batch, no gather of the input."""
  from flax import linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  from persvid_jax import sharding as sh
  mesh = sh.make_mesh(data=2, fsdp=2)   # the trainer's mesh (axes of the Auto type)
  x, scale, bias = _inputs((4, 2, 4, 4, 64), jnp.float32)
  seeds = _seeds((4, 2)) if rate else None

  def f(kernel):
    return jax.jit(lambda x: attention.group_norm_silu(x, scale, bias, 8, 1e-6, 2, True,
                                                       jnp.float32, kernel, rate, seeds))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sh.LOGICAL_RULES):
    xs = jax.device_put(x, NamedSharding(mesh, P((sh.DATA, sh.FSDP))))
    y, want = f("interpret")(xs), f("xla")(xs)
    assert y.sharding.spec[0] == (sh.DATA, sh.FSDP)
    assert "all-gather" not in f("interpret").lower(xs).as_text()
    grad = lambda k: jax.grad(lambda x: jnp.sum(f(k)(x) ** 2))(xs)
    got_grad, want_grad = grad("interpret"), grad("xla")
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4)


# Dropout inside the norm (the temporal convolutions').

def _seeds(shape, seed=7):
  return jax.random.bits(jax.random.key(seed), shape, jnp.uint32)


@pytest.mark.parametrize("shape, batch_dims, groups", [
    ((2, 3, 5, 7, 64), 1, 32),      # a whole video, a masked last tile
    ((2, 3, 4, 4, 320), 2, 32),     # per frame, 10 channels a group
])
def test_dropout_kernel_draws_xlas_mask_and_its_gradient(shape, batch_dims, groups):
  """With dropout the kernels draw the same mask as XLA's path (the same hash of
  seed and index), forward and in the gradient."""
  x, scale, bias = _inputs(shape, jnp.float32)
  seeds = _seeds(shape[:batch_dims])
  w = jax.random.normal(jax.random.key(9), x.shape)
  f = lambda kernel: lambda x, s, b: attention.group_norm_silu(
      x, s, b, groups, 1e-6, batch_dims, True, jnp.float32, kernel, 0.25, seeds)
  y, want = f("interpret")(x, scale, bias), f("xla")(x, scale, bias)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  dropped = np.asarray(want) == 0
  assert 0.2 < dropped.mean() < 0.3
  np.testing.assert_array_equal(np.asarray(y) == 0, dropped)
  loss = lambda kernel: lambda *a: jnp.sum(f(kernel)(*a) * w)
  got = jax.grad(loss("interpret"), (0, 1, 2))(x, scale, bias)
  ref = jax.grad(loss("xla"), (0, 1, 2))(x, scale, bias)
  for a, b in zip(got, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_dropout_is_dropout():
  """Kept elements are the norm's output over (1 - rate); the masks differ by
  sample and by seed, P(keep) = 1 - rate; the gradient is 0 where dropped and
  equals autodiff of the masked, rescaled norm elsewhere."""
  x, scale, bias = _inputs((4, 8, 16, 16, 64), jnp.float32)
  rate = 0.1
  plain = attention.group_norm_silu(x, scale, bias, 32, 1e-6, 1, True, jnp.float32)
  y = attention.group_norm_silu(x, scale, bias, 32, 1e-6, 1, True, jnp.float32, "xla", rate,
                                _seeds((4,)))
  kept = np.asarray(y) != 0
  assert abs(kept.mean() - (1 - rate)) < 0.005
  np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(plain)[kept] / (1 - rate),
                             rtol=1e-6)
  assert (kept[0] != kept[1]).mean() > 0.1                 # samples differ
  other = attention.group_norm_silu(x, scale, bias, 32, 1e-6, 1, True, jnp.float32, "xla", rate,
                                    _seeds((4,), seed=8))
  assert (kept != (np.asarray(other) != 0)).mean() > 0.1    # seeds differ
  mask = jnp.asarray(kept, jnp.float32) / (1 - rate)
  w = jax.random.normal(jax.random.key(3), x.shape)
  got = jax.grad(lambda x: jnp.sum(attention.group_norm_silu(
      x, scale, bias, 32, 1e-6, 1, True, jnp.float32, "xla", rate, _seeds((4,))) * w))(x)
  want = jax.grad(lambda x: jnp.sum(attention.group_norm_silu(
      x, scale, bias, 32, 1e-6, 1, True, jnp.float32) * mask * w))(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_group_norm_module_dropout_uses_the_dropout_rng():
  from flax import linen as nn
  x, _, _ = _inputs((2, 4, 4, 4, 32), jnp.float32)
  norm = GroupNorm(8, batch_dims=1, activation="silu", dropout=0.5)
  variables = nn.meta.unbox(norm.init(jax.random.key(0), x))
  det = norm.apply(variables, x)
  np.testing.assert_array_equal(det, norm.apply(variables, x, deterministic=True))
  assert float((det == 0).mean()) < 0.01
  a = norm.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  b = norm.apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
  assert 0.4 < float((a == 0).mean()) < 0.6 and bool(jnp.any((a == 0) != (b == 0)))
  with pytest.raises(Exception, match="dropout"):
    norm.apply(variables, x, deterministic=False)            # no 'dropout' RNG given
