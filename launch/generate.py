"""Generate a personalized video (any of the six modes, docs/design.md).

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
``persvid_jax/pipeline/make_video.py`` does the work.
"""

from __future__ import annotations

import pathlib
import sys

from launch import _common
# At the top although it imports jax (~2 s): the flags' choices come from it.
from persvid_jax.pipeline.generate import FUSIONS, IMAGE_ROLES, MODES, GenerationError


def _parse(argv):
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
  p.add_argument("--seed", type=_common.SEED, default=0)
  p.add_argument("--steps", type=_common.int_range(1), help="base sampler steps (default: config)")
  p.add_argument("--sr-steps", type=_common.int_range(1),
                 help="super-resolution sampler steps (default: config)")
  # 0 ignores the condition, 1 follows it without guidance.
  p.add_argument("--guidance", type=_common.float_range(0), help="text guidance scale")
  p.add_argument("--detail-guidance", type=_common.float_range(0),
                 help="detail guidance scale")
  p.add_argument("--fusion", choices=FUSIONS, help="stored + image detail fusion")
  p.add_argument("--model", help="exported model or training workdir (default: demo)")
  p.add_argument("--out", required=True, help="FILE.mp4 or FILE.gif")
  p.add_argument("--sheet", nargs="?", const="", default=None,
                 help="also write a PNG contact sheet (default: OUT with .png)")
  p.add_argument("--scale", type=_common.int_range(1), default=8,
                 help="pixel enlargement of the outputs")
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> int:
  """``python -m launch.generate`` (see the module docstring); returns the exit status."""
  _common.quiet()
  args = _parse(sys.argv[1:] if argv is None else argv)

  def body() -> int:
    out = pathlib.Path(args.out)
    sheet = None
    if args.sheet is not None:
      sheet = pathlib.Path(args.sheet) if args.sheet else out.with_suffix(".png")
    problem = _common.out_dir_problem(out) or (
        sheet is not None and _common.out_dir_problem(sheet, "--sheet"))
    if problem:
      raise GenerationError(problem)
    _common.compilation_cache()
    # After the flags are checked: the database and model code (orbax) take seconds more.
    from persvid_jax.pipeline import make_video
    made = make_video.make_video(
        args.prompt, out, db=args.db, image=args.image, mask=args.mask,
        image_role=args.image_role, mode=args.mode, model=args.model, seed=args.seed,
        steps=args.steps, sr_steps=args.sr_steps, guidance=args.guidance,
        detail_guidance=args.detail_guidance, fusion=args.fusion, sheet=sheet,
        scale=args.scale, progress=not args.no_progress)
    print(made.summary())
    return 0

  return _common.run(body)


if __name__ == "__main__":
  sys.exit(main())
