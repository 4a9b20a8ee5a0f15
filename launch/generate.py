"""Generate a personalized video (any of the six modes of SPEC §1).

  python -m launch.generate --db DIR --prompt "a <NAME> moving left on grass" --out v.mp4
  python -m launch.generate --db DIR --prompt "a <NAME> ..." --image photo.jpg --out v.gif
  python -m launch.generate --prompt "a <image> moving up on snow" --image photo.jpg --out v.mp4

The mode follows from the prompt and the image: ``<name>`` only -> concept;
``<name>`` + image (``--image-role target``, the default) -> concept + target
image (fused detail); ``<image>`` + image -> target image only; ``<name>`` +
image with ``--image-role scene`` -> concept + non-target image; plain text ->
text; plain text + image -> text + non-target image. ``--mode`` states the
expected mode and fails (status 2) if the request means another.
``--sheet`` also writes a PNG contact sheet (reference crop beside the frames).
Bad input (an unusable image, an unknown concept, an empty prompt, steps < 1,
a negative guidance scale, ...) exits with status 2 and one line on stderr;
a prompt longer than the text encoder reads is truncated with a warning
(unless a concept would be cut: then it is an error).
"""

from __future__ import annotations

import math
import pathlib
import sys
import time

from launch import _common


def _parse(argv):
  from persvid_jax.pipeline.generate import FUSIONS, IMAGE_ROLES, MODES
  p = _common.ArgumentParser(prog="python -m launch.generate",
                              description="Generate a personalized video.")
  p.add_argument("--db", help="concept database directory (needed for <name> prompts)")
  p.add_argument("--prompt", required=True, help='e.g. "a <my_dog> moving left on grass"')
  p.add_argument("--image", help="a target photo of the subject, or a scene image")
  p.add_argument("--image-role", choices=IMAGE_ROLES,
                 help="target (default): the image shows the subject; scene: a non-target "
                      "image")
  p.add_argument("--mask", help="subject mask of --image (else it is segmented)")
  p.add_argument("--mode", choices=MODES, help="fail unless the request is this mode")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, help="base sampler steps (default: config)")
  p.add_argument("--sr-steps", type=int, help="super-resolution sampler steps")
  p.add_argument("--guidance", type=float, help="text guidance scale")
  p.add_argument("--detail-guidance", type=float, help="detail guidance scale")
  p.add_argument("--fusion", choices=FUSIONS, help="stored + image detail fusion")
  p.add_argument("--model", help="exported model or training workdir (default: demo)")
  p.add_argument("--out", required=True, help="FILE.mp4 or FILE.gif")
  p.add_argument("--sheet", nargs="?", const="", default=None,
                 help="also write a PNG contact sheet (default: OUT with .png)")
  p.add_argument("--scale", type=int, default=8, help="pixel enlargement of the outputs")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> int:
  _common.quiet()           # before any library import (transformers logs on import)
  args = _parse(sys.argv[1:] if argv is None else argv)

  def body() -> int:
    _common.compilation_cache()
    from persvid_jax.concepts import database as db_lib
    from persvid_jax.concepts import images
    from persvid_jax.pipeline import generate as gen
    out = pathlib.Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif"):
      raise gen.GenerationError(f"--out {out} must end in .mp4 or .gif")
    sheet = None
    if args.sheet is not None:
      sheet = pathlib.Path(args.sheet) if args.sheet else out.with_suffix(".png")
    problem = _common.out_dir_problem(out) or (
        sheet is not None and _common.out_dir_problem(sheet, "--sheet"))
    if problem:
      raise gen.GenerationError(problem)
    if args.steps is not None and args.steps < 1 or args.sr_steps is not None and args.sr_steps < 1:
      raise gen.GenerationError("--steps and --sr-steps must be >= 1")
    if not args.prompt.strip():
      raise gen.GenerationError("--prompt is empty; describe the video, e.g. "
                                "\"a <my_toy> moving left on grass\"")
    for flag, value in (("--guidance", args.guidance), ("--detail-guidance",
                                                         args.detail_guidance)):
      # 0 is unconditional sampling; below 0 pushes away from the prompt.
      if value is not None and not (math.isfinite(value) and value >= 0):
        raise gen.GenerationError(f"{flag} {value} must be >= 0 and finite (0 ignores the "
                                  "condition, 1 follows it without guidance)")
    if args.scale < 1:
      raise gen.GenerationError(f"--scale {args.scale} must be >= 1")
    image = images.load_image(args.image) if args.image else None
    mask = images.load_mask(args.mask, image.shape[:2]) if args.mask and image is not None else None
    # Options of an image that is not there: refused, not silently ignored.
    for flag, value in (("--mask", args.mask), ("--image-role", args.image_role),
                        ("--fusion", args.fusion)):
      if value is not None and image is None:
        raise gen.GenerationError(f"{flag} needs --image")
    db = db_lib.ConceptDatabase.open(args.db) if args.db else None
    concepts = {n: r.slot for n, r in db.concepts.items()} if db else {}
    request = gen.Request(prompt=args.prompt, image=image,
                          image_role=args.image_role or "target",
                          mask=mask, mode=args.mode)
    # Unknown concepts etc. are reported before the model is loaded.
    names = [n for n in gen.concept_names(args.prompt) if n != gen.IMAGE_TOKEN]
    if names and db is None:
      raise gen.GenerationError(f"the prompt names <{names[0]}> but no --db was given")

    from persvid_jax.concepts.bank import ConceptBank
    from persvid_jax.pipeline import media
    from persvid_jax.pipeline import model as model_lib
    model = model_lib.load_model(args.model)
    if db is not None and db.feature_id != model.feature_id:
      raise db_lib.DatabaseError(
          f"{args.db} was built with another model (feature id {db.feature_id}, this model "
          f"{model.feature_id}); pass that model with --model")
    bank = db.bank if db is not None else ConceptBank.from_config(model.config)
    image_slot = model.config.concepts.capacity - 1
    resolved = gen.resolve(request, concepts, image_slot, model.config)
    generator = gen.Generator(model, steps=args.steps, sr_steps=args.sr_steps,
                              text_scale=args.guidance, detail_scale=args.detail_guidance,
                              fusion=args.fusion)
    t0 = time.perf_counter()
    result = generator(bank, [resolved], image_slot=image_slot, seed=args.seed,
                       progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    media.save_video(out, result.video[0], scale=args.scale)
    written = [str(out)]
    if sheet is not None:
      ref = resolved.reference.crop if resolved.reference is not None else None
      media.save_png(sheet, media.contact_sheet([(ref, result.video[0])], scale=args.scale // 2 or 1))
      written.append(str(sheet))
    print(f"mode {resolved.mode}: wrote {', '.join(written)} "
          f"({result.video.shape[1]} frames {result.video.shape[3]}x{result.video.shape[2]}, "
          f"{seconds:.1f} s incl. compilation)")
    return 0

  return _common.run(body)


if __name__ == "__main__":
  sys.exit(main())
