"""A pre-LN block's residual add + LayerNorm as Triton kernels (``layer_norm_pallas``,
``attention.add_layer_norm``) against XLA's path.

The kernels run here in Pallas's interpreter (the same kernel bodies, their
masked loads and stores included); that they lower and compile for a GPU is
tested in tests/launch/test_aot.py where jax's CUDA plugin is installed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax.models import attention, layer_norm_pallas
from persvid_jax.models import video_transformer as vt


def _inputs(shape, width, dtype, with_x, with_bias, seed=0):
  k = jax.random.split(jax.random.key(seed), 5)
  r = jax.random.normal(k[0], shape + (width,)).astype(dtype)
  r_bias = 0.3 * jax.random.normal(k[1], (width,)) if with_bias else None
  x = (2.0 * jax.random.normal(k[2], shape + (width,)) + 1.0).astype(dtype) if with_x else None
  scale = 1.0 + 0.2 * jax.random.normal(k[3], (width,))
  bias = 0.1 * jax.random.normal(k[4], (width,))
  return x, r, r_bias, scale, bias


CASES = [((3, 50), 320, True, True),    # 150 rows: a masked last tile; 320 loaded as 512
         ((2, 70), 96, False, False),   # a plain LayerNorm
         ((4, 9), 128, False, True),    # the bias, no stream
         ((2, 3, 11), 640, True, False)]


@pytest.mark.parametrize("shape, width, with_x, with_bias", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_match_xla(shape, width, with_x, with_bias, dtype):
  """Forward ``(s, y)`` and the gradients of all five inputs, through a loss of
  both outputs (the stream's gradient reaches the kernel as ``g``)."""
  args = _inputs(shape, width, dtype, with_x, with_bias)
  k = jax.random.split(jax.random.key(7), 2)
  w_s, w_y = (jax.random.normal(key, shape + (width,)) for key in k)

  def loss(kernel):
    def f(x, r, r_bias, scale, bias):
      s, y = attention.add_layer_norm(x, r, r_bias, scale, bias, 1e-5, dtype, kernel)
      return (jnp.sum(s.astype(jnp.float32) * w_s)
              + jnp.sum(jnp.tanh(y.astype(jnp.float32)) * w_y))
    return f
  given = [i for i, a in enumerate(args) if a is not None]

  def forward(kernel):   # under AD: the kernel's forward (undifferentiated it is XLA's ops)
    def f(*present):
      full = list(args)
      for i, a in zip(given, present):
        full[i] = a
      return attention.add_layer_norm(*full, 1e-5, dtype, kernel)
    return jax.vjp(f, *(args[i] for i in given))[0]
  (s, y), (want_s, want_y) = forward("interpret"), forward("xla")
  assert s.dtype == want_s.dtype and y.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(want_s, np.float32))
  tol = 1e-5 if dtype == jnp.float32 else 2.0 ** -7
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want_y, np.float32),
                             rtol=tol, atol=tol)
  argnums = tuple(given)
  got = jax.grad(loss("interpret"), argnums)(*args)
  want = jax.grad(loss("xla"), argnums)(*args)
  # bf16: ds within a unit in the last place; the sums over rows of such values.
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  for a, b in zip(got, want, strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    b = np.asarray(b, np.float32)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol,
                               atol=tol * float(np.abs(b).max()))


