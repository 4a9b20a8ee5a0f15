"""Evaluate a model: ground-truth suite, ablations, DreamBench protocol.

  python -m launch.evaluate --out results.json [--config configs/eval.py[:size=tiny]]
      [--model DIR] [--ablations] [--variant-model NAME=DIR[,DIR]] [--dreambench | --probe]

Default: the method vs the concept removed on held-out ``persvid_synthetic``
subjects (sizes from ``--config``). ``--ablations``: every variant of
``persvid_jax.evaluate.suite.VARIANTS`` in one table; variants that need a
model trained for them (SR kernel, swap site) run when given with
``--variant-model`` and are listed as not run otherwise. ``--dreambench``:
the DreamBench protocol (CLIP-T, CLIP-I, DINO-I, temporal consistency,
dynamic degree) over ``config.dreambench.root`` instead. ``--probe``: the
denoising probe (``persvid_jax.evaluate.probe``): does the generator use the
reference, the detail tokens, the words? (about a minute on 2 CPU cores;
no sampling).

Writes ``--out`` (JSON) and the same name with ``.md`` (the table); both
appear only when the run is complete (``persvid_jax/evaluate/run.py``).
"""

from __future__ import annotations

import pathlib
import sys

from launch import _common
from persvid_jax import config_lib


def main(argv=None) -> int:
  """``python -m launch.evaluate`` (see the module docstring); returns the exit status."""
  _common.quiet()
  argv = sys.argv[1:] if argv is None else argv
  p = _common.ArgumentParser(prog="python -m launch.evaluate",
                              description=__doc__.split("\n")[0],
                              epilog="Any --config.KEY=VALUE overrides that config field.")
  p.add_argument("--out", required=True, help="results JSON (the table goes next to it as .md)")
  p.add_argument("--config", default="configs/eval.py", help="configs/eval.py[:size=tiny]")
  p.add_argument("--model", help="exported model or training workdir(s), comma-separated "
                                 "(default: the shipped demo model)")
  p.add_argument("--ablations", action="store_true", help="run every variant")
  p.add_argument("--variant-model", action="append", default=[], metavar="NAME=DIR[,DIR]",
                 help="the model trained for a variant (sr_kernel5, sr_kernel3, "
                      "sr_kernel3_dil2, swap_input, swap_output); the variant's own "
                      "workdir first, e.g. sr_kernel3=W/sr_kernel3,W/personalize")
  p.add_argument("--dreambench", action="store_true",
                 help="run the DreamBench protocol instead of the synthetic suite")
  p.add_argument("--probe", action="store_true",
                 help="run the denoising probe instead (does the generator use the "
                      "reference, the detail tokens, the words? about a minute on 2 CPU "
                      "cores, no sampling)")
  p.add_argument("--sheets", metavar="DIR",
                 help="also write a contact sheet per variant (first seed) into DIR")
  p.add_argument("--progress", action="store_true", help="sampler progress bars")
  args, overrides = _common.parse_args(p, argv)

  def body() -> int:
    out = pathlib.Path(args.out)
    if out.suffix != ".json":
      return _common.fail(f"--out {out}: give a .json path (the table is written beside it)")
    # Every output place is checked here, not when it is written after the run.
    problem = (_common.out_dir_problem(out) or _common.out_dir_problem(out.with_suffix(".md"))
               or (args.sheets and _common.dir_problem(pathlib.Path(args.sheets), "--sheets")))
    if problem:
      return _common.fail(problem)
    config = config_lib.apply_overrides(config_lib.load_config(args.config), overrides)
    variant_paths = {}
    for item in args.variant_model:
      name, sep, paths = item.partition("=")
      if not sep or not paths:
        return _common.fail(f"--variant-model {item!r}: use NAME=DIR[,DIR]")
      variant_paths[name] = paths.split(",")
    _common.compilation_cache()
    # After the flags are checked: importing jax and the models takes seconds.
    from persvid_jax.evaluate import run
    done = run.evaluate(config, out, model=args.model.split(",") if args.model else None,
                        variant_models=variant_paths, ablations=args.ablations,
                        run_dreambench=args.dreambench, run_probe=args.probe,
                        sheets=args.sheets, progress=args.progress,
                        command=" ".join(["python -m launch.evaluate", *map(str, argv)]),
                        log=lambda s: print(s, flush=True))
    print("\n" + done.table)
    print(f"wrote {done.paths[0]} and {done.paths[1]}")
    return 0

  return _common.run(body)


if __name__ == "__main__":
  sys.exit(main())
