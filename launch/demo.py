"""The main job: personalized videos of unseen subjects, all six modes, on the shipped model.

  python -m launch.demo [--out outputs] [--model DIR] [--seed 0]

Builds a concept database from shipped photos of held-out subjects, generates
one video per mode (concept, concept+target, target, concept+scene, text,
text+scene) as mp4 + gif, a contact sheet, and prints the subject-fidelity
numbers with and without the concept in the prompt. Under 2 minutes on a
2-core CPU, compilation included (docs/concepts-and-generation.md).
"""

from __future__ import annotations

import pathlib
import sys
import time

from launch import _common


def main(argv=None) -> int:
  """``python -m launch.demo`` (see the module docstring); returns the exit status."""
  _common.quiet()           # before any library import (transformers logs on import)
  p = _common.ArgumentParser(prog="python -m launch.demo", description=__doc__.split("\n")[0])
  p.add_argument("--out", default="outputs", help="output directory (default ./outputs)")
  p.add_argument("--model", help="exported model or training workdir (default: the demo model)")
  p.add_argument("--seed", type=_common.SEED, default=0)
  p.add_argument("--steps", type=_common.int_range(1),
                 help="base sampler steps (default: the model's config)")
  p.add_argument("--sr-steps", type=_common.int_range(1),
                 help="super-resolution sampler steps (default: the model's config)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--make-photos", metavar="DIR",
                 help="only render the demo photos into DIR (how the shipped ones were made)")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)

  def body() -> int:
    # Before anything is built or loaded (a bad place is one line, at once).
    problem = (_common.dir_problem(pathlib.Path(args.make_photos), "--make-photos")
               if args.make_photos else _common.dir_problem(pathlib.Path(args.out)))
    if problem:
      return _common.fail(problem)
    _common.compilation_cache()
    # After the flags are checked: importing jax and the models takes seconds.
    from persvid_jax.apps import demo
    from persvid_jax.pipeline import model as model_lib
    if args.make_photos:
      for path in demo.make_photos(args.make_photos):
        print(path)
      return 0
    t0 = time.perf_counter()
    model = model_lib.load_model(args.model)
    print(f"model: {model.source} ({model.config.name}), loaded in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    summary = demo.run_demo(model, args.out, seed=args.seed, steps=args.steps,
                            sr_steps=args.sr_steps, progress=not args.no_progress)
    print(demo.format_summary(summary))
    print(f"\nall outputs in {args.out}/ ({time.perf_counter() - t0:.0f} s in all)")
    return 0

  return _common.run(body)


if __name__ == "__main__":
  sys.exit(main())