def test_gradient_sums_are_the_column_sums():
  """Not vacuous: the three per-program sums are those of ``dy``, ``dy * x_hat``
  and ``ds`` over the rows (with 2 programs' rows here)."""
  _, s, _, scale, _ = _inputs((300,), 320, jnp.float32, False, False)
  dy, g = (jax.random.normal(jax.random.key(i), s.shape) for i in (1, 2))
  ds, sums = layer_norm_pallas.add_layer_norm_bwd(s, dy, g, scale, 1e-5, interpret=True)
  assert sums.shape == (-(-300 // layer_norm_pallas.grad_span(300, 320)), 3, 320)
  x_hat = (s - s.mean(-1, keepdims=True)) / jnp.sqrt(s.var(-1, keepdims=True) + 1e-5)
  for got, want in zip(sums.sum(0), (dy.sum(0), (dy * x_hat).sum(0), ds.sum(0))):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
  assert float(jnp.abs(ds - g).max()) > 0.1          # the LayerNorm's part is there


@pytest.mark.parametrize("rows, width", [(65536, 320), (16384, 640), (4096, 1280), (7, 96)])
def test_tiles_and_spans(rows, width):
  tile = layer_norm_pallas.tile_rows(width)
  span = layer_norm_pallas.grad_span(rows, width)
  assert tile & (tile - 1) == 0 and tile * layer_norm_pallas.pl.next_power_of_2(width) <= 4096
  assert span % tile == 0 and span >= 64 and -(-rows // span) <= 256


def test_undifferentiated_it_is_xlas_ops():
  """Sampling (no gradient) runs XLA's ops, which fuse the add into the next
  GEMM; the kernels only where the gradient is taken."""
  args = _inputs((4, 8), 128, jnp.float32, True, True)
  f = lambda *a: attention.add_layer_norm(*a, 1e-5, jnp.float32, "pallas")
  assert "pallas_call" not in str(jax.make_jaxpr(f)(*args))
  assert "pallas_call" in str(jax.make_jaxpr(lambda *a: jax.vjp(f, *a)[0])(*args))


@pytest.mark.parametrize("norm, calls", [("pallas", 3), ("xla", 0)])
def test_block_takes_norm_impl(norm, calls):
  """A transformer block's three LayerNorms follow ``norm_impl`` in training:
  three forward kernels and three gradient kernels, or none; the parameters are
  the same."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 64))
  block = lambda impl: vt.BasicTransformerBlock(2, 32, norm_impl=impl)
  variables = nn.meta.unbox(block("xla").init(jax.random.key(1), x))
  names = jax.tree_util.tree_flatten_with_path(variables)[0]
  paths = {"/".join(str(getattr(k, "key", k)) for k in p) for p, _ in names}
  assert {"params/norm2/scale", "params/attn1/to_out_0/bias",
          "params/attn1/to_out_0/kernel"} <= paths
  grad = jax.grad(lambda v, x: jnp.sum(block(norm).apply(v, x)), (0, 1))
  jaxpr = str(jax.make_jaxpr(grad)(variables, x))
  backward = jaxpr.count("name=add_layer_norm_bwd")
  assert jaxpr.count("name=add_layer_norm") - backward == calls and backward == calls


def test_runs_per_batch_shard_under_a_mesh():
  """Under the trainer's mesh each device runs its own rows (the bias and norm
  gradients' sums by program, added after): the same values as XLA's path."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from persvid_jax import sharding as sh
  mesh = sh.make_mesh(data=2, fsdp=2)
  x, r, r_bias, scale, bias = _inputs((8, 12), 128, jnp.float32, True, True)
  w = jax.random.normal(jax.random.key(5), r.shape)

  def grads(kernel):
    def f(x, r, r_bias, scale, bias):
      s, y = attention.add_layer_norm(x, r, r_bias, scale, bias, 1e-5, jnp.float32, kernel)
      return jnp.sum(s * w) + jnp.sum(jnp.sin(y) * w)
    return jax.jit(jax.grad(f, (0, 1, 2, 3, 4)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sh.LOGICAL_RULES):
    spec = NamedSharding(mesh, P((sh.DATA, sh.FSDP)))
    xs, rs = jax.device_put(x, spec), jax.device_put(r, spec)
    got, want = grads("interpret")(xs, rs, r_bias, scale, bias), grads("xla")(
        xs, rs, r_bias, scale, bias)
    assert "all-gather" not in grads("interpret").lower(xs, rs, r_bias, scale, bias).as_text()
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
