"""The feed-forward's GEGLU with its written-out gradient against diffusers' form
(``nn.Dense`` then ``hidden * gelu(gate)``) under autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax.models import video_transformer as vt


def _reference(variables, x, features, dtype):
  """diffusers' GEGLU: the projection with its bias, split, exact GELU."""
  h = nn.Dense(2 * features, dtype=dtype).apply({"params": variables["params"]["proj"]}, x)
  hidden, gate = jnp.split(h, 2, axis=-1)
  return hidden * jax.nn.gelu(gate, approximate=False)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_geglu_and_its_gradient_match_the_reference(dtype):
  features = 24
  x = jax.random.normal(jax.random.key(0), (2, 7, 16))
  layer = vt.GEGLU(features, dtype=dtype)
  variables = nn.meta.unbox(layer.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, variables) == {
      "params": {"proj": {"kernel": (16, 2 * features), "bias": (2 * features,)}}}
  variables = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(jax.random.key(2), a.shape),
                           variables)
  ours = lambda v, x: layer.apply(v, x)
  ref = lambda v, x: _reference(v, x, features, dtype)
  y = ours(variables, x)
  assert y.dtype == dtype and y.shape == (2, 7, features)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref(variables, x),
                                                                      np.float32))
  w = jax.random.normal(jax.random.key(3), y.shape)
  loss = lambda f: lambda v, x: jnp.sum(f(v, x).astype(jnp.float32) * w)
  got = jax.grad(loss(ours), (0, 1))(variables, x)
  want = jax.grad(loss(ref), (0, 1))(variables, x)
  # bf16: ours computes the GELU's derivative in float32 and rounds once, the
  # reference rounds each step in bf16: equal to bf16 noise.
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol * float(np.abs(np.asarray(b, np.float32)).max()))
