"""The feed-forward's GEGLU with its written-out gradient against diffusers' form
(``nn.Dense`` then ``hidden * gelu(gate)``) under autodiff."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax.models import video_transformer as vt
from tests.models.grads import assert_grads_close


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
  # bf16: ours computes the GELU's derivative in float32 and rounds once, the
  # reference rounds each step in bf16: equal to bf16 noise.
  assert_grads_close(ours, ref, variables, x, tol=1e-5 if dtype == jnp.float32 else 3e-2)
