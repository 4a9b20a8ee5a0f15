"""Every XLA compiler option and compilation-cache setting the project makes, in one place.

Programs are compiled through ``jit`` (a ``jax.jit`` that passes
``compiler_options()``), so the train step, the samplers and the benchmark see
the same options, and ``describe()`` records them (with ``$XLA_FLAGS``) in run
records and benchmark JSON. ``$XLA_FLAGS`` is the way to try another value for
a whole process: an option it names is left out of ``compiler_options()``
(which would otherwise win over it), e.g.
``XLA_FLAGS=--xla_gpu_experimental_enable_fusion_autotuner=true``.
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

``xla_gpu_experimental_enable_fusion_autotuner = False``
  XLA's generic fusion autotuner compiles each of a program's non-GEMM fusions
  (the train step: ~850) once per candidate emitter, and on a GPU times them.
  Compiled for a GPU without one, it compiles the candidates and then takes
  the default emitter anyway: the program is the same text, and the train
  step's compile on 2 CPU cores drops 234 -> 167 s (72 s were this pass). On
  a GPU the default emitters are what the CPU proxies count; the autotuner's
  picks are an A/B with ``$XLA_FLAGS`` (above). cuBLAS, cuDNN and Triton GEMM
  autotuning are unaffected.

``xla_gpu_enable_triton_gemm = False`` for the sampling programs only
  (``PROGRAM_OPTIONS['sample']``): their GEMMs go to cuBLAS, which adds the
  transformer blocks' residuals in its epilogue and needs no split-K sums, and
  XLA autotunes no Triton GEMM configurations when it compiles them (denoise256:
  1,448 -> 1,391 kernels, 17.8 -> 14.1 GB). The train step keeps Triton's
  GEMMs, which read the packed float32 weights through the slice and the cast
  (cuBLAS there: 5,537 -> 5,621 kernels, 192 -> 254 GB).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
from jax import monitoring

# Values are XLA's types: bool, int, or str (a comma list for enum lists).
GPU_OPTIONS: dict[str, Any] = {
    "xla_gpu_dot_merger_threshold_mb": 0,
    "xla_gpu_experimental_enable_fusion_autotuner": False,
}

# Added to GPU_OPTIONS for one kind of program (``jit(..., program=)``).
PROGRAM_OPTIONS: dict[str, dict[str, Any]] = {
    "train": {},
    "sample": {"xla_gpu_enable_triton_gemm": False},
}


def compiler_options(program: str = "train") -> dict[str, Any]:
  """The options a ``program`` (``'train'``: the train step; ``'sample'``: the
  samplers' steps and the denoise benchmark) is compiled with
  (``jax.jit(compiler_options=...)``), less those ``$XLA_FLAGS`` names."""
  if program not in PROGRAM_OPTIONS:
    raise ValueError(f"program {program!r}; use one of {sorted(PROGRAM_OPTIONS)}")
  named = _named_in_xla_flags()
  return {k: v for k, v in {**GPU_OPTIONS, **PROGRAM_OPTIONS[program]}.items()
          if k not in named}


def _named_in_xla_flags() -> set[str]:
  """The option names ``$XLA_FLAGS`` sets (``--name=value`` or ``--name``)."""
  return {flag[2:].split("=", 1)[0] for flag in os.environ.get("XLA_FLAGS", "").split()
          if flag.startswith("--")}


def jit(fn: Callable, *, program: str = "train", **kwargs) -> Callable:
  """``jax.jit(fn, **kwargs)`` with ``compiler_options(program)``."""
  return jax.jit(fn, compiler_options=compiler_options(program), **kwargs)


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


class CompileTimes(NamedTuple):
  """Where a first call's seconds go: jax's tracing, the lowering to StableHLO,
  and XLA's compile (or the load of its result from the persistent compilation
  cache, ``cache_hit``). A second process skips only the last by the cache."""
  total_s: float
  trace_s: float
  lower_s: float
  compile_s: float
  cache_hit: bool

  def describe(self) -> str:
    """One line: ``traced 7.5 s, lowered 1.8 s, compiled 150.2 s`` (``loaded
    from the persistent compilation cache`` on a hit)."""
    xla = "loaded from the persistent compilation cache" if self.cache_hit else "compiled"
    return (f"traced {self.trace_s:.1f} s, lowered {self.lower_s:.1f} s, "
            f"{xla} {self.compile_s:.1f} s")


_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_listening = threading.local()


def _on_event(event: str, **_) -> None:
  hits = getattr(_listening, "hits", None)
  if event == _CACHE_HIT and hits is not None:
    _listening.hits = hits + 1


def compile_timed(jitted: Any, *args, **kwargs) -> tuple[Any, CompileTimes]:
  """``jitted.trace(*args, **kwargs).lower().compile()``, each stage timed.

  ``args``: what ``jitted`` is called with, or their ``jax.ShapeDtypeStruct``s.
  Whether XLA's part came from the persistent compilation cache is read from
  jax's monitoring events (on this thread).

  Returns:
    ``(compiled, CompileTimes)``.
  """
  start = time.perf_counter()
  traced = jitted.trace(*args, **kwargs)
  t_trace = time.perf_counter()
  lowered = traced.lower()
  t_lower = time.perf_counter()
  _listening.hits = 0
  try:
    compiled = lowered.compile()
    hits = _listening.hits
  finally:
    _listening.hits = None
  end = time.perf_counter()
  return compiled, CompileTimes(total_s=end - start, trace_s=t_trace - start,
                                lower_s=t_lower - t_trace, compile_s=end - t_lower,
                                cache_hit=hits > 0)


monitoring.register_event_listener(_on_event)


def describe() -> dict[str, Any]:
  """What a run record or a benchmark JSON stores: ``{compiler_options (the train
  step's), sample_compiler_options, compilation_cache_dir, xla_caches, xla_flags}``
  (``$XLA_FLAGS`` as set)."""
  return dict(compiler_options=compiler_options(),
              sample_compiler_options=compiler_options("sample"),
              compilation_cache_dir=jax.config.jax_compilation_cache_dir,
              xla_caches=jax.config.jax_persistent_cache_enable_xla_caches,
              xla_flags=os.environ.get("XLA_FLAGS", ""))
