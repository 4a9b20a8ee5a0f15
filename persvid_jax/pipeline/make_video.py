"""One personalized video from a prompt (and an image, a database), written to a file.

``make_video`` is what ``python -m launch.generate`` runs (its docstring has
the command lines and the six modes): every check that needs no model (an
empty prompt, an unusable image or mask, image options without an image,
a concept with no database) comes first; then the model loads, the
database is checked against it, the request is resolved to its mode and
one video is sampled and saved (MP4 or GIF by the name), with an optional
PNG contact sheet.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

from persvid_jax.concepts import database as db_lib
from persvid_jax.concepts import images
from persvid_jax.concepts.bank import ConceptBank
from persvid_jax.pipeline import generate as gen
from persvid_jax.pipeline import media
from persvid_jax.pipeline import model as model_lib

VIDEO_SUFFIXES = (".mp4", ".gif")


@dataclasses.dataclass(frozen=True)
class Made:
  """What ``make_video`` wrote."""
  mode: str                       # one of generate.MODES
  paths: tuple[pathlib.Path, ...]  # the video, then the sheet if asked
  shape: tuple[int, ...]          # the video's [T, H, W, 3]
  seconds: float                  # sampling wall time, compilation included

  def summary(self) -> str:
    """The line ``launch.generate`` prints."""
    t, h, w = self.shape[:3]
    return (f"mode {self.mode}: wrote {', '.join(map(str, self.paths))} ({t} frames {w}x{h}, "
            f"{self.seconds:.1f} s incl. compilation)")


def make_video(prompt: str, out: str | pathlib.Path, *, db: str | None = None,
               image: str | None = None, mask: str | None = None,
               image_role: str | None = None, mode: str | None = None,
               model: str | None = None, seed: int = 0, steps: int | None = None,
               sr_steps: int | None = None, guidance: float | None = None,
               detail_guidance: float | None = None, fusion: str | None = None,
               sheet: str | pathlib.Path | None = None, scale: int = 8,
               progress: bool = True) -> Made:
  """Generates one video for ``prompt`` and writes it to ``out`` (.mp4 or .gif).

  Args:
    prompt: e.g. ``"a <my_dog> moving left on grass"``.
    out: the video file; its directory must exist.
    db: the concept database (needed for ``<name>`` prompts).
    image, mask: a target photo of the subject or a scene image, and its mask.
    image_role: ``target`` (default) or ``scene``.
    mode: fail unless the request means this mode (``generate.MODES``).
    model: exported model or training workdir (default: the shipped demo model).
    seed, steps, sr_steps: sampling (steps default to the model's config).
    guidance, detail_guidance: the text / detail guidance scales (>= 0).
    fusion: how stored and image detail features combine (``generate.FUSIONS``).
    sheet: also write a PNG contact sheet here (reference crop beside the frames).
    scale: pixel enlargement of the outputs.
    progress: sampler progress bars.

  Raises:
    generate.GenerationError, images.ImageError, database.DatabaseError,
    model.ModelError: bad input, each before any sampling.
  """
  out = pathlib.Path(out)
  if out.suffix.lower() not in VIDEO_SUFFIXES:
    raise gen.GenerationError(f"--out {out} must end in .mp4 or .gif")
  if not prompt.strip():
    raise gen.GenerationError("--prompt is empty; describe the video, e.g. "
                              "\"a <my_toy> moving left on grass\"")
  pixels = images.load_image(image) if image else None
  subject_mask = images.load_mask(mask, pixels.shape[:2]) if mask and image else None
  # Options of an image that is not there: refused, not silently ignored.
  for flag, value in (("--mask", mask), ("--image-role", image_role), ("--fusion", fusion)):
    if value is not None and pixels is None:
      raise gen.GenerationError(f"{flag} needs --image")
  database = db_lib.ConceptDatabase.open(db) if db else None
  concepts = {n: r.slot for n, r in database.concepts.items()} if database else {}
  request = gen.Request(prompt=prompt, image=pixels, image_role=image_role or "target",
                        mask=subject_mask, mode=mode)
  # Unknown concepts etc. are reported before the model is loaded.
  names = [n for n in gen.concept_names(prompt) if n != gen.IMAGE_TOKEN]
  if names and database is None:
    raise gen.GenerationError(f"the prompt names <{names[0]}> but no --db was given")

  loaded = model_lib.load_model(model)
  if database is not None and database.feature_id != loaded.feature_id:
    raise db_lib.DatabaseError(
        f"{db} was built with another model (feature id {database.feature_id}, this model "
        f"{loaded.feature_id}); pass that model with --model")
  bank = database.bank if database is not None else ConceptBank.from_config(loaded.config)
  image_slot = loaded.config.concepts.capacity - 1
  resolved = gen.resolve(request, concepts, image_slot, loaded.config)
  generator = gen.Generator(loaded, steps=steps, sr_steps=sr_steps, text_scale=guidance,
                            detail_scale=detail_guidance, fusion=fusion)
  t0 = time.perf_counter()
  result = generator(bank, [resolved], image_slot=image_slot, seed=seed, progress=progress)
  seconds = time.perf_counter() - t0
  written = [media.save_video(out, result.video[0], scale=scale)]
  if sheet is not None:
    ref = resolved.reference.crop if resolved.reference is not None else None
    written.append(media.save_png(sheet, media.contact_sheet(
        [(ref, result.video[0])], scale=scale // 2 or 1,
        labels=[f"{resolved.mode}: {resolved.prompt}"])))
  return Made(mode=resolved.mode, paths=tuple(pathlib.Path(p) for p in written),
              shape=tuple(result.video.shape[1:]), seconds=seconds)
