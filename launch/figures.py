"""Draw the pictures of docs/ from what runs wrote: sheets side by side, loss curves, metric bars.

Also ``verdicts``: the suite's rule (margin beyond the spread) for any pairs of
variants of an evaluation, as a markdown table on stdout.

  python -m launch.figures sheets --results R.json --sheets DIR --variants method,no_cascade \\
      --cases 0,3 --frames 4 --out docs/images/x.png
  python -m launch.figures loss --run k5=W/sr4_k5 --run k3=W/sr4_k3 --out docs/images/loss.png
  python -m launch.figures metrics --results R.json --metric colour_error --metric shape_iou \\
      --out docs/images/metrics.png
  python -m launch.figures verdicts --results R.json --pair method:sr_kernel3 \\
      --metric single_instance --metric colour_error

Inputs are ``launch.evaluate --out R.json --sheets DIR`` and training workdirs
(their ``tb/`` events). Every PNG is kept under ``--max-kb`` (300: the docs' limit).
"""

from __future__ import annotations

import argparse
import sys

from launch import _common


def _names(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def _indices(text: str) -> list[int]:
  try:
    return [int(t) for t in _names(text)]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a list of case numbers like 0,3"
                                     ) from None


def main(argv=None) -> int:
  """``python -m launch.figures`` (see the module docstring); returns the exit status."""
  _common.quiet()
  p = _common.ArgumentParser(prog="python -m launch.figures", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="kind", required=True)
  s = sub.add_parser("sheets", help="cases of several variants' evaluation sheets, stacked")
  s.add_argument("--results", required=True, help="the run's JSON (it says how many cases)")
  s.add_argument("--sheets", required=True, help="the run's --sheets directory")
  s.add_argument("--variants", required=True, type=_names, help="comma-separated, in order")
  s.add_argument("--cases", type=_indices, default=[0, 1], help="case rows to show (0,1)")
  s.add_argument("--frames", type=_common.int_range(1), default=None,
                 help="frames per row (default all)")
  l_ = sub.add_parser("loss", help="training loss of one or more workdirs")
  l_.add_argument("--run", action="append", required=True, help="LABEL=WORKDIR (repeat)")
  l_.add_argument("--tag", default="loss", help="the scalar (default loss)")
  m = sub.add_parser("metrics", help="mean ± std bars per variant, with the scale rows")
  m.add_argument("--results", required=True, help="launch.evaluate's JSON")
  m.add_argument("--metric", action="append", required=True, help="a metric (repeat)")
  m.add_argument("--variants", type=_names, default=None, help="comma-separated (default all)")
  v = sub.add_parser("verdicts", help="does A beat B beyond the spread? (markdown, stdout)")
  v.add_argument("--results", required=True, help="launch.evaluate's JSON")
  v.add_argument("--pair", action="append", required=True, help="A:B (repeat)")
  v.add_argument("--metric", action="append", required=True, help="a metric (repeat)")
  for q in (s, l_, m):
    q.add_argument("--out", required=True, help="the PNG to write")
    q.add_argument("--title", default="", help="a title line")
    q.add_argument("--max-kb", type=_common.int_range(16, 10_000), default=300,
                   help="size limit of the PNG in KB")
  args = p.parse_args(sys.argv[1:] if argv is None else argv)
  if args.kind == "verdicts":
    return _common.run(lambda: _verdicts(args))
  problem = _common.out_dir_problem(args.out)
  if problem:
    return _common.fail(problem)

  def body() -> int:
    from persvid_jax.evaluate import figures
    try:
      if args.kind == "sheets":
        results = figures.load_results(args.results)
        cfg = results.get("config") or {}
        rows = int(cfg.get("subjects", 0)) * int(cfg.get("prompts", 0))   # one row per case
        sheets = {v: f"{args.sheets}/{v}.png" for v in args.variants}
        image = figures.side_by_side(sheets, rows, args.cases, frames=args.frames)
      elif args.kind == "loss":
        runs = {}
        for item in args.run:
          label, sep, workdir = item.partition("=")
          if not sep or not label or not workdir:
            return _common.fail(f"--run {item!r}: use LABEL=WORKDIR")
          runs[label] = workdir
        image = figures.loss_plot(runs, tag=args.tag, title=args.title)
      else:
        image = figures.metrics_plot(figures.load_results(args.results), args.metric,
                                     variants=args.variants, title=args.title)
      path, size = figures.save_small_png(args.out, image, max_kb=args.max_kb)
    except figures.FigureError as e:
      return _common.fail(str(e))
    print(f"wrote {path} ({size / 1024:.0f} KB, {image.shape[1]}x{image.shape[0]} before fitting)")
    return 0

  return _common.run(body)


def _verdicts(args) -> int:
  from persvid_jax.evaluate import figures, verdicts
  try:
    results = figures.load_results(args.results).get("variants") or {}
  except figures.FigureError as e:
    return _common.fail(str(e))
  ran = [n for n, r in results.items() if r.get("status") == "ok"]
  table = {}
  for pair in args.pair:
    a, sep, b = pair.partition(":")
    if not sep or a not in ran or b not in ran:
      return _common.fail(f"--pair {pair!r}: use A:B of variants that ran ({', '.join(ran)})")
    for metric in args.metric:
      try:
        table[f"pair/{a}/{b}/{metric}"] = verdicts.verdict(results, a, b, metric)
      except (ValueError, KeyError) as e:
        return _common.fail(f"--metric {metric!r}: {e}")
  print(verdicts.verdict_table(table), end="")
  return 0


if __name__ == "__main__":
  sys.exit(main())
