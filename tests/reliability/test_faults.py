"""Hard faults: a trainer killed by SIGKILL mid-save, with renderer workers running.

One subprocess does what a trainer does with the parts that a fault hits --
renderer worker processes (``config.data.processes``) feeding it, and an
asynchronous Orbax save in flight -- and is then killed with SIGKILL (no
handler, no cleanup). After it: its workers must be gone (they ignore
SIGTERM/SIGINT, so only their parent watchdog can end them), and a restart
must resume from the last *complete* checkpoint, the interrupted step being
invisible. The training loop's resume is ``manager.latest_step()`` +
``checkpoint.restore``, the calls used here; bit-exact resume of the loop
itself is ``tests/train/test_train.py::test_resume_is_exact``.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The trainer stand-in. Run as a script with a __main__ guard (spawned
# workers re-import the main module).
_CHILD = textwrap.dedent("""
    import os, pathlib, signal, sys, threading, time
    import numpy as np
    from persvid_jax import checkpoint as ckpt_lib
    from persvid_jax import config_lib
    from persvid_jax.data import pipeline

    if __name__ == "__main__":
      workdir = pathlib.Path(sys.argv[1])
      config = config_lib.load_config("configs/tiny.py")   # cwd: the repository root
      config.data.source, config.data.processes = "renderer", 2
      batches = pipeline.make_dataset(config, "train", batch_size=2, process_index=0,
                                      process_count=1)
      first = threading.Thread(target=next, args=(batches,))
      first.start()                         # the workers spawn while step 1 is saved
      manager = ckpt_lib.make_manager(workdir, async_save=True)
      ckpt_lib.save(manager, 1, {"w": np.full((256, 256), 1.0, np.float32)})
      manager.wait_until_finished()
      first.join()
      print("workers up", flush=True)
      sys.stdin.readline()                  # the test has listed the workers
      # 64 MB, so that the write outlasts the poll below on any disk.
      state = {"w": np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)}
      ckpt_lib.save(manager, 2, state)      # returns with the write in flight
      # Orbax may create its temporary step directory from its background
      # thread, so poll for it rather than look once; kill as soon as it is
      # there and the final directory is not.
      in_flight, deadline = [], time.monotonic() + 60
      while not in_flight and time.monotonic() < deadline:
        names = [p.name for p in workdir.iterdir()]
        if "2" in names:
          break                             # finished first: reported, the test retries
        in_flight = [n for n in names if n.startswith("2.")]
      print("in flight:", in_flight, flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    """)


def _children(pid: int) -> set[int]:
  out = set()
  for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
    out.update(int(c) for c in (task / "children").read_text().split())
  return out


def _alive(pid: int) -> bool:
  try:
    state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except (FileNotFoundError, ProcessLookupError):
    return False
  return state not in ("Z", "X")          # a zombie has exited (init reaps it late)


@pytest.mark.skipif(not pathlib.Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigkill_mid_async_save_orphans_no_worker_and_resumes_last_complete(tmp_path):
  script = tmp_path / "trainer.py"
  script.write_text(_CHILD)
  workdir = tmp_path / "checkpoints"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, str(script), str(workdir)], cwd=ROOT, env=env,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  workers: set[int] = set()
  try:
    line = proc.stdout.readline()
    assert line.startswith("workers up"), proc.communicate(timeout=60)[1][-3000:]
    workers = _children(proc.pid)
    assert len(workers) >= 2, workers       # the two renderers (+ a resource tracker)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    # Not communicate(): orphaned workers would hold the pipes open.
    assert proc.wait(timeout=120) == -signal.SIGKILL, line
    # The kill hit a save in flight: Orbax's temporary step-2 directory was there.
    assert line.startswith("in flight: ['2."), line

    # The watchdog polls every second; a worker still importing when the
    # trainer died (a loaded machine) first finishes starting up.
    deadline = time.time() + 30
    while any(map(_alive, workers)) and time.time() < deadline:
      time.sleep(0.2)
    assert not [w for w in workers if _alive(w)], "renderer workers outlived the trainer"
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
    for w in workers:
      if _alive(w):
        os.kill(w, signal.SIGKILL)

  from persvid_jax import checkpoint as ckpt_lib
  device = jax.devices()[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = {"w": jax.ShapeDtypeStruct((256, 256), np.float32, sharding=sharding)}
  manager = ckpt_lib.make_manager(workdir, async_save=True)
  try:
    assert manager.latest_step() == 1 and manager.all_steps() == [1]
    step, state = ckpt_lib.restore(manager, abstract)
    assert step == 1
    np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
    # The resumed run saves step 2 again over the debris of the killed write.
    ckpt_lib.save(manager, 2, {"w": np.full((256, 256), 2.0, np.float32)})
    manager.wait_until_finished()
    step, state = ckpt_lib.restore(manager, abstract)
    assert step == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), 2.0)
  finally:
    manager.close()


def test_a_diverged_step_names_itself_and_the_last_good_checkpoint(tmp_path):
  """What the training loop calls at every logged step and before every save."""
  from persvid_jax import checkpoint as ckpt_lib
  from persvid_jax.train import guards
  manager = ckpt_lib.make_manager(tmp_path / "checkpoints", async_save=True)
  try:
    with pytest.raises(FloatingPointError, match=r"diverged at step 3 \(loss=nan\); there "
                                                 r"is no checkpoint yet"):
      guards.check_finite({"loss": float("nan"), "grad_norm": 1.0}, 3, manager)
    ckpt_lib.save(manager, 4, {"w": np.ones(3, np.float32)})   # in flight when it raises
    with pytest.raises(FloatingPointError) as info:
      # The loss is computed before the update: an infinite gradient counts too.
      guards.check_finite({"loss": 0.5, "grad_norm": float("inf")}, 7, manager)
    message = str(info.value)
    assert "diverged at step 7 (grad_norm=inf)" in message and "\n" not in message
    assert f"last good checkpoint is step 4 in {tmp_path / 'checkpoints'}" in message
    guards.check_finite({"loss": 0.5, "grad_norm": 2.0}, 8, manager)   # finite: no error
  finally:
    manager.close()


def test_nonfinite_steps_are_skipped_by_config_up_to_a_limit(tmp_path):
  """``config.train.max_nonfinite_skips > 0``: a NaN step changes nothing (params,
  Adam moments, EMA) but the step counter; past the limit the run stops with
  one line. The real train step builder with a toy loss (its compile is
  instant; the loop wires the same functions)."""
  import jax.numpy as jnp
  import optax
  from persvid_jax import checkpoint as ckpt_lib
  from persvid_jax.train import guards
  from persvid_jax.train import state as state_lib
  from persvid_jax.train import step as step_lib

  def loss_fn(params, batch, rng):
    loss = jnp.sum((params["w"] * batch["x"] - 1.0) ** 2)
    return loss, {"loss": loss}

  tx = optax.adam(0.1)
  state = state_lib.create_state({"w": jnp.array([1.0, 2.0])}, tx)
  good, bad = {"x": jnp.array([0.5, 0.5])}, {"x": jnp.array([0.5, jnp.nan])}
  skip = jax.jit(step_lib.make_train_step(loss_fn, tx, 0.9, skip_nonfinite=True))
  after_good, m = skip(state, good, jax.random.key(0))
  assert float(m["skipped"]) == 0 and int(after_good.step) == 1
  assert not np.array_equal(np.asarray(after_good.params["w"]), [1.0, 2.0])
  after_bad, m = skip(after_good, bad, jax.random.key(0))
  assert float(m["skipped"]) == 1 and int(after_bad.step) == 2
  for x, y in zip(jax.tree.leaves((after_good.params, after_good.opt_state,
                                   after_good.ema_params)),
                  jax.tree.leaves((after_bad.params, after_bad.opt_state,
                                   after_bad.ema_params))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # Without the option the NaN goes into the params (and the loop stops the run).
  plain = jax.jit(step_lib.make_train_step(loss_fn, tx, 0.9))
  assert np.isnan(np.asarray(plain(after_good, bad, jax.random.key(0))[0].params["w"])).any()

  # The loop's side: a skipped step's NaN loss is not a divergence; the count is.
  host = {k: float(v) for k, v in m.items()}
  assert "loss" not in guards.finite_part(host)
  manager = ckpt_lib.make_manager(tmp_path / "checkpoints", async_save=False)
  try:
    guards.check_finite(guards.finite_part(host), 2, manager)         # no error
    counter = guards.SkipCounter(limit=1)
    counter.add(m)
    counter.check(2, manager)                                        # 1 <= 1: a warning
    counter.add(m)
    with pytest.raises(FloatingPointError, match=r"2 steps up to step 3 had a non-finite "
                                                 r"loss or gradient, over config\.train\."
                                                 r"max_nonfinite_skips=1; there is no "
                                                 r"checkpoint yet"):
      counter.check(3, manager)
  finally:
    manager.close()
  with pytest.raises(ValueError, match="max_nonfinite_skips=-1"):
    guards.max_skips(_train_config(max_nonfinite_skips=-1))


def _train_config(**kw):
  from persvid_jax import config_lib
  config = config_lib.load_config("tiny:micro")
  config.train.update(kw)
  return config.train
