"""The project's XLA options: one place, per kind of program, recorded."""

import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax import xla_options


def test_sampling_programs_use_cublas_gemms_the_train_step_triton():
  sample, train = xla_options.compiler_options("sample"), xla_options.compiler_options()
  assert sample["xla_gpu_enable_triton_gemm"] is False
  assert "xla_gpu_enable_triton_gemm" not in train
  assert sample["xla_gpu_dot_merger_threshold_mb"] == train["xla_gpu_dot_merger_threshold_mb"]
  recorded = xla_options.describe()
  assert recorded["sample_compiler_options"] == sample and recorded["compiler_options"] == train


def test_a_program_compiles_with_its_options_here():
  """The GPU options are accepted (and ignored) by this backend's compiler."""
  f = xla_options.jit(lambda a, b: jnp.tanh(a @ b), program="sample")
  a = np.ones((4, 3), np.float32)
  np.testing.assert_allclose(np.asarray(f(a, a.T)), np.tanh(a @ a.T), rtol=1e-6)
  with pytest.raises(ValueError, match="program 'serve'"):
    xla_options.jit(lambda a: a, program="serve")


def test_an_option_named_in_xla_flags_is_left_to_it(monkeypatch):
  """compiler_options would win over $XLA_FLAGS; an option the user names there
  is left out, so that one process can A/B it."""
  name = "xla_gpu_experimental_enable_fusion_autotuner"
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla_options.compiler_options()[name] is False
  monkeypatch.setenv("XLA_FLAGS", f"--xla_gpu_autotune_level=2 --{name}=true")
  train, sample = xla_options.compiler_options(), xla_options.compiler_options("sample")
  assert name not in train and name not in sample
  assert train["xla_gpu_dot_merger_threshold_mb"] == 0
  assert xla_options.describe()["xla_flags"].endswith(f"--{name}=true")


def test_compile_timed_splits_the_seconds_and_sees_a_cache_hit():
  """The tests' persistent cache (conftest) is on: a program new to it compiles,
  the same program traced again by a fresh ``jit`` is loaded from it."""
  import time

  import jax
  salt = float(time.time_ns() % 1_000_000)   # a program no earlier run has cached
  make = lambda: xla_options.jit(lambda a: jnp.tanh(a * salt) @ a.T)
  a = np.ones((8, 4), np.float32)
  first, times = xla_options.compile_timed(make(), a)
  again, warm = xla_options.compile_timed(make(), jax.ShapeDtypeStruct(a.shape, a.dtype))
  assert not times.cache_hit and warm.cache_hit
  for t in (times, warm):
    parts = t.trace_s + t.lower_s + t.compile_s
    assert min(t.trace_s, t.lower_s, t.compile_s) >= 0 and abs(parts - t.total_s) < 1e-3
  assert "loaded from the persistent compilation cache" in warm.describe()
  assert times.describe().startswith("traced ") and " compiled " in times.describe()
  np.testing.assert_allclose(np.asarray(again(a)), np.asarray(first(a)), rtol=1e-6)
