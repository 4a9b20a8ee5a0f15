"""The fused layers against their reference forms: GroupNorm (+ SiLU) with its
written-out gradient against flax's ``nn.GroupNorm`` under autodiff, the frame
conv (a 2-D conv) against flax's 3-D ``nn.Conv``, the train step's global norm
against optax's, and LayerNorm's two-pass variance."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from persvid_jax.models import attention
from persvid_jax.models.attention import GroupNorm
from persvid_jax.models.video_conv import FrameConv
from persvid_jax.train import step as step_lib
from tests.models.grads import assert_grads_close


def _reference_group_norm(variables, x, groups, eps, batch_dims, silu):
  """flax's GroupNorm (statistics over all axes but the first) + SiLU, in float32."""
  lead = x.shape[:batch_dims]
  xr = x.reshape((-1,) + x.shape[batch_dims:])
  y = nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=jnp.float32).apply(variables, xr)
  y = y.reshape(lead + x.shape[batch_dims:])
  return nn.silu(y) if silu else y


@pytest.mark.parametrize("batch_dims", [1, 2])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels", [64, 256])   # 8 and 32 a group: both ways of summing
def test_group_norm_and_its_gradient_match_flax(batch_dims, silu, channels):
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 6, channels)) * 3.0 + 1.5   # |mean| > std
  layer = GroupNorm(8, epsilon=1e-6, batch_dims=batch_dims,
                    activation="silu" if silu else None)
  variables = layer.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape),
                           variables)
  w = jax.random.normal(jax.random.key(3), x.shape)
  ours = lambda v, x: layer.apply(v, x)
  ref = lambda v, x: _reference_group_norm(v, x, 8, 1e-6, batch_dims, silu)
  np.testing.assert_allclose(ours(variables, x), ref(variables, x), atol=2e-6)
  loss = lambda f: lambda v, x: jnp.sum(f(v, x) * w)
  got = jax.grad(loss(ours), (0, 1))(variables, x)
  want = jax.grad(loss(ref), (0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(np.abs(b).max()))


def test_group_norm_casts_and_checks():
  x = jnp.ones((2, 4, 4, 32), jnp.bfloat16)
  layer = GroupNorm(4, batch_dims=1, dtype=jnp.bfloat16)
  v = layer.init(jax.random.key(0), x)
  assert layer.apply(v, x).dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
  with pytest.raises(ValueError, match="not divisible by 5 groups"):
    GroupNorm(5).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown activation 'gelu'"):
    GroupNorm(4, activation="gelu").init(jax.random.key(0), x)


def test_frame_conv_is_flax_3d_conv():
  """Same parameters, same initial values, same outputs and gradients as
  ``nn.Conv`` with kernel (3, 1, 1) and one frame of zero padding."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 4, 3, 8))
  ours = FrameConv(6)
  ref = nn.Conv(6, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)))
  v = ours.init(jax.random.key(1), x)
  v_ref = ref.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, nn.meta.unbox(v)) == jax.tree.map(jnp.shape, v_ref)
  np.testing.assert_array_equal(nn.meta.unbox(v)["params"]["kernel"],
                                v_ref["params"]["kernel"])
  v = jax.tree.map(lambda a: a + 0.1, nn.meta.unbox(v))   # a non-zero bias too
  np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(v, x)),
                  jax.tree.leaves(jax.grad(loss(ref), (0, 1))(v, x))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_global_norm_is_optax_norm_over_the_mask():
  rng = np.random.default_rng(0)
  tree = {"big": jnp.asarray(rng.standard_normal((300, 400)), jnp.float32),
          "conv": jnp.asarray(rng.standard_normal((3, 3, 16, 8)), jnp.bfloat16),
          "bias": jnp.asarray(rng.standard_normal((7,)), jnp.float32),
          "flat": jnp.asarray(rng.standard_normal((70_001,)), jnp.float32),   # a packed buffer
          "frozen": jnp.full((5,), 100.0)}
  mask = {"big": True, "conv": True, "bias": True, "flat": True, "frozen": False}
  norm64 = lambda keys: np.sqrt(sum(np.sum(np.asarray(tree[k], np.float64) ** 2) for k in keys))
  np.testing.assert_allclose(jax.jit(lambda t: step_lib.global_norm(t, mask))(tree),
                             norm64([k for k in tree if mask[k]]), rtol=1e-6)
  np.testing.assert_allclose(step_lib.global_norm(tree), norm64(tree), rtol=1e-6)
  np.testing.assert_allclose(step_lib.global_norm(tree), optax.tree.norm(tree), rtol=1e-4)
  assert float(step_lib.global_norm({"a": jnp.ones(3)}, {"a": False})) == 0.0


def test_layer_norm_uses_the_two_pass_variance():
  """``E[(x - E[x])^2]``: exact where ``E[x^2] - E[x]^2`` cancels (a large mean)."""
  x = 300.0 + jnp.asarray(np.random.default_rng(0).standard_normal((4, 64)), jnp.float32)
  layer = attention.layer_norm(name="n")
  y = layer.apply(layer.init(jax.random.key(0), x), x)
  xd = np.asarray(x, np.float64)
  want = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(y, want, atol=2e-4)   # E[x^2] - E[x]^2: ~1e-2 here


@pytest.mark.parametrize("dtype,mean", [(jnp.float32, 4.0), (jnp.float32, 300.0),
                                        (jnp.bfloat16, 4.0)])
def test_layer_norm_and_its_gradient_match_flax(dtype, mean):
  """``attention.LayerNorm`` (written-out gradient) against ``nn.LayerNorm`` under
  autodiff: the same parameters and forward, the same gradients (float32 inputs:
  to float32 rounding, also where the mean is 150 standard deviations, where
  unshifted one-pass statistics would cancel; bf16 inputs and output: to bf16
  rounding)."""
  x = (jax.random.normal(jax.random.key(0), (3, 5, 48)) * 2.0 + mean).astype(dtype)
  ours = attention.LayerNorm(epsilon=1e-5, dtype=dtype)
  flax_ln = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False)
  variables = nn.meta.unbox(ours.init(jax.random.key(1), x))
  assert jax.tree.structure(variables) == jax.tree.structure(flax_ln.init(jax.random.key(1), x))
  variables = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape),
                           variables)
  f_ours = lambda v, x: ours.apply(v, x)
  f_ref = lambda v, x: flax_ln.apply(v, x).astype(dtype)
  y = f_ours(variables, x)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(f_ref(variables, x),
                                                                       np.float32))
  assert_grads_close(f_ours, f_ref, variables, x, tol=2e-5 if dtype == jnp.float32 else 1e-2)


def test_layer_norm_output_dtype_and_factory():
  x = jnp.ones((2, 16), jnp.bfloat16)
  assert attention.layer_norm(name="n").apply(
      attention.layer_norm(name="n").init(jax.random.key(0), x), x).dtype == jnp.float32
  ln = attention.LayerNorm(dtype=jnp.bfloat16)
  assert ln.apply(ln.init(jax.random.key(0), x), x).dtype == jnp.bfloat16
