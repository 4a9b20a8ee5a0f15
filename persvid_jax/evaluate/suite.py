"""The benchmark suite on held-out ``persvid_synthetic`` subjects, and its ablations.

A *case* is one held-out test subject (never seen in training) with a
concept built from ``photos`` rendered photos, and one prompted motion and
background (drawn from the subject id, avoiding backgrounds of the subject's
own colour). A *variant* says how a case is prompted and generated; every
variant runs every case under every seed (one batch per seed: the suite's
spread is over seeds), and every video is scored by ``groundtruth``.

Variants (``VARIANTS``; the method first, then the ablations of docs/evaluation.md):

==================  ==========================================================
method              ``a <concept> moving right on snow``: cascade, stored detail
removed             the same prompt with the concept removed: its slot empty, so
                    the placeholder keeps its own (untrained) embedding and the
                    detail tokens are null -- the personalize stage's
                    dropped-reference condition, not an unseen word
described           the subject's caption words instead of the concept (the
                    best text the model was trained on: an oracle description)
detail_off          the method without detail tokens (learned null tokens)
target_stored       concept + a target photo: detail tokens from the database only
target_image        ... from the photo only
target_fused        ... both, fused (the method for this mode)
no_cascade          the base network sampled directly at the SR resolution
sr_kernel5          the cascade with an SR network (5x5 kernels, the method's)  }
                    retrained with the budget of the next two                   } three SR
sr_kernel3          ... with 3x3 kernels (as the base network's)                } models with
sr_kernel3_dil2     ... with 3x3 kernels dilated by 2                           } equal training
swap_input          the concept swapped at the text encoder's input  } a pair of models
swap_output         ... at its output                                } with equal training
==================  ==========================================================

The last five need models trained for them (``Variant.model``: the key of
a model given to ``run``); without one the row is reported as not run, with
the command that trains it.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from persvid_jax.concepts import bank as bank_lib
from persvid_jax.concepts import build
from persvid_jax.concepts import database as db_lib
from persvid_jax.concepts import images
from persvid_jax.data import synthetic
from persvid_jax.evaluate import groundtruth as gt
# Re-exported: a suite result's claims and table (``suite.markdown(result)``).
from persvid_jax.evaluate.verdicts import compare, markdown, verdict
from persvid_jax.pipeline import generate as gen
from persvid_jax.pipeline import media

__all__ = ["SCALES", "SR_STEPS", "SWAP_STEPS", "VARIANTS", "Case", "SuiteConfig", "Variant",
           "compare", "make_cases", "markdown", "reference_scores", "run", "variants", "verdict"]


SCALES = ("final", "base")


def _optional_float(value) -> float | None:
  """A config value that may be None (the model's own) as a float or None."""
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{value!r} is not a number; give a CFG scale such as 5.0")
  return float(value)


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """Sizes of the suite.

  Attributes:
    subjects: held-out test subjects (``persvid_synthetic`` test ids 0..n-1).
    prompts: prompts (motion x background) per subject.
    seeds: sampling seeds; the reported spread is over them.
    photos: rendered photos per concept.
    photo_size: their size (px).
    steps, sr_steps: sampler steps (None: the model config's).
    guidance_text, guidance_detail: CFG scales (None: the model config's
      ``diffusion.guidance_text`` / ``guidance_detail``).
    world_seed: the ``persvid_synthetic`` world.
    scale: which videos are scored: 'final' (the cascade's output) or 'base'
      (the base network's, at its own size: where a subject's shape has to
      appear first, since the SR network never sees the reference). The
      no_cascade variant has no separate base video: its one is scored.
  """
  subjects: int = 8
  prompts: int = 1
  seeds: tuple[int, ...] = (0, 1, 2)
  photos: int = 2
  photo_size: int = 96
  steps: int | None = None
  sr_steps: int | None = None
  guidance_text: float | None = None
  guidance_detail: float | None = None
  world_seed: int = 0
  scale: str = "final"

  def __post_init__(self):
    if self.scale not in SCALES:
      raise ValueError(f"suite scale {self.scale!r}; use one of {', '.join(SCALES)}")
    # Checked here, before any model loads: zero subjects or photos fail deep
    # in the tokenizer / np.stack, and zero seeds "succeed" with a NaN table.
    most = synthetic.CONFIGS["demo"].test_subjects      # make_cases renders from it
    if not 1 <= self.subjects <= most:
      raise ValueError(f"subjects={self.subjects}; use 1 to {most} (the held-out test "
                       "subjects of persvid_synthetic)")
    for name in ("prompts", "photos"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)}; use at least 1")
    if not self.seeds:
      raise ValueError("seeds=(); give at least one seed, e.g. (0,)")
    if self.photo_size < images.MIN_SIDE:   # what load_image accepts
      raise ValueError(f"photo_size={self.photo_size}; use at least {images.MIN_SIDE} px")
    for name in ("steps", "sr_steps"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name}={value}; use at least 1 (or 0 for the model config's)")
    for name in ("guidance_text", "guidance_detail"):
      value = getattr(self, name)
      if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value}; use a finite scale >= 0 (or None for the model "
                         "config's)")

  @classmethod
  def from_config(cls, c) -> "SuiteConfig":
    """From an ``ml_collections`` block with the same field names."""
    return cls(subjects=int(c.subjects), prompts=int(c.prompts),
               seeds=tuple(int(s) for s in c.seeds), photos=int(c.photos),
               photo_size=int(c.photo_size), steps=c.get("steps") or None,
               sr_steps=c.get("sr_steps") or None,
               guidance_text=_optional_float(c.get("guidance_text")),
               guidance_detail=_optional_float(c.get("guidance_detail")),
               world_seed=int(c.get("world_seed", 0)),
               scale=str(c.get("scale", "final")))


