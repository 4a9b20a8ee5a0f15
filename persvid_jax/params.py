"""Parameter trees as flat ``{'a/b/leaf': array}`` dicts, and a strict layout check.

Exported models (safetensors), converted checkpoints (``convert``) and loaded
models (``pipeline.model``) all name a leaf by its '/'-joined path and must
match the code's abstract init exactly. One implementation of that match, so
that every loader reports a mismatch the same way: how many leaves are
missing, unexpected or of the wrong shape, with the first few named.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def flatten(tree: Mapping, prefix: str = "",
            leaf_fn: Callable[[Any], Any] | None = None) -> dict[str, Any]:
  """Nested mapping of leaves -> ``{'prefix/a/b/leaf': leaf_fn(leaf)}``.

  Args:
    tree: nested dicts (or any mapping with ``items``), e.g. flax params.
    prefix: prepended to every path (e.g. the network's name).
    leaf_fn: applied to each leaf (e.g. ``np.asarray``); None keeps it as is.
  """
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping) or hasattr(value, "items"):
      out.update(flatten(value, path, leaf_fn))
    else:
      out[path] = value if leaf_fn is None else leaf_fn(value)
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """``{'a/b/leaf': x}`` -> nested dicts (the inverse of ``flatten``)."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def mismatches(expected: Mapping[str, tuple], got: Mapping[str, tuple], *,
               names: Mapping[str, str] | None = None, limit: int = 8) -> list[str]:
  """What keeps ``got`` from matching ``expected`` (both ``{path: shape}``).

  Args:
    names: optional display names of ``got``'s paths (e.g. the source
      checkpoint's tensor name), shown as ``'name -> path'``.
    limit: paths listed per kind; the rest are counted.

  Returns:
    One string per kind of problem, e.g. ``['1 missing: unet/conv_in/bias',
    '2 wrong shape: a/kernel: (3, 3) != (3, 4), ...']``; empty when they match.
  """
  names = names or {}
  show = lambda k: f"{names[k]} -> {k}" if k in names else k
  kinds = (
      ("missing", sorted(set(expected) - set(got))),
      ("unexpected", sorted(show(k) for k in set(got) - set(expected))),
      ("wrong shape", sorted(f"{show(k)}: {tuple(got[k])} != {tuple(expected[k])}"
                             for k in set(got) & set(expected)
                             if tuple(got[k]) != tuple(expected[k]))))
  problems = []
  for label, items in kinds:
    if items:
      more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
      problems.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
  return problems


def random_params(abstract: Any, rng: jax.Array, std: float = 0.02,
                  chunk: int = 1 << 26) -> Any:
  """Normal(0, std) leaves of an abstract (ShapeDtypeStruct) params tree, on device.

  Values only matter for timing, so they are drawn as one flat stream in
  chunks of ``chunk`` floats by one small compiled program, split on the host
  and put on the device leaf by leaf. Not a jitted per-leaf draw: XLA compiles
  one kernel per random leaf (~0.1 s each on a CPU, a model's init has
  hundreds) and its CPU compile time grows faster than linearly with their
  number (1000 leaves: ~7 min on 2 cores). Not the model's init either,
  whose compile includes the forward pass.

  Args:
    abstract: pytree of ``jax.ShapeDtypeStruct``.
    rng: a PRNG key; the same key gives the same values.
    std: standard deviation of every leaf.
    chunk: floats per compiled draw (bounds the device buffer for big models).

  Returns:
    The pytree of ``abstract`` with device arrays of its shapes and dtypes.
  """
  leaves, treedef = jax.tree.flatten(abstract)
  sizes = [math.prod(l.shape) for l in leaves]
  total = sum(sizes)
  n = max(1, min(chunk, total))
  draw = jax.jit(lambda key: std * jax.random.normal(key, (n,), jnp.float32))
  flat = np.empty(-(-total // n) * n, np.float32)
  for i in range(len(flat) // n):
    flat[i * n:(i + 1) * n] = np.asarray(draw(jax.random.fold_in(rng, i)))
  out, offset = [], 0
  for leaf, size in zip(leaves, sizes):
    value = flat[offset:offset + size].reshape(leaf.shape).astype(leaf.dtype)
    out.append(jax.device_put(value))
    offset += size
  return jax.tree.unflatten(treedef, out)
