"""The train step's vector parameters in one flat buffer (fewer optimizer kernels).

A 1.4 B-parameter generator has ~1,500 parameter leaves, ~900 of them vectors
(biases, norm scales) of a few hundred floats. XLA launches at least one kernel
per leaf for the optimizer (Adam, the clip, the EMA: one fused kernel each leaf)
and fuses no independent leaves together, so on a GPU those ~900 tiny updates
are ~900 launches per step. With the vectors in one ``float32[N]`` buffer the
update is one kernel over all of them, as PyTorch's fused/flat optimizers do.

Where the parameters are not sharded (one GPU, or data parallel only) the
weight matrices are packed too (``matrices=True``), in buckets of at most
``BUCKET_LEAVES`` leaves: the ~570 weights' AdamW + EMA is then one kernel a
bucket, each reading its weights' gradients where they lie (XLA fuses the
bucket's gradient concatenation into its update; a concatenation of all 1,480
leaves at once is split into nested concatenations that write the whole
gradient out, 5.6 GB more a step at the ModelScope size). Sharded (FSDP)
parameters stay leaves, which their shardings follow.

The packing is the *device-side form of the train state only*: checkpoints,
warm starts, previews and everything outside the compiled step see the usual
``{network: tree}`` params (``unpack_state`` before saving, ``pack_state``
after restoring or initialising). In a packed tree the packed leaves are
removed from their networks' trees and held under ``PACKED``, one buffer a
bucket::

    {"unet": {... no vectors ...}, "packed": {"vectors": float32[N]}}

The model still reads every leaf by its own name: ``unpack`` slices them out
(free: XLA fuses the slices into their consumers) and its gradient is one
concatenation a bucket. AdamW, the EMA and the gradient clip are elementwise
given the global norm, so the packed step computes what the unpacked one does
(tested).
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


BUCKET_LEAVES = 64   # weight matrices a bucket: XLA fuses up to ~90 operands a kernel


@dataclasses.dataclass(frozen=True)
class Bucket:
  """Leaves ``paths[i]`` of ``shapes[i]`` at ``flat[offsets[i]:offsets[i] + size_i]``
  of one ``float32[size]`` buffer, each stored transposed by ``perm(i)``. Static
  (hashable)."""
  paths: tuple[tuple[str, ...], ...]
  shapes: tuple[tuple[int, ...], ...]
  offsets: tuple[int, ...]
  size: int

  def perm(self, i: int) -> tuple[int, ...]:
    """Leaf ``i``'s storage order (``storage_perm``)."""
    return storage_perm(self.paths[i], self.shapes[i])


