"""Train one stage of persvid_jax.

  python -m launch.train --config configs/NAME.py[:variant] --workdir DIR \\
      [--config.train.total_steps=20 --config.data.data_dir=/tmp/tfds ...]

Resumes from DIR's latest checkpoint. SIGTERM / SIGINT (preemption, ``timeout``,
Ctrl-C) finish the current step, save a checkpoint and exit with status 0;
a second Ctrl-C interrupts at once. One that arrives after the last step
(during the final save or the teardown) changes nothing: still status 0. Multi-host: when launched as one of
several processes (``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` set, or a cluster jax detects such as SLURM or a TPU pod),
``jax.distributed.initialize()`` runs first. ``--config.KEY=VALUE`` overrides
any config field (``ml_collections`` dotted names; values are Python literals).
The loop is ``persvid_jax/train/loop.py``; the process around it
``persvid_jax/train/process.py``.
"""

from __future__ import annotations

import logging
import sys

from launch import _common
from persvid_jax import config_lib


def _parse(argv):
  parser = _common.ArgumentParser(
      prog="python -m launch.train",
      description="Train one stage of persvid_jax (resumes from --workdir).",
      epilog="Any --config.KEY=VALUE overrides that config field.")
  parser.add_argument("--config", required=True, help="configs/NAME.py[:variant]")
  parser.add_argument("--workdir", required=True, help="checkpoints, TensorBoard, samples")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar; a log line every log_every_steps instead")
  return _common.parse_args(parser, argv)


def main(argv=None) -> int:
  """``python -m launch.train`` (see the module docstring); returns the exit status."""
  args, overrides = _parse(sys.argv[1:] if argv is None else argv)
  try:
    config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
    # Before the run record, the workdir and the model: a bad number, stage,
    # init_from, data folder or workdir is one line now, not a traceback (or a
    # half-written workdir) after minutes of compiling.
    config_lib.check_train_config(config)
    problem = config_lib.workdir_problem(args.workdir)
    if problem:
      raise config_lib.ConfigError(problem)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  # Our own progress at INFO; libraries (orbax's ~100 absl lines per save, jax's
  # "no TPU" probe) only at WARNING, or they drown the loop's lines.
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("persvid_jax").setLevel(logging.INFO)
  # After the config checks: jax, the data pipeline and the models take seconds to import.
  from persvid_jax import records
  from persvid_jax.data import DataError
  from persvid_jax.pipeline.model import ModelError
  from persvid_jax.train import loop, process
  process.initialize_distributed()
  try:
    loop.check_mesh(config)   # needs the devices: after the distributed init
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  # A resumed or repeated run (preemption, a sweep point) loads the compiled
  # train step instead of compiling it again: minutes at the ModelScope size.
  _common.compilation_cache()
  # After the distributed init (the record reads the devices); process 0 writes
  # WORKDIR/run_record.json and warns about what differs from the last run there.
  records.record_run(args.workdir, config, extra={"kind": "train"})
  # Installed before the loop, so that the loop's own handlers restore these
  # (not Python's defaults) when it returns: no gap for a late signal.
  after = process.AfterRun().install()
  try:
    result = loop.train_and_evaluate(config, args.workdir, progress=not args.no_progress)
  except (DataError, FileNotFoundError, ModelError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except FloatingPointError as e:
    # Divergence is not bad input (exit 1, not 2); the message names the step
    # and the last good checkpoint, a traceback would add nothing.
    print(f"error: {e}", file=sys.stderr)
    return 1
  after.complete = True
  # A SIGTERM / SIGINT stop saved a checkpoint: a clean exit (status 0), so
  # a scheduler requeues the job and the next launch resumes from it.
  done = f"stopped by {result.stopped_by}" if result.stopped_by else "done"
  print(f"{done}: step {result.step} (from {result.first_step}), "
        f"loss {result.last_metrics.get('loss', float('nan')):.4f}, "
        f"{result.steps_per_second:.2f} steps/s, compile {result.compile_seconds:.1f} s"
        f"{' (XLA from the cache)' if result.compile_from_cache else ''}, "
        f"workdir {result.workdir}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