@dataclasses.dataclass(frozen=True)
class Case:
  """One held-out subject and one prompted scene."""
  index: int                       # test subject index
  prompt_index: int
  subject: synthetic.Subject
  direction: int
  background: int
  photos: tuple[np.ndarray, ...]   # uint8 [S, S, 3] each: the concept's photos
  target_photo: np.ndarray         # another photo, for the target-image variants

  @property
  def target(self) -> gt.Target:
    """What the generated video should show (subject, motion, background)."""
    return gt.Target(self.subject, self.direction, self.background)

  @property
  def concept(self) -> str:
    """The concept's name in the suite's database."""
    return f"s{self.index}"

  def prompt(self, kind: str) -> str:
    """The prompt of a variant kind: 'concept' or 'described'."""
    motion = synthetic.DIRECTION_PHRASES[self.direction]
    scene = synthetic.BACKGROUNDS[self.background].phrase
    if kind == "concept":
      return f"a <{self.concept}> {motion} {scene}"
    if kind == "described":
      return synthetic.captions(self.subject, self.direction, self.background)["caption"]
    raise ValueError(f"prompt kind {kind!r}; use concept or described")


def make_cases(cfg: SuiteConfig) -> list[Case]:
  """``cfg.subjects x cfg.prompts`` cases, deterministic in ``cfg``."""
  render_cfg = synthetic.CONFIGS["demo"].replace(
      frames=1, height=cfg.photo_size, width=cfg.photo_size, reference_size=cfg.photo_size,
      seed=cfg.world_seed, videos_per_subject=cfg.photos + 1)
  cases = []
  for i in range(cfg.subjects):
    shots = [synthetic.render_example(render_cfg, "test", i * render_cfg.videos_per_subject + k)
             ["reference"] for k in range(cfg.photos + 1)]
    subject = synthetic.make_subject(synthetic.subject_id("test", i), cfg.world_seed)
    for p in range(cfg.prompts):
      rng = np.random.default_rng([cfg.world_seed, 7, i, p])
      direction = int(rng.integers(len(synthetic.DIRECTIONS)))
      background = synthetic.pick_background(rng, subject)
      cases.append(Case(i, p, subject, direction, background, tuple(shots[:cfg.photos]),
                        shots[cfg.photos]))
  return cases


@dataclasses.dataclass(frozen=True)
class Variant:
  """How the cases are prompted and generated.

  Attributes:
    name: row label.
    description: what it tests (one line).
    prompt: 'concept' | 'described'.
    removed: the concept's slot is emptied (every concept maps to slot 0,
      the placeholder of the training captions, in an empty bank).
    image: add the target photo (mode concept+target).
    detail_source: ``generate.DETAIL_SOURCES``.
    cascade: base -> SR (True) or the base network directly at high res.
    model: None (the evaluated model) or the key of a model trained for this
      variant.
    train: how to train that model (for the "not run" line).
  """
  name: str
  description: str
  prompt: str = "concept"
  removed: bool = False
  image: bool = False
  detail_source: str = "auto"
  cascade: bool = True
  model: str | None = None
  train: str = ""


# The three SR kernels train with one budget (SR_STEPS at the config's batch),
# so the comparison is not the shipped SR network's longer training.
SR_STEPS = 1000
_SR_TRAIN = ("python -m launch.train --config configs/demo.py:stage=sr,{arg},steps=%d "
             "--workdir W/{key} --config.train.init_from=W/base, then "
             "--variant-model {key}=W/{key},W/personalize" % SR_STEPS)

SWAP_STEPS = 600
_SWAP_TRAIN = ("python -m launch.train --config configs/demo.py:stage=personalize,"
               "swap_at={site},steps=%d --workdir W/swap_{site} --config.train.init_from=W/base, "
               "then --variant-model swap_{site}=W/swap_{site},W/sr" % SWAP_STEPS)

