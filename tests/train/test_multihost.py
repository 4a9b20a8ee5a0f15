"""Multi-host training: two local processes == one process with as many devices.

``python -m launch.train`` is started twice with ``JAX_COORDINATOR_ADDRESS`` on
loopback, ``JAX_NUM_PROCESSES=2`` and ``JAX_PROCESS_ID=0/1``, one CPU device
each and gloo collectives: ``jax.distributed.initialize``, a mesh spanning both
processes, each process feeding its own shard of the data
(``make_array_from_process_local_data``), parameters sharded over ``fsdp``
across the processes and a collective Orbax save -- the code path of a TPU pod.
Meanwhile the test process runs the same config and seed through the same
loop on 2 of its devices; the metrics of the last step (computed from the
params the first step produced) and the whole checkpointed state must agree.

The global batch holds one example per process: the renderer source gives
process ``p`` the global positions ``p, p + P, ...``, so with a local batch of
1 the global batch is in the same order as one process's, and the per-row
noise draws (keyed on the row) are the same.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from persvid_jax import checkpoint as ckpt_lib
from persvid_jax import config_lib
from persvid_jax.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[2]

ARGS = ["--config", "configs/tiny.py:micro", "--no-progress",
        "--config.mesh.data=1", "--config.mesh.fsdp=2",       # params sharded across hosts
        "--config.train.batch_size=2", "--config.train.total_steps=2",
        "--config.train.log_every_steps=1", "--config.train.sample_every_steps=0",
        "--config.train.async_checkpoints=False", "--config.data.workers=1"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} "
                 "--xla_backend_optimization_level=0"),
      JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
      **extra)
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    if key not in extra:
      env.pop(key, None)
  return env


def _restore(setup, workdir: pathlib.Path):
  """``(step, TrainState)`` of a workdir's latest checkpoint, onto this process's mesh.

  (The loop's abstract state gives orbax the target shardings; the export
  path reads to host numpy instead, ``checkpoint.restore_to_host``.)
  """
  manager = ckpt_lib.make_manager(workdir / "checkpoints", async_save=False)
  try:
    return ckpt_lib.restore(manager, ckpt_lib.abstract_with_shardings(
        setup.abstract_state, setup.state_shards))
  finally:
    manager.close()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  multi, single = tmp_path / "multi", tmp_path / "single"
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "launch.train", *ARGS, "--workdir", str(multi)], cwd=ROOT,
      env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    # The reference meanwhile, in this process: the same loop on 2 of its devices.
    config = config_lib.apply_overrides(
        config_lib.load_config("tiny:micro"),
        [a[len("--config."):] for a in ARGS if a.startswith("--config.")])
    assert loop.train_and_evaluate(config, single, progress=False).step == 2
    outs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    assert "done: step 2 (from 0)" in out

  got = json.loads((multi / "result.json").read_text())["last_metrics"]
  want = json.loads((single / "result.json").read_text())["last_metrics"]
  assert set(got) == set(want) and {"loss", "grad_norm"} <= set(got)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-4, err_msg=key)

  # The whole state (params, Adam moments, EMA) after 2 steps.
  setup = loop.setup(config)
  (step_a, a), (step_b, b) = _restore(setup, multi), _restore(setup, single)
  assert step_a == step_b == 2
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b) > 100
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))
