"""The trainer's process around the loop: joining a multi-host job, and late signals.

``launch.train`` calls ``initialize_distributed`` first (when launched as one
of several processes) and installs ``AfterRun`` before the loop, so that a
signal arriving after the last checkpoint cannot turn a finished run into a
failure.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax


class AfterRun:
  """SIGTERM / SIGINT outside the training loop (which handles them itself).

  Until the run is complete they act as by default (terminate; Ctrl-C
  interrupts). Once it is complete and saved they are logged and ignored: a
  budget's ``timeout`` landing in the interpreter's teardown (worker pools,
  threads: seconds) must not turn a finished run into exit status 143, which
  a wrapper such as ``launch/continue_demo.sh`` reads as a failed trainer.
  """

  def __init__(self):
    self.complete = False

  def install(self) -> "AfterRun":
    """Makes this the handler of SIGTERM and SIGINT (main thread only); returns self."""
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, self)
    return self

  def __call__(self, signum, frame):
    if self.complete:
      logging.getLogger(__name__).warning(
          "%s after the run was saved: ignored", signal.Signals(signum).name)
      return
    if signum == signal.SIGINT:
      raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def initialize_distributed() -> None:
  """``jax.distributed.initialize()`` when this is one process of several, else nothing.

  Several: ``JAX_COORDINATOR_ADDRESS`` set or ``JAX_NUM_PROCESSES`` > 1, or
  a cluster jax detects (SLURM with more than one task, a TPU pod).
  """
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:
    # jax reads only the coordinator address from the environment; without a
    # detected cluster the process count and id must be passed. CPU processes
    # reduce over gloo (jax's default; JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi
    # picks MPI).
    env = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                              ("process_id", "JAX_PROCESS_ID"))
           if os.environ.get(v)}
    jax.distributed.initialize(**env)
  elif os.environ.get("SLURM_NTASKS", "1") != "1" or os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize()   # cluster auto-detection
