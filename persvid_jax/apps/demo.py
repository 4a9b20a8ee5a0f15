"""The main job (``python -m launch.demo``): database from photos, six modes, fidelity.

1. Builds a concept database from the shipped photos of *held-out test*
   subjects of ``persvid_synthetic`` (subjects the demo model never saw) —
   subject recognition, reference and detail features, Orbax database.
2. Generates one batch (one compiled graph) holding all six modes plus the
   rows needed to measure personalization: the same prompts with the concept
   replaced by the word "object".
3. Writes ``<mode>.mp4`` / ``<mode>.gif`` per mode, ``contact_sheet.png``
   (reference crop beside the frames, one row per video, in ``summary.json``'s
   order) and ``summary.json`` (prompts, modes, fidelity, timings).

The photos are rendered by ``make_photos`` (pure numpy, deterministic) and
shipped in ``persvid_jax/assets/demo_photos`` so that the demo reads real
image files through the same path a user's photos take.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
from typing import Any

import numpy as np

from persvid_jax.concepts import build
from persvid_jax.concepts import database as db_lib
from persvid_jax.concepts import images
from persvid_jax.evaluate import fidelity
from persvid_jax.pipeline import generate as gen
from persvid_jax.pipeline import media

PHOTOS_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "demo_photos"
PHOTO_SIZE = 96
# (concept name, test-split subject index): never seen in training.
SUBJECTS = (("sub1", 15), ("sub2", 4), ("sub3", 9))
SCENE_BACKGROUND = "brick_wall"
GENERIC = "object"   # what replaces a concept in the "concept removed" rows


def _make_dir(directory: pathlib.Path) -> None:
  """``mkdir -p``; a file in the way or no permission is a user error, not a traceback."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise gen.GenerationError(f"cannot create the output directory {directory}: "
                              f"{e.strerror or e}") from None


def make_photos(directory: str | pathlib.Path = PHOTOS_DIR) -> list[pathlib.Path]:
  """Renders the demo's photos: two per subject (other pose, other background) + a scene.

  Deterministic; ``subjects.json`` records each photo's subject id and caption.
  """
  from persvid_jax.data import synthetic
  directory = pathlib.Path(directory)
  _make_dir(directory)
  cfg = synthetic.CONFIGS["demo"].replace(frames=1, height=PHOTO_SIZE, width=PHOTO_SIZE,
                                          reference_size=PHOTO_SIZE)
  from PIL import Image
  written, meta = [], {}
  for name, index in SUBJECTS:
    for k in range(2):
      ex = synthetic.render_example(cfg, "test", index * cfg.videos_per_subject + k)
      path = directory / f"{name}_{'ab'[k]}.png"
      Image.fromarray(ex["reference"]).save(path)
      written.append(path)
      meta[path.name] = dict(subject_id=int(ex["subject_id"]), caption=ex["caption"])
  names = [b.name for b in synthetic.BACKGROUNDS]
  rng = np.random.default_rng(0)
  scene = synthetic.render_background(names.index(SCENE_BACKGROUND), PHOTO_SIZE, PHOTO_SIZE,
                                      rng, 2)
  path = directory / "scene.png"
  Image.fromarray(synthetic._to_uint8(scene)).save(path)
  written.append(path)
  meta[path.name] = dict(background=SCENE_BACKGROUND)
  (directory / "subjects.json").write_text(json.dumps(meta, indent=2))
  return written


@dataclasses.dataclass(frozen=True)
class Row:
  """One video of the demo batch."""
  label: str
  prompt: str
  image: str | None = None        # photo file name in PHOTOS_DIR
  role: str = "target"
  subject: str | None = None      # whose reference the fidelity is measured against


ROWS = (
    Row("concept", "a <sub1> moving right on snow", subject="sub1"),
    Row("concept+target", "a <sub1> moving left on a gray background", "sub1_b.png",
        subject="sub1"),
    Row("target", "a <image> moving up over water", "sub3_a.png", subject="sub3"),
    Row("concept+scene", "a <sub2> moving down on sand", "scene.png", "scene",
        subject="sub2"),
    Row("text", "a bluish star with yellowish dots moving left against a night sky"),
    Row("text+scene", "a bluish star with yellowish dots moving left", "scene.png", "scene"),
    Row("concept:sub2", "a <sub2> moving right on snow", subject="sub2"),
    Row("removed:sub1", f"a {GENERIC} moving right on snow", subject="sub1"),
    Row("removed:sub2", f"a {GENERIC} moving right on snow", subject="sub2"),
)


def _log(msg: str, quiet: bool) -> None:
  if not quiet:
    print(msg, flush=True)