VARIANTS: tuple[Variant, ...] = (
    Variant("method", "concept in the prompt, stored detail, cascade (SR 5x5)"),
    Variant("removed", "the concept removed (empty slot, null detail)", removed=True),
    Variant("described", "concept replaced by the subject's caption words", prompt="described"),
    Variant("detail_off", "no detail tokens (learned null)", detail_source="off"),
    Variant("target_stored", "+ target photo; detail from the database only", image=True,
            detail_source="stored"),
    Variant("target_image", "+ target photo; detail from the photo only", image=True,
            detail_source="image"),
    Variant("target_fused", "+ target photo; detail fused (the method)", image=True),
    Variant("no_cascade", "base network sampled directly at the SR resolution",
            cascade=False),
    Variant("sr_kernel5", "SR network with 5x5 kernels (the method's), equal budget",
            model="sr_kernel5", train=_SR_TRAIN.format(arg="sr_kernel=5", key="sr_kernel5")),
    Variant("sr_kernel3", "SR network with 3x3 kernels (as the base), equal budget",
            model="sr_kernel3",
            train=_SR_TRAIN.format(arg="sr_kernel=3", key="sr_kernel3")),
    Variant("sr_kernel3_dil2", "SR network with 3x3 kernels, dilation 2, equal budget",
            model="sr_kernel3_dil2",
            train=_SR_TRAIN.format(arg="sr_kernel=3,sr_dilation=2", key="sr_kernel3_dil2")),
    # The swap site changes what the personalize stage learns, so both sides
    # are models trained for it from the base stage with one budget (the
    # method's model trained far longer).
    Variant("swap_input", "swap at the text encoder input (equal-budget pair)",
            model="swap_input", train=_SWAP_TRAIN.format(site="input")),
    Variant("swap_output", "swap at the text encoder output (equal-budget pair)",
            model="swap_output", train=_SWAP_TRAIN.format(site="output")),
)


def variants(names: Sequence[str] | None = None) -> list[Variant]:
  """The named variants (default all), in ``VARIANTS`` order."""
  by_name = {v.name: v for v in VARIANTS}
  if names is None:
    return list(VARIANTS)
  unknown = [n for n in names if n not in by_name]
  if unknown:
    raise ValueError(f"unknown variant {unknown[0]!r}; known: {', '.join(by_name)}")
  return [by_name[n] for n in names]


def _database(model, cases: Sequence[Case], directory: pathlib.Path):
  """A concept database of the cases' subjects, built with ``model``'s encoders."""
  db = db_lib.ConceptDatabase.create(directory, model.config, model.feature_id, commit=False)
  feature_fn = build.make_feature_fn(model)
  for case in cases:
    if case.concept in db.concepts:
      continue
    photos = [(p, None) for p in case.photos]
    feats = build.encode_concept(model, photos, (), feature_fn)
    db.add(case.concept, feats.ref_tokens, feats.detail_tokens, [])
  return db


def reference_scores(cases: Sequence[Case], frames: int, height: int, width: int,
                     world_seed: int = 0) -> dict[str, Any]:
  """The scale of every metric on these cases, with no model in the loop.

  Each case's prompt is rendered by ``persvid_synthetic`` itself
  (``synthetic.render_video``, at the generated videos' size) and scored

  * against its own subject (``truth``): the best a generator can score here
    (segmentation and antialiasing at this size cost shape IoU);
  * against every other held-out subject of the suite, same motion and
    scene (``other_subject``): what a perfect video of the *wrong* subject
    scores, i.e. chance on the identity metrics (colour error, shape IoU).

  Args:
    cases: ``make_cases`` output.
    frames, height, width: the generated videos' size.
    world_seed: the ``persvid_synthetic`` world.

  Returns:
    ``{'size': [T, H, W], 'truth': {metric: mean over cases}, 'other_subject':
    {metric: mean over (case, other subject) pairs}}`` over ``groundtruth.METRICS``.
  """
  subjects = {c.index: c.subject for c in cases}
  truth, other = [], []
  for c in cases:
    rng = np.random.default_rng([world_seed, 11, c.index, c.prompt_index])
    video = synthetic.render_video(c.subject, c.direction, c.background, frames, height, width,
                                   rng)
    masks = gt.segment_video(video)
    truth.append(gt.score_video(video, c.target, masks=masks))
    other += [gt.score_video(video, gt.Target(s, c.direction, c.background), masks=masks)
              for i, s in subjects.items() if i != c.index]
  mean = lambda scores: {m: float(np.mean([s[m] for s in scores])) for m in gt.METRICS}
  return dict(size=[frames, height, width], truth=mean(truth),
              other_subject=mean(other) if other else {})


