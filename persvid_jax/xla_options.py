"""Every XLA compiler option and compilation-cache setting the project makes, in one place.

Programs are compiled through ``jit`` (a ``jax.jit`` that passes
``compiler_options()``), so the train step, the samplers and the benchmark see
the same options, and ``describe()`` records them (with ``$XLA_FLAGS``, the way
to try another option for a whole process) in run records and benchmark JSON.
The ``xla_gpu_*`` options are read only by the GPU compiler; the CPU's ignores
them, so one call serves both.

Each option is here because a compiled program showed it pays (``python -m
launch.bench --aot h200`` counts kernels and bytes; ``docs/benchmarks.md``):

``xla_gpu_dot_merger_threshold_mb = 0``
  XLA merges matmuls that share an operand (self-attention's q, k and v) into
  one GEMM, then copies q, k and v out of its output for the attention kernel:
  three copy kernels per attention that move three activations. Three GEMMs
  write q, k and v where attention reads them (denoise256: 148 kernels and
  7 GB less).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

# Values are XLA's types: bool, int, or str (a comma list for enum lists).
GPU_OPTIONS: dict[str, Any] = {
    "xla_gpu_dot_merger_threshold_mb": 0,
}


def compiler_options() -> dict[str, Any]:
  """The options every program is compiled with (``jax.jit(compiler_options=...)``)."""
  return dict(GPU_OPTIONS)


def jit(fn: Callable, **kwargs) -> Callable:
  """``jax.jit(fn, **kwargs)`` with ``compiler_options()``."""
  return jax.jit(fn, compiler_options=compiler_options(), **kwargs)


def enable_cache(directory: str | os.PathLike, *, min_compile_s: float = 1.0) -> None:
  """A persistent compilation cache in ``directory``, XLA's own caches included.

  jax keys each program by its HLO, options and versions, so a second process
  compiling the same program loads it instead. With
  ``jax_persistent_cache_enable_xla_caches='all'`` XLA also keeps its kernel and
  autotuning caches there, which a *changed* program (another shape, another
  variant) reuses for the kernels it shares.
  """
  jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
  jax.config.update("jax_persistent_cache_enable_xla_caches", "all")


def describe() -> dict[str, Any]:
  """What a run record or a benchmark JSON stores: ``{compiler_options,
  compilation_cache_dir, xla_caches, xla_flags}`` (``$XLA_FLAGS`` as set)."""
  return dict(compiler_options=compiler_options(),
              compilation_cache_dir=jax.config.jax_compilation_cache_dir,
              xla_caches=jax.config.jax_persistent_cache_enable_xla_caches,
              xla_flags=os.environ.get("XLA_FLAGS", ""))
