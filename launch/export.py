"""Export trained stages as one inference model (config.json + model.safetensors).

  python -m launch.export --workdir W/personalize --workdir W/sr --out DIR

Each network is taken from the first workdir (in the order given, then along
their ``config.train.init_from`` chains) whose checkpoint holds it (EMA
params), validated strictly against the code, and written to DIR atomically.
DIR must be new, empty, or an exported model (which is then replaced);
anything else is refused before loading, never deleted.
``--model DIR`` of generate/concepts/demo then loads it; the shipped demo
model (``persvid_jax/assets/demo``) was made this way.
"""

from __future__ import annotations

import os
import pathlib
import sys

from launch import _common


def main(argv=None) -> int:
  """``python -m launch.export`` (see the module docstring); returns the exit status."""
  _common.quiet()           # before any library import (transformers logs on import)
  p = _common.ArgumentParser(prog="python -m launch.export", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", action="append", required=True,
                 help="a training workdir (repeat; earlier ones win)")
  p.add_argument("--out", required=True, help="the model directory to write")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)

  def body() -> int:
    # Deferred: importing jax and the models takes seconds; --help answers first.
    import jax
    from persvid_jax.pipeline import model as model_lib
    out = pathlib.Path(args.out)
    # Before loading: the new model goes to a temp sibling, then replaces OUT.
    problem = _common.dir_problem(out)
    if problem:
      return _common.fail(problem)
    if out.exists() and not os.access(out.parent, os.W_OK | os.X_OK):
      return _common.fail(f"--out {out}: directory {out.parent} is not writable (the new "
                          "model is written beside OUT, then swapped in)")
    try:
      model_lib.check_export_target(out)
    except model_lib.ModelError as e:
      return _common.fail(f"--out {e}")
    model = model_lib.load_model(args.workdir)
    out = model_lib.export_model(model, out)
    n = sum(v.size for v in jax.tree.leaves(model.params))
    print(f"exported {n:,} parameters to {out} (feature id {model.feature_id})")
    for s in model.info.get("sources", []):
      if "workdir" in s:
        where = f"{s['workdir']} step {s['step']}"
      elif "model" in s:
        where = f"exported model {s['model']}"
      else:
        where = f"seeded init (seed {s.get('init_seed')})"
      print(f"  {', '.join(s['networks'])}: {where}")
    return 0

  return _common.run(body)


if __name__ == "__main__":
  sys.exit(main())
