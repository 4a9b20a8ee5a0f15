"""Convert pretrained weights (safetensors) into a model directory ``--model`` accepts.

  python -m launch.convert --kind clip --src CLIP_DIR --out M1 [--config configs/modelscope.py]
  python -m launch.convert --kind unet3d --src UNET_DIR --out M2 --from M1 [--network sr_unet]
  python -m launch.convert --kind vae --src VAE_DIR --out M3 --from M2

``--kind clip``: a ``transformers`` CLIP directory (``CLIPModel`` or one tower;
``config.json`` + safetensors) -> our text encoder (+ image encoder when the
vision tower is there); its tokenizer files, if present in ``--src`` or given
by ``--tokenizer``, become the model's tokenizer. ``--kind unet3d``: a
diffusers ``UNet3DConditionModel`` directory (ModelScope / Zeroscope ``unet/``)
-> our base generator, or the SR generator with ``--network sr_unet``.
``--kind vae``: a diffusers ``AutoencoderKL`` directory (``vae/``) -> our
``vae`` network (``models/vae.py``) and ``config.vae``; it sits beside the
six networks (``collect_networks(..., networks=("vae",))`` reads it).

The output is a workdir-shaped directory (``checkpoints/0`` in Orbax with the
config, plus ``convert.json``: source, networks, new and widened parameters,
time). ``--from`` chains conversions: networks not converted here come from
that model (and its chain); those found nowhere get the seeded init. The
architecture fields of the config come from the source's ``config.json``; the
rest (concept capacity, detail attention, video size) from ``--config`` or the
``--from`` model's config. Only safetensors are read, never pickle
(``persvid_jax/convert/run.py``).
"""

from __future__ import annotations

import pathlib
import sys

from launch import _common
from persvid_jax import atomic

KINDS = ("clip", "unet3d", "vae")      # persvid_jax.convert.run.KINDS, without importing jax


def main(argv=None) -> int:
  """``python -m launch.convert`` (see the module docstring); returns the exit status."""
  _common.quiet()
  p = _common.ArgumentParser(prog="python -m launch.convert",
                              description=__doc__.split("\n")[0],
                              epilog="Any --config.KEY=VALUE overrides that config field.")
  p.add_argument("--kind", required=True, choices=KINDS, help="the source format")
  p.add_argument("--src", required=True, help="the source model directory")
  p.add_argument("--out", required=True, help="the model directory to write (new)")
  p.add_argument("--config", default="configs/modelscope.py",
                 help="our config the source's architecture is written into "
                      "(default configs/modelscope.py; ignored with --from)")
  p.add_argument("--from", dest="base", metavar="MODEL",
                 help="an earlier converted / exported model: its config and its networks")
  p.add_argument("--network", choices=("unet", "sr_unet"), default="unet",
                 help="--kind unet3d: which of our generators the UNet becomes")
  p.add_argument("--tokenizer", help="--kind clip: a CLIP tokenizer directory (default: "
                                     "--src if it holds vocab.json + merges.txt)")
  args, overrides = _common.parse_args(p, argv)

  def body() -> int:
    problem = _common.out_dir_problem(pathlib.Path(args.out))
    if problem:
      return _common.fail(problem)
    # After the flags are checked: importing jax and the models takes seconds.
    from persvid_jax.convert import run
    result = run.convert(args.kind, args.src, args.out, config_spec=args.config,
                         base=args.base, network=args.network, tokenizer=args.tokenizer,
                         overrides=overrides)
    print(run.summary(result, args.base))
    return 0

  return _common.run(body)


if __name__ == "__main__":
  sys.exit(main())
