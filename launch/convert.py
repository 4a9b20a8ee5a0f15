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
``--from`` model's config. Only safetensors are read, never pickle.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import resource
import shutil
import sys
import time

from launch import _common
from persvid_jax import atomic

KINDS = ("clip", "unet3d", "vae")


def main(argv=None) -> int:
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
    out = pathlib.Path(args.out)
    problem = _common.out_dir_problem(out)
    if problem:
      return _common.fail(problem)
    if out.exists():
      return _common.fail(f"--out {out} exists; give a new directory")
    src = pathlib.Path(args.src)
    if not src.is_dir():
      return _common.fail(f"--src {src} is not a directory")
    t0 = time.perf_counter()

    import jax
    import numpy as np
    from persvid_jax import checkpoint as ckpt_lib
    from persvid_jax import config_lib
    from persvid_jax.convert import common
    from persvid_jax.pipeline import model as model_lib

    if args.base:
      config = model_lib.collect_networks([args.base], fill_missing=False)[0]
      config = config.copy_and_resolve_references()
    else:
      config = config_lib.load_config(args.config)
    config = config_lib.apply_overrides(config, overrides)
    hf = common.read_config(src)

    if args.kind == "clip":
      from persvid_jax.convert import clip
      config.text.update(clip.text_config(hf, num_placeholders=config.concepts.capacity))
      tok_dir = pathlib.Path(args.tokenizer) if args.tokenizer else src
      if (tok_dir / "vocab.json").is_file() and (tok_dir / "merges.txt").is_file():
        config.text.tokenizer_dir = str(tok_dir.resolve())
      elif args.tokenizer:
        return _common.fail(f"--tokenizer {tok_dir}: no vocab.json + merges.txt there")
      state = common.read_state(src, ("model.safetensors",))
      has_vision = any(k.startswith("vision_model.") for k in state)
      if has_vision:
        config.image.update(clip.image_config(hf, projection=config.image.projection_dim > 0))
      stack, _ = _stack(config)
      abstract = _abstract(stack, ["text_encoder"] + (["image_encoder"] if has_vision else []))
      params = {"text_encoder": clip.text_encoder_params(state, abstract["text_encoder"],
                                                         source=str(src))}
      if has_vision:
        params["image_encoder"] = clip.image_encoder_params(state, abstract["image_encoder"],
                                                            source=str(src))
      report = {}
    elif args.kind == "vae":
      from persvid_jax.convert import vae
      config.vae = vae.vae_config(hf)
      state = common.read_state(src, vae.WEIGHTS_FILES)
      params = {"vae": vae.vae_params(state, config.vae, source=str(src))}
      report = {}
    else:
      from persvid_jax.convert import unet3d
      net = args.network
      config[net].update(unet3d.unet_config(hf))
      stack, _ = _stack(config)
      abstract = _abstract(stack, [net])
      state = common.read_state(src, unet3d.WEIGHTS_FILES)
      converted, report = unet3d.unet_params(state, abstract[net], network=net,
                                             source=str(src))
      params = {net: converted}

    config.train.init_from = str(pathlib.Path(args.base).resolve()) if args.base else None
    if args.kind != "vae":      # the VAE is no training stage's network
      config.train.stage = "personalize" if args.kind == "clip" else (
          "sr" if args.network == "sr_unet" else "base")
    with atomic.directory(out) as tmp:
      manager = ckpt_lib.make_manager(tmp / "checkpoints", async_save=False)
      ckpt_lib.save(manager, 0, {"ema_params": params}, config)
      manager.wait_until_finished()
      manager.close()
      (tmp / "config.json").write_text(config.to_json(indent=2))
      n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
      info = dict(kind=args.kind, src=str(src.resolve()), networks=sorted(params),
                  parameters=n, new=report.get("new", []), widened=report.get("widened", []),
                  from_model=config.train.init_from,
                  seconds=round(time.perf_counter() - t0, 1),
                  peak_host_memory_gib=round(
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  created=datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"))
      (tmp / "convert.json").write_text(json.dumps(info, indent=2))
    # Read back what was written (Orbax round trip), checked against the code again.
    _, written, _ = model_lib.collect_networks([out], fill_missing=False,
                                               networks=tuple(params))
    for name in params:
      got = jax.tree.map(np.shape, written[name])
      if got != jax.tree.map(np.shape, params[name]):
        shutil.rmtree(out)
        return _common.fail(f"{out}: {name} did not read back as written; nothing kept")
    print(f"converted {', '.join(sorted(params))} ({n:,} parameters) from {src} to {out} "
          f"in {info['seconds']:.1f} s, peak host memory {info['peak_host_memory_gib']} GiB")
    if report.get("new"):
      print(f"  {len(report['new'])} parameters new in persvid (zero / copied: the "
            f"checkpoint's function), e.g. {report['new'][0]}")
    if report.get("widened"):
      print(f"  {len(report['widened'])} kernels widened with zeros, e.g. {report['widened'][0]}")
    rest = [n for n in model_lib.NETWORKS if n not in params]
    print(f"  the other networks ({', '.join(rest)}) come from "
          f"{args.base or 'the seeded init'} when --model {out} loads")
    return 0

  return _common.run(body)


def _stack(config):
  from persvid_jax.concepts.tokens import PromptTokenizer
  from persvid_jax.convert import ConvertError
  from persvid_jax.models.stack import ModelStack
  try:
    tokenizer = PromptTokenizer.from_config(config)
    stack = ModelStack.from_config(config, eos_token_id=tokenizer.eos_id)
    stack.abstract_variables()     # shape errors surface here, not half-way
  except ValueError as e:
    raise ConvertError(f"the source's architecture does not fit the config: {e}") from None
  return stack, tokenizer


def _abstract(stack, names):
  from persvid_jax.convert import common
  variables = stack.abstract_variables(names)
  return {n: common.nn_unbox(variables[n])["params"] for n in names}


if __name__ == "__main__":
  sys.exit(main())
