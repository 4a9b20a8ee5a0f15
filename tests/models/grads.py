"""One check for the tests of hand-written gradients (``custom_vjp`` layers)."""

import jax
import jax.numpy as jnp
import numpy as np


def assert_grads_close(ours, ref, variables, x, *, tol: float, seed: int = 3) -> None:
  """d/d(variables, x) of ``sum(f(variables, x) * w)`` (``w`` random, the shape of the
  output) for ``f`` = ``ours`` and ``ref``: the same dtypes, and equal within ``tol``
  relative, ``tol`` times the largest reference gradient absolute."""
  w = jax.random.normal(jax.random.key(seed), jax.eval_shape(ours, variables, x).shape)
  loss = lambda f: lambda v, x: jnp.sum(f(v, x).astype(jnp.float32) * w)  # noqa: E731
  got = jax.grad(loss(ours), (0, 1))(variables, x)
  want = jax.grad(loss(ref), (0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype
    b32 = np.asarray(b, np.float32)
    np.testing.assert_allclose(np.asarray(a, np.float32), b32, rtol=tol,
                               atol=tol * float(np.abs(b32).max()))