def storage_perm(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """How a packed leaf is stored: a convolution's kernel ``[*window, I, O]`` with
  its output channels first (``[O, *window, I]``, cuDNN's filter order: the
  forward reads it and the filter gradient comes out in it, no transpose either
  way); everything else as it is (the identity)."""
  if path[-1] == "kernel" and len(shape) >= 3:
    return (len(shape) - 1,) + tuple(range(len(shape) - 1))
  return tuple(range(len(shape)))


def _bucket(leaves: list[tuple[tuple[str, ...], tuple[int, ...]]]) -> Bucket:
  offsets, size = [], 0
  for _, shape in leaves:
    offsets.append(size)
    size += math.prod(shape)
  return Bucket(paths=tuple(p for p, _ in leaves), shapes=tuple(s for _, s in leaves),
                offsets=tuple(offsets), size=size)


def _stored(bucket: Bucket, i: int, leaf: jax.Array) -> jax.Array:
  """Leaf ``i`` (its own shape) -> its stored form, flat."""
  return jnp.ravel(jnp.transpose(leaf, bucket.perm(i)))


@dataclasses.dataclass(frozen=True)
class Packing:
  """Which leaves of a ``{network: tree}`` params dict live in flat buffers.

  ``buckets``: ``(name, Bucket)`` pairs, the buffers held under ``PACKED``
  (``"vectors"``, then ``"matrices_00"``, ...); ``networks`` are the params
  dict's keys. Static (hashable): part of the compiled program's structure.
  """
  networks: tuple[str, ...]
  buckets: tuple[tuple[str, Bucket], ...]

  @classmethod
  def plan(cls, params: Any, trainable: Any, *, matrices: bool = False) -> "Packing":
    """Packs the trainable float32 vectors of ``params`` (``{network: tree}``,
    arrays or ``ShapeDtypeStruct``s); ``trainable`` is a bool tree like it.
    ``matrices``: the other trainable float32 leaves too, in buckets of
    ``BUCKET_LEAVES`` (for parameters that are not sharded: the buffers are
    replicated). Frozen leaves stay where they are (they have no optimizer
    state)."""
    vectors, others = [], []
    flat = jax.tree_util.tree_leaves_with_path(params)
    for (path, leaf), keep in zip(flat, jax.tree.leaves(trainable), strict=True):
      if keep and jnp.dtype(leaf.dtype) == jnp.float32:
        item = (tuple(str(k.key) for k in path), tuple(leaf.shape))
        if len(leaf.shape) <= 1:
          vectors.append(item)
        elif matrices:
          others.append(item)
    buckets = [("vectors", _bucket(vectors))] if vectors else []
    for i in range(0, len(others), BUCKET_LEAVES):
      buckets.append((f"matrices_{i // BUCKET_LEAVES:02d}",
                      _bucket(others[i:i + BUCKET_LEAVES])))
    return cls(networks=tuple(params), buckets=tuple(buckets))

  @property
  def paths(self) -> tuple[tuple[str, ...], ...]:
    """Every packed leaf's path, bucket by bucket."""
    return tuple(p for _, b in self.buckets for p in b.paths)

  @property
  def size(self) -> int:
    """Floats in all buffers."""
    return sum(b.size for _, b in self.buckets)

  def __bool__(self) -> bool:
    return bool(self.paths)

  # ---- params-structured trees ----------------------------------------------
  def pack(self, tree: Any, flat: Any = None) -> dict:
    """``{network: tree}`` -> the packed form. ``flat``: what to hold under
    ``PACKED`` instead of the buffers (the concatenations of their leaves):
    ``{bucket: value}``, or one value for every bucket (e.g. a sharding).
    With nothing to pack (e.g. bf16 parameters) every form is the usual one."""
    if not self:
      return tree
    if flat is None:
      flat = {name: jnp.concatenate([_stored(b, i, jnp.asarray(_get(tree, p)))
                                     for i, p in enumerate(b.paths)])
              for name, b in self.buckets}
    elif not (isinstance(flat, dict) and set(flat) == {name for name, _ in self.buckets}):
      flat = {name: flat for name, _ in self.buckets}
    out = _without(tree, set(self.paths))
    out[PACKED] = dict(flat)
    return out

  def unpack(self, packed: dict) -> dict:
    """The packed form -> ``{network: tree}`` (the leaves sliced out of the
    buffers; the gradient of this is one concatenation a bucket, see ``_slices``)."""
    if not self:
      return packed
    rest = {k: v for k, v in packed.items() if k != PACKED}
    leaves = {}
    for name, b in self.buckets:
      leaves.update(zip(b.paths, _split(b, packed[PACKED][name])))
    return _with(rest, leaves)

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

  def abstract_flat(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The buffers as ``ShapeDtypeStruct``s, ``{bucket: float32[size]}``."""
    return {name: jax.ShapeDtypeStruct((b.size,), jnp.float32) for name, b in self.buckets}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _slices(bucket: Bucket, flat: jax.Array) -> list[jax.Array]:
  """``flat [N]`` -> the bucket's leaves, each in its shape."""
  out = []
  for i, (o, s) in enumerate(zip(bucket.offsets, bucket.shapes)):
    perm = bucket.perm(i)
    stored = flat[o:o + math.prod(s)].reshape(tuple(s[d] for d in perm))
    out.append(jnp.transpose(stored, tuple(perm.index(d) for d in range(len(s)))))
  return out


def _slices_fwd(bucket, flat):
  return _slices(bucket, flat), None


def _slices_bwd(bucket, _, grads):
  # One concatenation. Autodiff of the slices would give XLA a pad + add per
  # leaf, or a dynamic-update-slice chain: a kernel per leaf again.
  # XLA fuses it into its readers (the clip's norm, the update): no buffer of
  # the whole gradient is written. (With a barrier here it is written once:
  # 214 kernels fewer for the H200, 13 GB more moved.)
  return (jnp.concatenate([_stored(bucket, i, g).astype(jnp.float32)
                           for i, g in enumerate(grads)]),)


_slices.defvjp(_slices_fwd, _slices_bwd)
# Jitted: on concrete arrays (a checkpoint save) one dispatch, not one per leaf.
_split = jax.jit(_slices, static_argnums=0)
