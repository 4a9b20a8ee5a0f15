"""Test setup: 8 host CPU devices, set before jax is imported anywhere."""

import os

# Must precede the first `import jax` of the process (pytest imports conftest first).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           # Tiny test programs: compile fast rather than run fast
                           # (halves compile time on a 2-core CI machine).
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests build the same tiny programs many times (fresh jit wrappers, fresh
# modules); a persistent compilation cache makes every repeat a cache hit.
# It is keyed on the HLO and the jax version, so a stale entry cannot be hit.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "PERSVID_JAX_CACHE", os.path.join(tempfile.gettempdir(), "persvid_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from launch import _common  # noqa: E402
from persvid_jax import config_lib  # noqa: E402

# Bare config names (tiny), looked up where the CLIs look: launch/ knows configs/.
config_lib.set_search_path(_common.CONFIGS_DIR)


@pytest.fixture(scope="session")
def tiny_config():
  """The tiny config (every network at toy size)."""
  return config_lib.load_config("tiny")


@pytest.fixture(scope="session")
def tiny_bf16_config():
  """The tiny config with bfloat16 compute, float32 params."""
  return config_lib.load_config("tiny:bf16")


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.device_count()} x {jax.devices()[0].platform}"


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory):
  """An exported random-init model of ``tiny:micro`` (every network, tiny shapes)."""
  from persvid_jax.pipeline import model as model_lib
  config = config_lib.load_config("tiny:micro")
  return model_lib.export_model(model_lib.random_model(config, seed=0),
                                tmp_path_factory.mktemp("models") / "micro")


@pytest.fixture(scope="session")
def micro_model(micro_model_dir):
  from persvid_jax.pipeline import model as model_lib
  return model_lib.load_model(micro_model_dir)