def run_demo(model, out_dir: str | pathlib.Path, *, photos_dir=PHOTOS_DIR, seed: int = 0,
             steps: int | None = None, sr_steps: int | None = None, progress: bool = True,
             quiet: bool = False, scale: int = 8) -> dict[str, Any]:
  """Runs the whole demo into ``out_dir``; returns the summary (also ``summary.json``)."""
  t_start = time.perf_counter()
  out_dir = pathlib.Path(out_dir)
  _make_dir(out_dir)
  photos_dir = pathlib.Path(photos_dir)
  config = model.config

  # 1. The database, rebuilt from the photos (the demo owns this directory).
  db_dir = out_dir / "concepts_db"
  if db_dir.exists():
    shutil.rmtree(db_dir)
  db = db_lib.ConceptDatabase.create(db_dir, config, model.feature_id, commit=False)
  feature_fn = build.make_feature_fn(model)
  references = {}
  for name, _ in SUBJECTS:
    paths = sorted(photos_dir.glob(f"{name}_*.png"))
    if name == "sub3":        # sub3 stays out of the database: the target-image-only row
      references[name] = build.subject_reference(images.load_image(paths[0]), config)
      continue
    _, feats = build.add_concept(db, name, model, build.load_photos(paths), paths, feature_fn)
    references[name] = feats.references[0]
    cover = ", ".join(f"{p['coverage']:.0%}" for p in feats.provenance)
    _log(f"concept <{name}>: {len(paths)} photos, subject coverage {cover}", quiet)
  t_db = time.perf_counter() - t_start

  # 2. One batch, every mode.
  concepts = {n: r.slot for n, r in db.concepts.items()}
  image_slot = config.concepts.capacity - 1
  resolved = []
  for row in ROWS:
    image = images.load_image(photos_dir / row.image) if row.image else None
    resolved.append(gen.resolve(gen.Request(row.prompt, image=image, image_role=row.role),
                                concepts, image_slot, config))
  generator = gen.Generator(model, steps=steps, sr_steps=sr_steps)
  t0 = time.perf_counter()
  result = generator(db.bank, resolved, image_slot=image_slot, seed=seed, progress=progress)
  t_gen = time.perf_counter() - t0

  # 3. Files.
  videos = media.to_uint8(result.video)
  files = {}
  for i, row in enumerate(ROWS[:len(gen.MODES)]):
    stem = row.label.replace("+", "_")
    files[row.label] = [str(media.save_mp4(out_dir / f"{stem}.mp4", videos[i], scale=scale)),
                        str(media.save_gif(out_dir / f"{stem}.gif", videos[i], scale=scale))]
  sheet_rows = [(r.reference.crop if r.reference is not None
                 else references[row.subject].crop if row.subject else None, videos[i])
                for i, (row, r) in enumerate(zip(ROWS, resolved))]
  labels = [f"{row.label} [{r.mode}]: {row.prompt}" + (f"  + {row.image} as {row.role}"
                                                      if row.image else "")
            for row, r in zip(ROWS, resolved)]
  sheet = media.save_png(out_dir / "contact_sheet.png",
                         media.contact_sheet(sheet_rows, scale=scale // 2 or 1, labels=labels))

  # 4. Fidelity against each subject's reference crop.
  rows_out = []
  for i, (row, r) in enumerate(zip(ROWS, resolved)):
    entry = dict(label=row.label, mode=r.mode, prompt=row.prompt, image=row.image)
    if row.subject:
      ref = references[row.subject]
      entry.update(subject=row.subject,
                   **fidelity.video_fidelity(videos[i], ref.crop, ref.mask[..., 0]))
    rows_out.append(entry)
  by_label = {e["label"]: e for e in rows_out}
  comparison = {}
  for name in ("sub1", "sub2"):
    pers = by_label["concept" if name == "sub1" else "concept:sub2"]
    rem = by_label[f"removed:{name}"]
    comparison[name] = dict(
        personalized=dict(colour_error=pers["colour_error"], shape_iou=pers["shape_iou"]),
        removed=dict(colour_error=rem["colour_error"], shape_iou=rem["shape_iou"]))
  summary = dict(
      model=model.source, seed=seed, steps=generator.sampler.num_steps,
      sr_steps=generator.sr_sampler.num_steps, rows=rows_out, personalization=comparison,
      files=files, contact_sheet=str(sheet), database=str(db_dir),
      seconds=dict(database=round(t_db, 1), generation=round(t_gen, 1),
                   total=round(time.perf_counter() - t_start, 1)))
  (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def format_summary(summary: dict) -> str:
  """The lines ``launch.demo`` prints."""
  lines = ["", "videos (mp4 + gif, one per mode):"]
  for label, paths in summary["files"].items():
    lines.append(f"  {label:16s} {paths[0]}")
  lines.append(f"contact sheet: {summary['contact_sheet']}  (rows in summary.json order)")
  lines.append("")
  lines.append("subject fidelity vs the concept's reference photo "
               "(colour error: lower is better; shape IoU: higher is better)")
  lines.append(f"  {'concept':8s} {'prompt':12s} {'colour err':>10s} {'shape IoU':>10s}")
  for name, c in summary["personalization"].items():
    for kind in ("personalized", "removed"):
      lines.append(f"  <{name}>   {kind:12s} {c[kind]['colour_error']:10.3f} "
                   f"{c[kind]['shape_iou']:10.3f}")
  s = summary["seconds"]
  lines.append("")
  lines.append(f"time: database {s['database']} s, generation {s['generation']} s "
               f"(incl. compilation), total {s['total']} s")
  return "\n".join(lines)
