"""Time our train / denoise steps (and the cascade, adding a concept) against diffusers.

  python -m launch.bench [--config modelscope] [--peer] [--json FILE]
      [--which train,denoise256,denoise512,cascade,concept,attention]
      [--batch B --frames T --size S --text-len L] [--steps N] [--peak-tflops P]
  python -m launch.bench --count [--peer] [--config modelscope] [--json FILE]
  python -m launch.bench --aot h100|h200|a100 [--config modelscope] [--json FILE]
      [--which train,denoise256,denoise512,concept,sr512] [--hlo-dir DIR] [--gpus N --fsdp F]

Prints a markdown table (``persvid_jax/bench`` says what each column
measures). The default config is ``modelscope`` at the reference shapes of
docs/benchmarks.md (a GPU job: ``bash launch/bench_gpu.sh``); ``--config tiny`` runs
on a CPU in seconds.
``--count`` runs nothing: it counts the FLOPs of train / denoise256 / denoise512
from the lowered programs (and, with ``--peer``, the peer's on torch's meta
device) and prints what the targets (docs/benchmarks.md) ask in ms, TFLOP/s and MFU, in about a
minute on a CPU at the full ModelScope size. ``--aot CARD`` compiles the same
three programs (by default; with ``--which``, also adding a concept's encoders,
``concept``, and the cascade's SR step, ``sr512``) for that GPU without one (jax's
CUDA plugin, ``pip install 'jax[cuda12]'``, no GPU or driver;
``persvid_jax/bench/aot.py``) and prints whether
each compiles, the device memory XLA assigns, and the kernels it launches, in a
few minutes per program on a CPU. Imports no TensorFlow.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from launch import _common
from persvid_jax import atomic
from persvid_jax import config_lib


def _parse(argv):
  p = _common.ArgumentParser(
      prog="python -m launch.bench", description="Benchmark our steps against diffusers' UNet3D.")
  p.add_argument("--config", default="modelscope", help="configs/NAME.py[:variant] or NAME")
  p.add_argument("--peer", action="store_true",
                 help="also time diffusers' UNet3DConditionModel (torch) on the same inputs")
  p.add_argument("--peer-compile", choices=("auto", "yes", "no"), default="auto",
                 help="torch.compile the peer (auto: on a GPU only)")
  p.add_argument("--json", help="write the results to this JSON file")
  p.add_argument("--which",
                 help="comma-separated works (default: all but attention, which times "
                 "attention alone, XLA's kernel against cuDNN's; with --count: train, "
                 "denoise256, denoise512; --aot also takes concept and sr512)")
  p.add_argument("--count", action="store_true",
                 help="count FLOPs only (no weights, no device; --peer: the peer's too) and "
                 "print what the targets (docs/benchmarks.md) ask of each row")
  p.add_argument("--aot", metavar="CARD",
                 help="compile train / denoise256 / denoise512 (--which: also concept, "
                 "sr512) for this GPU without one "
                 "(h100, h200, a100; needs jax's CUDA plugin) and report memory and kernels")
  p.add_argument("--hlo-dir", help="--aot: write each compiled program here (WORK.hlo.txt)")
  p.add_argument("--gpus", type=_common.int_range(1), default=1,
                 help="--aot: compile the train step sharded over this many GPUs of one host")
  p.add_argument("--fsdp", type=_common.int_range(1), default=1,
                 help="--aot --gpus N: GPUs per parameter shard (the rest data parallel)")
  positive = _common.int_range(1)
  p.add_argument("--batch", type=positive, help="train batch (default 4)")
  p.add_argument("--frames", type=positive, help="frames (default config.video.frames)")
  p.add_argument("--size", type=positive, help="latent side at the base scale "
                 "(default config.video.height; denoise512 uses twice it)")
  p.add_argument("--text-len", type=positive,
                 help="text length (default config.text.max_length)")
  p.add_argument("--steps", type=positive, default=10, help="timed calls per row (median)")
  p.add_argument("--sample-steps", type=positive, default=25, help="cascade: base DDIM steps")
  p.add_argument("--sr-steps", type=positive, default=10, help="cascade: SR DDIM steps")
  p.add_argument("--peak-tflops", type=_common.float_range(0, lo_open=True),
                 help="peak for MFU (default by device: H100/H200 989 dense bf16; CPU: none)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  """``python -m launch.bench`` (see the module docstring); returns the exit status."""
  args = _parse(sys.argv[1:] if argv is None else argv)
  if args.json:   # checked now, not when the first row is saved after minutes
    problem = _common.out_dir_problem(pathlib.Path(args.json), "--json")
    if problem:
      return _common.fail(problem)
  if args.aot:
    if args.count or args.peer:
      return _common.fail("--aot compiles our programs only: drop --count / --peer")
    if args.hlo_dir:
      problem = _common.dir_problem(pathlib.Path(args.hlo_dir), "--hlo-dir")
      if problem:
        return _common.fail(problem)
    # The card is not here: only the CPU backend may start (the CUDA plugin would
    # look for a GPU and a driver); the plugin still compiles for the card.
    os.environ["JAX_PLATFORMS"] = "cpu"
  elif args.hlo_dir or args.gpus != 1 or args.fsdp != 1:
    return _common.fail("--hlo-dir, --gpus and --fsdp go with --aot CARD")
  # Peer (torch) and ours share one GPU: allocate on demand, not 75% up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  _common.quiet()
  # Deferred: jax reads JAX_PLATFORMS / XLA_PYTHON_CLIENT_PREALLOCATE, set above, at import.
  from persvid_jax import bench
  from persvid_jax.bench import aot
  try:
    config = config_lib.load_config(args.config)
    works = bench.parse_works(args.which, "count" if args.count else "aot" if args.aot else None)
    shapes = bench.default_shapes(config, batch=args.batch, frames=args.frames,
                                  size=args.size, text_len=args.text_len)
  except (config_lib.ConfigError, bench.BenchError) as e:
    return _common.fail(str(e))
  if args.peer:
    try:
      import diffusers  # noqa: F401
      import torch  # noqa: F401
    except ImportError as e:
      return _common.fail(f"--peer needs torch and diffusers ({e}); pip install -e '.[parity]'")
  log = lambda msg: print(msg, file=sys.stderr, flush=True)

  def save(result):   # after every row: a run cut by a time limit keeps its rows
    if args.json:
      atomic.write_text(args.json, json.dumps(result, indent=2))

  if args.aot:
    if args.aot not in aot.CARDS:
      return _common.fail(f"--aot {args.aot!r}: use one of {', '.join(aot.CARDS)}")
    if args.hlo_dir:
      pathlib.Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
    try:
      result = bench.aot_report(config, shapes, works, args.aot, gpus=args.gpus,
                                fsdp=args.fsdp, log=log, dump_dir=args.hlo_dir)
    except (aot.AotError, bench.BenchError) as e:
      return _common.fail(str(e))
    save(result)
    print(bench.aot_markdown(result))
    return 0
  if args.count:
    result = bench.count_flops(config, shapes, works, peer=args.peer,
                               peak_tflops=args.peak_tflops, log=log)
    save(result)
    print(bench.flops_markdown(result))
    return 0
  try:
    result = bench.run(config, works, shapes, steps=args.steps, peer=args.peer,
                       peer_compile={"auto": None, "yes": True, "no": False}[args.peer_compile],
                       peak_tflops=args.peak_tflops, sample_steps=args.sample_steps,
                       sr_steps=args.sr_steps, log=log, on_row=save)
  except bench.BenchError as e:
    return _common.fail(str(e))
  print(bench.markdown(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
