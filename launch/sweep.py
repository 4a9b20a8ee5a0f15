"""Run a grid of config overrides, one run per point, and collect one table.

  python -m launch.sweep --config configs/NAME.py[:variant] --workdir DIR \\
      --grid 'key=v1,v2;other=a,b' [--mode run|print|collect] [--kind train|evaluate]
      [--model DIR] [--config.KEY=VALUE ...]

``run`` (default) runs the points one after another (``launch.train`` or
``launch.evaluate``, each in ``DIR/<point>`` with its run record), skipping
complete ones, and writes ``DIR/sweep.md`` + ``DIR/sweep.json``; ``print``
prints one command per point (for a pod) and runs nothing; ``collect``
gathers what the points wrote. ``--config.KEY=VALUE`` applies to every point.
Exit status: 0 when every point is complete, 1 when one failed, 2 for a bad
grid or flag. See ``persvid_jax/sweep.py``.
"""

from __future__ import annotations

import sys

from launch import _common


def main(argv=None) -> int:
  p = _common.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n")[0],
                              epilog="Any --config.KEY=VALUE overrides that field in every point.")
  p.add_argument("--config", required=True, help="configs/NAME.py[:variant] of every point")
  p.add_argument("--grid", required=True, help="'key=v1,v2;other=a,b' (values: Python literals)")
  p.add_argument("--workdir", required=True, help="the sweep's directory (one subdir per point)")
  p.add_argument("--mode", default="run", choices=("run", "print", "collect"))
  p.add_argument("--kind", default="train", choices=("train", "evaluate"),
                 help="launch.train per point, or launch.evaluate (ablation sweeps)")
  p.add_argument("--model", help="--kind evaluate: the model to evaluate (default the shipped one)")
  args, overrides = _common.parse_args(p, argv)
  # Not _common.run: its error list imports jax and the models, which this
  # parent process never needs (the points run in their own processes).
  _common.quiet()
  from persvid_jax import sweep
  # Printed commands are for the machines that will run them: their own python.
  python = "python" if args.mode == "print" else sys.executable
  try:
    summary = sweep.run(args.config, args.grid, args.workdir, [python, "-m", f"launch.{args.kind}"],
                        kind=args.kind, mode=args.mode, fixed=overrides, model=args.model,
                        log=lambda s: print(s, flush=True))
  except sweep.SweepError as e:
    return _common.fail(str(e))
  except KeyboardInterrupt:
    return _common.fail("interrupted; rerun the same command: complete points are skipped, "
                        "the interrupted one resumes from its checkpoint")
  if args.mode == "print":
    return 0
  print("\n" + sweep.markdown(summary))
  print(f"wrote {args.workdir}/sweep.md and {args.workdir}/sweep.json")
  return 0 if all(pt["status"] == "ok" for pt in summary["points"]) else 1


if __name__ == "__main__":
  sys.exit(main())
