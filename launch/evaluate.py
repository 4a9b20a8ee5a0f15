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
appear only when the run is complete.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from launch import _common
from persvid_jax import atomic


def main(argv=None) -> int:
  _common.quiet()
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
    from persvid_jax import config_lib
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
    from persvid_jax.evaluate import suite
    from persvid_jax.pipeline import model as model_lib
    known = {v.model for v in suite.VARIANTS if v.model}
    for name in variant_paths:
      if name not in known:
        return _common.fail(f"--variant-model {name}: no variant needs it; known: "
                            f"{', '.join(sorted(known))}")
    if args.dreambench and args.probe:
      return _common.fail("--dreambench and --probe: choose one")
    try:   # before the model loads: a bad suite config is one line, at once
      suite_cfg = suite.SuiteConfig.from_config(config.suite)
    except ValueError as e:
      raise config_lib.ConfigError(f"config.suite: {e}") from None
    t0 = time.perf_counter()
    model = model_lib.load_model(args.model.split(",") if args.model else None)
    print(f"model: {model.source} ({model.config.name})", flush=True)
    if args.probe:
      from persvid_jax.evaluate import probe
      result = probe.condition_probe(model, examples=int(config.probe.examples),
                                     timesteps=tuple(config.probe.timesteps),
                                     draws=int(config.probe.draws))
      table = probe.markdown(result)
    elif args.dreambench:
      from persvid_jax.evaluate import dreambench, protocol
      d = config.dreambench
      bench = dreambench.load(d.root)
      tok = model.tokenizer
      scorer = protocol.random_scorer(tok.encode, len(tok), tok.max_length,
                                      eos_token_id=tok.eos_id)
      print("note: random-weight CLIP/DINO encoders (no weights imported): the protocol "
            "runs end to end, its numbers are not comparable to papers'", flush=True)
      result = dreambench.run(model, scorer, bench, subjects=list(d.subjects) or None,
                              num_prompts=int(d.prompts) or None, seeds=tuple(d.seeds),
                              max_photos=int(d.photos), progress=args.progress)
      table = _dreambench_markdown(result)
    else:
      cfg = suite_cfg
      names = None if args.ablations else list(config.variants)
      try:
        suite.variants(names)
      except ValueError as e:
        raise config_lib.ConfigError(f"config.variants: {e}") from None
      models = {None: model}
      for name, paths in variant_paths.items():
        models[name] = model_lib.load_model(paths)
      if args.sheets:
        pathlib.Path(args.sheets).mkdir(parents=True, exist_ok=True)
      result = suite.run(models, cfg, names, progress=args.progress,
                         log=lambda s: print(s, flush=True), sheet_dir=args.sheets)
      table = suite.markdown(result)
    result["model"] = model.source
    result["command"] = " ".join(["python -m launch.evaluate", *(sys.argv[1:] if argv is None
                                                                 else argv)])
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    table += f"\n{result['wall_seconds']:.0f} s wall; command: `{result['command']}`\n"
    # OUT.run_record.json beside the results (and OUT.run_records/NNN.json):
    # what produced them; a rerun into the same name warns about differences.
    # Written with the results, so a run stopped by bad input leaves nothing.
    from persvid_jax import records
    records.record_run(out.parent, config, name=f"{out.stem}.run_record",
                       extra={"kind": "evaluate", "model": args.model or "shipped demo",
                              "variant_models": variant_paths, "ablations": args.ablations,
                              "dreambench": args.dreambench, "probe": args.probe})
    atomic.write_text(out.with_suffix(".md"), table)
    atomic.write_text(out, json.dumps(result, indent=2))
    print("\n" + table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0

  return _common.run(body)


def _dreambench_markdown(result) -> str:
  cols = [k for k in ("clip_t", "clip_i", "dino_i", "temporal_consistency", "flow", "dynamic")
          if k in result["means"]]
  lines = [f"DreamBench: {len(result['subjects'])} subjects x {result['num_prompts']} prompts x "
           f"{len(result['seeds'])} seeds; encoders: {result['weights']} weights.", "",
           "| subject | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
  for name, m in result["per_subject"].items():
    lines.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + " |")
  lines.append("| **mean** | " + " | ".join(f"{result['means'][c]:.3f}" for c in cols) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  sys.exit(main())