def _stats(values: Sequence[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def run(models: Mapping[str | None, Any], cfg: SuiteConfig,
        names: Sequence[str] | None = None, *, progress: bool = False,
        log: Callable[[str], None] = lambda s: None,
        sheet_dir: str | pathlib.Path | None = None) -> dict[str, Any]:
  """Runs variants over the suite.

  Args:
    models: ``{None: the evaluated model, key: a model trained for a variant}``.
    cfg: the sizes.
    names: variants to run (default all); a variant whose model is missing
      is reported as not run.
    progress: sampler progress bars.
    log: a line per finished variant.
    sheet_dir: if given, ``<variant>.png`` there: a contact sheet of the
      first seed's videos, each beside its concept's first photo.

  Returns:
    ``{'config', 'variants': {name: {'description', 'status', 'seconds',
    'metrics': {metric: {'mean', 'std'}}, 'per_seed': {metric: [..]},
    'videos'}}, 'reference': reference_scores(...) (empty if nothing ran),
    'comparison': {...}, 'seconds'}``; means and stds are over seeds (each
    seed's value is the mean over its cases).
  """
  t_start = time.perf_counter()
  cases = make_cases(cfg)
  results: dict[str, Any] = {}
  reference: dict[str, Any] = {}
  with tempfile.TemporaryDirectory() as tmp:
    dbs, generators = {}, {}
    for variant in variants(names):
      if variant.model not in models:
        results[variant.name] = dict(description=variant.description, status="not run",
                                     needs=variant.train)
        log(f"{variant.name:16s} not run: needs a model trained with {variant.train}")
        continue
      model = models[variant.model]
      key = variant.model
      if key not in dbs:
        dbs[key] = _database(model, cases, pathlib.Path(tmp) / f"db_{key}")
        generators[key] = gen.Generator(model, steps=cfg.steps, sr_steps=cfg.sr_steps,
                                        text_scale=cfg.guidance_text,
                                        detail_scale=cfg.guidance_detail)
      db, generator = dbs[key], generators[key]
      concepts = {n: r.slot for n, r in db.concepts.items()}
      bank = db.bank
      if variant.removed:
        concepts = {n: 0 for n in concepts}
        bank = bank_lib.ConceptBank.from_config(model.config)
      image_slot = model.config.concepts.capacity - 1
      resolved = [gen.resolve(gen.Request(
          c.prompt(variant.prompt), image=c.target_photo if variant.image else None),
          concepts, image_slot, model.config) for c in cases]
      t0 = time.perf_counter()
      per_seed = {m: [] for m in gt.METRICS}
      for seed in cfg.seeds:
        out = generator(bank, resolved, image_slot=image_slot, seed=int(seed),
                        progress=progress, detail_source=variant.detail_source,
                        cascade=variant.cascade)
        videos = media.to_uint8(out.base if cfg.scale == "base" else out.video)
        if not reference:   # the metrics' scale, at the generated size (once)
          reference = reference_scores(cases, *videos.shape[1:4], world_seed=cfg.world_seed)
          truth, other = reference["truth"], reference.get("other_subject")
          # A one-subject suite has no other subject to score against.
          log(f"{'(truth)':16s} colour err {truth['colour_error']:.3f} shape IoU "
              f"{truth['shape_iou']:.3f}; " + (
                  f"another subject: colour err {other['colour_error']:.3f} shape IoU "
                  f"{other['shape_iou']:.3f}" if other else "no other subject in the suite"))
        scores = [gt.score_video(v, c.target) for v, c in zip(videos, cases)]
        if sheet_dir is not None and seed == cfg.seeds[0]:
          sheet = media.contact_sheet([(c.photos[0], v) for c, v in zip(cases, videos)],
                                      labels=[f"{variant.name}: {r.prompt}" for r in resolved])
          media.save_png(pathlib.Path(sheet_dir) / f"{variant.name}.png", sheet)
        for m in gt.METRICS:
          per_seed[m].append(float(np.mean([s[m] for s in scores])))
      seconds = time.perf_counter() - t0
      results[variant.name] = dict(
          description=variant.description, status="ok", seconds=round(seconds, 1),
          videos=len(cases) * len(cfg.seeds), example_prompt=resolved[0].prompt,
          metrics={m: _stats(v) for m, v in per_seed.items()}, per_seed=per_seed)
      m = results[variant.name]["metrics"]
      log(f"{variant.name:16s} colour err {m['colour_error']['mean']:.3f} "
          f"shape IoU {m['shape_iou']['mean']:.3f} instances {m['instances']['mean']:.2f} "
          f"({seconds:.0f} s)")
  return dict(config=dataclasses.asdict(cfg), variants=results, reference=reference,
              comparison=compare(results), seconds=round(time.perf_counter() - t_start, 1))
