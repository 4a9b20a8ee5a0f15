"""GEGLU's gradient as one Triton kernel (``geglu_pallas``) against XLA's.

The kernel runs here in Pallas's interpreter (the same kernel body, its masked
loads and stores included); that it lowers and compiles for a GPU is tested in
tests/launch/test_aot.py where jax's CUDA plugin is installed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax.models import attention, geglu_pallas
from persvid_jax.models import video_transformer as vt


def _inputs(shape, features, dtype, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  y = (2.0 * jax.random.normal(k[0], shape + (2 * features,))).astype(dtype)
  bias = (0.5 * jax.random.normal(k[1], (2 * features,))).astype(dtype)
  dy = jax.random.normal(k[2], shape + (features,)).astype(dtype)
  return y, bias, dy


@pytest.mark.parametrize("shape, features", [
    ((3, 50), 128),      # 150 rows: the last tile of 32 masked
    ((70,), 256),        # two column blocks
    ((2, 8, 64), 128),   # 1,024 rows: several programs' chunks
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_matches_xla(shape, features, dtype):
  y, bias, dy = _inputs(shape, features, dtype)
  dh, sums = geglu_pallas.geglu_bwd(y, dy, bias, interpret=True)
  want_dh, want_db = vt._geglu_bwd_xla((y, bias), dy)
  rows = int(np.prod(shape))
  assert dh.dtype == y.dtype and dh.shape == y.shape
  assert sums.shape == (-(-rows // geglu_pallas.chunk(rows, features)), 2 * features)
  # float32: the CDF's approximation and rounding apart; bf16: one unit in the last place.
  tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -7
  got, want = np.asarray(dh, np.float32), np.asarray(want_dh, np.float32)
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
  # The bias gradient sums what was written: a few bf16 roundings may differ.
  want_db = np.asarray(want_db, np.float32)
  np.testing.assert_allclose(np.asarray(sums.sum(0)), want_db, rtol=tol,
                             atol=tol * np.abs(want_db).max() * (4 if dtype == jnp.bfloat16 else 1))


def test_the_two_halves_are_not_swapped():
  """Not vacuous: a gate far below 0 closes its unit (d hidden = 0 there), a
  hidden half at 0 gives no gate gradient; the bias gradient sums each column."""
  y, bias, dy = _inputs((4, 32), 128, jnp.float32)
  y = y.at[..., 128 + 5].set(-30.0).at[..., 7].set(0.0)
  bias = bias.at[128 + 5].set(0.0).at[7].set(0.0)
  dh, sums = geglu_pallas.geglu_bwd(y, dy, bias, interpret=True)
  assert float(jnp.abs(dh[..., 5]).max()) == 0.0            # gelu(-30) = 0
  assert float(jnp.abs(dh[..., 128 + 7]).max()) == 0.0      # hidden = 0
  assert float(jnp.abs(dh[..., 128 + 6]).min()) > 0.0
  np.testing.assert_allclose(sums.sum(0), dh.reshape(-1, 256).sum(0), rtol=1e-5, atol=1e-4)


def test_normal_cdf_and_density():
  g = jnp.linspace(-9.0, 9.0, 20001)
  cdf, pdf = geglu_pallas.normal_cdf_pdf(g)
  np.testing.assert_allclose(cdf, jax.scipy.stats.norm.cdf(g), rtol=0, atol=3e-7)
  np.testing.assert_allclose(pdf, jax.scipy.stats.norm.pdf(g), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("rows, features", [(65536, 1280), (16384, 2560), (4096, 5120),
                                            (1024, 5120), (40, 128)])
def test_chunk(rows, features):
  c = geglu_pallas.chunk(rows, features)
  programs = -(-rows // c) * (features // 128)
  assert c & (c - 1) == 0 and 32 <= c <= 1024
  assert c == 32 or programs >= 256, "shorter chunks only while the grid is narrow"
  assert c == 1024 or -(-rows // (2 * c)) * (features // 128) < 256, "the longest that keeps it wide"


@pytest.mark.parametrize("features, kernel", [(128, True), (24, False)])
def test_feed_forward_takes_its_norm_impl(features, kernel):
  """``GEGLUFeedForward(norm_impl='pallas')``: one kernel in the gradient where F
  is a multiple of 128, XLA's pass otherwise (traced here; its values are
  ``vt.geglu``'s with 'interpret', tested above and below)."""
  x = jax.random.normal(jax.random.key(0), (2, 40, features // 4))
  ff = lambda impl: vt.GEGLUFeedForward(norm_impl=impl)
  variables = nn.meta.unbox(ff("xla").init(jax.random.key(1), x))
  for impl, calls in (("pallas", int(kernel)), ("xla", 0), ("auto", 0)):   # 'auto': XLA here
    grad = jax.grad(lambda v, x: jnp.sum(ff(impl).apply(v, x)), (0, 1))
    assert str(jax.make_jaxpr(grad)(variables, x)).count("name=geglu_bwd") == calls, impl


def test_norm_impl_pallas_reaches_every_transformer_block():
  """``config.norm_impl='pallas'``: the generator's train-step gradient holds one
  GEGLU kernel per transformer block whose F fits (traced on this CPU)."""
  from persvid_jax import config_lib
  from persvid_jax.models.stack import ModelStack
  stack = ModelStack.from_config(config_lib.load_config("tiny:norm=pallas"))
  args, kwargs = stack.example_inputs()["unet"]
  variables = jax.eval_shape(lambda: stack.unet.init(jax.random.key(0), *args, **kwargs))
  blocks = []

  def count(f, args, kwargs, context):
    if isinstance(context.module, vt.GEGLU) and context.method_name == "__call__":
      blocks.append(context.module.features)
    return f(*args, **kwargs)
  loss = lambda v: jnp.sum(stack.unet.apply(v, *args, **kwargs).astype(jnp.float32))
  with nn.intercept_methods(count):
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(variables))
  fitting = sum(f % 128 == 0 for f in blocks)
  assert len(blocks) > 3 and fitting > 0
  assert jaxpr.count("name=geglu_bwd") == fitting


def test_kernel_runs_per_batch_shard_under_a_mesh():
  """Under a mesh of several devices the kernel runs on each device's rows (the
  bias gradient's sums by chunk, added after): same gradients as XLA's path."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from persvid_jax import sharding as sh
  mesh = sh.make_mesh(data=2, fsdp=2)   # the trainer's mesh (axes of the Auto type)
  y, bias, dy = _inputs((8, 24), 128, jnp.float32)

  def grads(impl):
    return jax.jit(jax.grad(lambda y, b: jnp.sum(vt.geglu(y, b, impl) * dy), (0, 1)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sh.LOGICAL_RULES):
    ys = jax.device_put(y, NamedSharding(mesh, P((sh.DATA, sh.FSDP))))
    got, want = grads("interpret")(ys, bias), grads("xla")(ys, bias)
    assert got[0].sharding.spec[0] == (sh.DATA, sh.FSDP)
    assert "all-gather" not in grads("interpret").lower(ys, bias).as_text()
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
