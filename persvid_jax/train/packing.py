"""The train step's vector parameters in one flat buffer (fewer optimizer kernels).

A 1.4 B-parameter generator has ~1,500 parameter leaves, ~900 of them vectors
(biases, norm scales) of a few hundred floats. XLA launches at least one kernel
per leaf for the optimizer (Adam, the clip, the EMA: one fused kernel each leaf)
and fuses no independent leaves together, so on a GPU those ~900 tiny updates
are ~900 launches per step. With the vectors in one ``float32[N]`` buffer the
update is one kernel over all of them, as PyTorch's fused/flat optimizers do.

The packing is the *device-side form of the train state only*: checkpoints,
warm starts, previews and everything outside the compiled step see the usual
``{network: tree}`` params (``unpack_state`` before saving, ``pack_state``
after restoring or initialising). In a packed tree the vectors are removed
from their networks' trees and held under ``PACKED``::

    {"unet": {... no vectors ...}, "packed": float32[N]}

The model still reads every vector by its own name: ``unpack`` slices them out
(free: XLA fuses the slices into their consumers) and its gradient is one
concatenation. AdamW, the EMA and the gradient clip are elementwise given the
global norm, so the packed step computes what the unpacked one does (tested).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

PACKED = "packed"


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _without(tree: Any, paths: set[tuple[str, ...]], prefix: tuple[str, ...] = ()) -> Any:
  """``tree`` (nested dicts) with the leaves at ``paths`` removed (copies the dicts)."""
  if not isinstance(tree, dict):
    return tree
  return {k: _without(v, paths, prefix + (k,)) for k, v in tree.items()
          if prefix + (k,) not in paths}


def _with(tree: Any, leaves: dict[tuple[str, ...], Any]) -> Any:
  """``tree`` with ``leaves`` (path -> value) inserted (copies the dicts on the way)."""
  out = dict(tree)
  for path, value in leaves.items():
    node = out
    for k in path[:-1]:
      node[k] = dict(node[k])
      node = node[k]
    node[path[-1]] = value
  return out


@dataclasses.dataclass(frozen=True)
class Packing:
  """Which leaves of a ``{network: tree}`` params dict live in the flat buffer.

  ``paths[i]`` (``('unet', 'conv_in', 'bias')``) has ``shapes[i]`` and occupies
  ``flat[offsets[i]:offsets[i] + sizes[i]]``; ``networks`` are the params
  dict's keys. Static (hashable): part of the compiled program's structure.
  """
  networks: tuple[str, ...]
  paths: tuple[tuple[str, ...], ...]
  shapes: tuple[tuple[int, ...], ...]
  offsets: tuple[int, ...]
  size: int

  @classmethod
  def plan(cls, params: Any, trainable: Any) -> "Packing":
    """Packs the trainable float32 vectors of ``params`` (``{network: tree}``,
    arrays or ``ShapeDtypeStruct``s); ``trainable`` is a bool tree like it.
    Frozen leaves stay where they are (they have no optimizer state)."""
    paths, shapes, offsets, size = [], [], [], 0
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), keep in zip(flat, jax.tree.leaves(trainable), strict=True):
      if keep and len(leaf.shape) <= 1 and jnp.dtype(leaf.dtype) == jnp.float32:
        paths.append(tuple(str(k.key) for k in path))
        shapes.append(tuple(leaf.shape))
        offsets.append(size)
        size += math.prod(leaf.shape)
    return cls(networks=tuple(params), paths=tuple(paths), shapes=tuple(shapes),
               offsets=tuple(offsets), size=size)

  def __bool__(self) -> bool:
    return bool(self.paths)

  # ---- params-structured trees ----------------------------------------------
  def pack(self, tree: Any, flat: Any = None) -> dict:
    """``{network: tree}`` -> the packed form. ``flat``: the value to hold under
    ``PACKED`` instead of the concatenation of the vectors (e.g. a sharding).
    With nothing to pack (e.g. bf16 parameters) every form is the usual one."""
    if not self:
      return tree
    if flat is None:
      flat = jnp.concatenate([jnp.ravel(_get(tree, p)) for p in self.paths])
    out = _without(tree, set(self.paths))
    out[PACKED] = flat
    return out

  def unpack(self, packed: dict) -> dict:
    """The packed form -> ``{network: tree}`` (the vectors sliced out of the
    buffer; the gradient of this is one concatenation, see ``_slices``)."""
    if not self:
      return packed
    rest = {k: v for k, v in packed.items() if k != PACKED}
    return _with(rest, dict(zip(self.paths, _split(self, packed[PACKED]))))

  def mask(self, trainable: Any) -> dict:
    """A bool tree like the params -> the same for the packed form (the buffer:
    trainable, as everything in it is)."""
    return self.pack(trainable, flat=True)

  # ---- whole train states ---------------------------------------------------
  def _is_params(self, node: Any, packed: bool) -> bool:
    if not self:
      return False
    want = set(self.networks) | ({PACKED} if packed else set())
    return isinstance(node, dict) and set(node) == want

  def pack_state(self, state: Any) -> Any:
    """A ``TrainState`` (or any tree: params, EMA, optimizer moments) with every
    params-structured part packed. Optimizer states are found by structure
    (dicts keyed by the network names), so any optax chain of elementwise
    transformations converts."""
    return jax.tree.map(lambda n: self.pack(n) if self._is_params(n, False) else n, state,
                        is_leaf=lambda n: self._is_params(n, False))

  def unpack_state(self, state: Any) -> Any:
    """The inverse of ``pack_state``."""
    return jax.tree.map(lambda n: self.unpack(n) if self._is_params(n, True) else n, state,
                        is_leaf=lambda n: self._is_params(n, True))

  def pack_like(self, state: Any, fill: Any) -> Any:
    """``pack_state`` of a tree of non-arrays (shardings, ShapeDtypeStructs), the
    buffer's place taking ``fill`` (e.g. a replicated sharding)."""
    return jax.tree.map(
        lambda n: self.pack(n, flat=fill) if self._is_params(n, False) else n, state,
        is_leaf=lambda n: self._is_params(n, False))

  def abstract_flat(self) -> jax.ShapeDtypeStruct:
    """The buffer as a ``ShapeDtypeStruct``."""
    return jax.ShapeDtypeStruct((self.size,), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _slices(packing: Packing, flat: jax.Array) -> list[jax.Array]:
  """``flat [N]`` -> the packed vectors, each in its shape."""
  return [flat[o:o + math.prod(s)].reshape(s)
          for o, s in zip(packing.offsets, packing.shapes)]


def _slices_fwd(packing, flat):
  return _slices(packing, flat), None


def _slices_bwd(packing, _, grads):
  # One concatenation. Autodiff of the slices would give XLA a pad + add per
  # vector, or a dynamic-update-slice chain: ~900 kernels again.
  return (jnp.concatenate([jnp.ravel(g).astype(jnp.float32) for g in grads]),)


_slices.defvjp(_slices_fwd, _slices_bwd)
# Jitted: on concrete arrays (a checkpoint save) one dispatch, not one per vector.
_split = jax.jit(_slices, static_argnums=0)
