"""Mesh and logical axis rules: the only place that knows mesh axis names.

Modules annotate every kernel with *logical* axis names (the constants below)
through ``nn.with_logical_partitioning``, and activations with
``nn.with_logical_constraint``. ``LOGICAL_RULES`` maps them onto a 2-D
``Mesh`` with axes ``('data', 'fsdp')``: batch over both (pure data
parallelism when ``fsdp == 1``), the widest weight axes over ``fsdp`` (ZeRO-3
style parameter sharding). A weight dimension that the mesh axis does not
divide is replicated instead of failing (e.g. a 4-channel ``conv_out`` on an
fsdp axis of 8), see ``param_shardings``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Mesh axes.
DATA = "data"
FSDP = "fsdp"
MESH_AXES = (DATA, FSDP)

# Logical axes for activations.
BATCH = "batch"
LENGTH = "length"        # tokens / flattened pixels
FRAMES = "frames"
HEIGHT = "height"
WIDTH = "width"
CHANNELS = "channels"    # activation channels / embedding width

# Logical axes for parameters.
EMBED = "embed"          # model width (input side of projections)
MLP = "mlp"              # hidden width of feed-forward layers
HEADS = "heads"          # attention heads x head width, flattened (q/k/v out)
KV = "kv"                # key/value source width (cross-attention inputs)
VOCAB = "vocab"
CONV_IN = "conv_in"      # conv input channels
CONV_OUT = "conv_out"    # conv output channels
CONV_T = "conv_t"        # temporal kernel taps
CONV_H = "conv_h"        # spatial kernel taps (rows)
CONV_W = "conv_w"        # spatial kernel taps (columns)
NORM = "norm"            # scales/biases of norms
TOKENS = "tokens"        # learned token tables (positions, queries, null tokens)

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    (BATCH, (DATA, FSDP)),
    (LENGTH, None),
    (FRAMES, None),
    (HEIGHT, None),
    (WIDTH, None),
    (CHANNELS, None),
    (EMBED, FSDP),
    (MLP, None),
    (HEADS, None),
    (KV, None),
    (VOCAB, None),
    (CONV_IN, None),
    (CONV_OUT, FSDP),
    (CONV_T, None),
    (CONV_H, None),
    (CONV_W, None),
    (NORM, None),
    (TOKENS, None),
)


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ``('data', 'fsdp')`` mesh; ``-1`` takes the remaining devices.

  With both sizes given and fewer than the available devices, the first
  ``data * fsdp`` devices are used (e.g. ``data=1, fsdp=1``: one device).
  """
  devices = list(jax.devices() if devices is None else devices)
  if data > 0 and fsdp > 0 and data * fsdp < len(devices):
    devices = devices[:data * fsdp]
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("at most one of mesh.data / mesh.fsdp may be -1")
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover {n} devices")
  grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, MESH_AXES)


def mesh_from_config(mesh_config) -> Mesh:
  """``make_mesh`` from a ``config.mesh`` ConfigDict."""
  return make_mesh(data=mesh_config.data, fsdp=mesh_config.fsdp)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (replicate those dims)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in names]))
    out.append(axes if dim % size == 0 else None)
  return P(*out)


def param_shardings(abstract_variables: Any, mesh: Mesh,
                    rules=LOGICAL_RULES) -> Any:
  """NamedShardings for a (boxed, abstract) variables tree from ``eval_shape``.

  Args:
    abstract_variables: output of ``jax.eval_shape(module.init, ...)``, whose
      leaves are ``nn.LogicallyPartitioned`` boxes of ShapeDtypeStructs.
    mesh: the device mesh.
    rules: logical-to-mesh rules.

  Returns:
    A tree of the same structure as the *unboxed* variables holding
    ``NamedSharding``s.
  """
  specs = nn.get_partition_spec(abstract_variables)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.meta.unbox(abstract_variables)

  def to_sharding(spec, leaf):
    return NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh))

  return jax.tree.map(to_sharding, mesh_specs, shapes,
                      is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Sharding of a host batch ``[B, ...]``: leading axis over data x fsdp."""
  return NamedSharding(mesh, P((DATA, FSDP), *([None] * (ndim - 1))))
