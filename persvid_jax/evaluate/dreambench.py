"""The DreamBench protocol over a DreamBench folder (subjects x prompt templates).

For each subject a concept is built from its real photos (subject
recognition, the model's encoders, a concept database in a temporary
directory); each prompt template (``{0}`` = the concept, ``{1}`` = the class
word, DreamBooth's 25 object / 25 live-subject lists) becomes
``template.format('<name>', class)``; the videos of one subject are one
batch; each video is scored with the standard protocol
(``protocol.ProtocolScorer``): CLIP-T against the prompt with the concept
dropped (``a backpack in the jungle``), CLIP-I / DINO-I against the
subject's photos, temporal consistency and dynamic degree.

Live subjects (cats and dogs) take the live prompt list, the rest the
object list, as in the original protocol.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np

from persvid_jax.concepts import build
from persvid_jax.concepts import database as db_lib
from persvid_jax.concepts import images
from persvid_jax.pipeline import generate as gen
from persvid_jax.pipeline import media

LIVE_CLASSES = ("cat", "dog")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DreamBenchError(ValueError):
  """The DreamBench folder is missing or malformed (the message says what to fix)."""


@dataclasses.dataclass(frozen=True)
class BenchSubject:
  """One DreamBench subject."""
  name: str
  class_word: str
  photos: tuple[pathlib.Path, ...]

  @property
  def live(self) -> bool:
    """Whether the subject is a live one (dog, cat): it gets the live prompt list."""
    return self.class_word in LIVE_CLASSES


@dataclasses.dataclass(frozen=True)
class DreamBench:
  """Subjects and prompt templates of the protocol."""
  root: pathlib.Path
  subjects: tuple[BenchSubject, ...]
  object_prompts: tuple[str, ...]
  live_prompts: tuple[str, ...]

  def prompts_for(self, subject: BenchSubject) -> tuple[str, ...]:
    """The subject's prompt templates: the live list for cats and dogs, else the object list."""
    return self.live_prompts if subject.live else self.object_prompts


def _prompt_lists(text: str) -> tuple[list[str], list[str]]:
  """The two ``prompt_list = [...]`` blocks of ``prompts_and_classes.txt``."""
  lists = []
  for block in re.findall(r"prompt_list = \[(.*?)\]", text, flags=re.S):
    templates = []
    for line in block.splitlines():
      m = re.match(r"\s*(['\"].*['\"])\.format\(", line)
      if m:
        templates.append(ast.literal_eval(m.group(1)))
    lists.append(templates)
  if len(lists) != 2 or not all(lists):
    raise DreamBenchError("prompts_and_classes.txt: expected an object and a live "
                          "'prompt_list = [...]' block")
  return lists[0], lists[1]


def load(root: str | pathlib.Path) -> DreamBench:
  """Reads the subject table, the prompt lists and the photos under ``root``
  (``config.dreambench.root`` of ``configs/eval.py``: ``../shared/dreambench``).

  Raises:
    DreamBenchError: ``root`` or its table is missing, or a subject has no photos.
  """
  root = pathlib.Path(root)
  table = root / "prompts_and_classes.txt"
  if not table.is_file():
    raise DreamBenchError(f"{table} not found; pass the DreamBench folder "
                          "(the one holding prompts_and_classes.txt)")
  text = table.read_text()
  subjects = []
  for line in text.splitlines():
    m = re.fullmatch(r"([A-Za-z0-9_]+),([A-Za-z ]+)", line.strip())
    if not m or m.group(1) == "subject_name":
      continue
    name, cls = m.group(1), m.group(2).strip()
    photos = tuple(sorted(p for p in (root / name).glob("*")
                          if p.suffix.lower() in _IMAGE_SUFFIXES))
    if not photos:
      raise DreamBenchError(f"subject {name!r} has no photos in {root / name}")
    subjects.append(BenchSubject(name, cls, photos))
  if not subjects:
    raise DreamBenchError(f"{table}: no 'subject,class' rows")
  objects, live = _prompt_lists(text)
  return DreamBench(root, tuple(subjects), tuple(objects), tuple(live))


def _concept_name(name: str) -> str:
  """A database-valid concept name for a subject folder name."""
  name = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:db_lib.MAX_NAME_LENGTH]
  try:
    return db_lib.validate_name(name)
  except db_lib.DatabaseError:
    return db_lib.validate_name(f"s_{name}"[:db_lib.MAX_NAME_LENGTH])


def run(model, scorer, bench: DreamBench, *, subjects: Iterable[str] | None = None,
        num_prompts: int | None = None, seeds: Sequence[int] = (0,), max_photos: int = 4,
        steps: int | None = None, sr_steps: int | None = None, progress: bool = False
        ) -> dict[str, Any]:
  """Runs the protocol.

  Args:
    model: a ``pipeline.model.Model``.
    scorer: a ``protocol.ProtocolScorer``.
    bench: ``load()``'s result.
    subjects: subject names (default all).
    num_prompts: the first ``n`` templates of each list (default all 25).
    seeds: one video per (prompt, seed).
    max_photos: photos per concept (the first ones, sorted by name).
    steps, sr_steps: sampler steps (default the model config's).
    progress: sampler progress bars.

  Returns:
    ``{'rows': [{subject, prompt, seed, clip_t, clip_i, dino_i, ...}],
    'means': {metric: float}, 'per_subject': {name: {metric: float}},
    'weights': scorer.weights}``.
  """
  config = model.config
  wanted = list(subjects) if subjects is not None else [s.name for s in bench.subjects]
  by_name = {s.name: s for s in bench.subjects}
  unknown = [n for n in wanted if n not in by_name]
  if unknown:
    raise DreamBenchError(f"unknown DreamBench subject {unknown[0]!r}; "
                          f"known: {', '.join(by_name)}")
  generator = gen.Generator(model, steps=steps, sr_steps=sr_steps)
  feature_fn = build.make_feature_fn(model)
  image_slot = config.concepts.capacity - 1
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in wanted:
      subj = by_name[name]
      concept = _concept_name(name)
      db = db_lib.ConceptDatabase.create(pathlib.Path(tmp) / concept, config,
                                         model.feature_id, commit=False)
      paths = list(subj.photos[:max_photos])
      photos = build.load_photos(paths)
      feats = build.encode_concept(model, photos, paths, feature_fn)
      db.add(concept, feats.ref_tokens, feats.detail_tokens, list(feats.provenance))
      concepts = {n: r.slot for n, r in db.concepts.items()}
      templates = bench.prompts_for(subj)[:num_prompts]
      requests, meta = [], []
      for template in templates:
        for seed in seeds:
          requests.append(gen.resolve(gen.Request(template.format(f"<{concept}>", subj.class_word)),
                                      concepts, image_slot, config))
          meta.append((template, seed))
      videos = []
      for seed in seeds:   # one batch per seed: the seed is per batch
        batch = [r for r, (_, s) in zip(requests, meta) if s == seed]
        out = generator(db.bank, batch, image_slot=image_slot, seed=int(seed),
                        progress=progress)
        videos.extend(zip([m for m in meta if m[1] == seed], media.to_uint8(out.video)))
      references = np.stack([_fit(images.load_image(p), 224) for p in paths])
      for (template, seed), video in videos:
        text = re.sub(r"\s+", " ", template.format("", subj.class_word)).strip()
        rows.append(dict(subject=name, prompt=template.format(f"<{concept}>", subj.class_word),
                         text=text, seed=int(seed),
                         **scorer.score(video, text, references)))
  metrics = [k for k in rows[0] if isinstance(rows[0][k], float)] if rows else []
  means = {k: float(np.mean([r[k] for r in rows])) for k in metrics}
  per_subject = {n: {k: float(np.mean([r[k] for r in rows if r["subject"] == n]))
                     for k in metrics} for n in wanted}
  return dict(rows=rows, means=means, per_subject=per_subject, weights=scorer.weights,
              subjects=wanted, num_prompts=len(templates) if wanted else 0,
              seeds=[int(s) for s in seeds])


def markdown(result: dict[str, Any]) -> str:
  """``run``'s result as a markdown table: one row per subject, then the means."""
  cols = [k for k in ("clip_t", "clip_i", "dino_i", "temporal_consistency", "flow", "dynamic")
          if k in result["means"]]
  lines = [f"DreamBench: {len(result['subjects'])} subjects x {result['num_prompts']} prompts x "
           f"{len(result['seeds'])} seeds; encoders: {result['weights']} weights.", "",
           "| subject | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
  for name, m in result["per_subject"].items():
    lines.append(f"| {name} | " + " | ".join(f"{m[c]:.3f}" for c in cols) + " |")
  lines.append("| **mean** | " + " | ".join(f"{result['means'][c]:.3f}" for c in cols) + " |")
  return "\n".join(lines) + "\n"


def _fit(image: np.ndarray, size: int) -> np.ndarray:
  """Centre-crops to a square and resizes to ``size`` (photos differ in shape)."""
  h, w, _ = image.shape
  s = min(h, w)
  y, x = (h - s) // 2, (w - s) // 2
  from PIL import Image
  return np.asarray(Image.fromarray(image[y:y + s, x:x + s]).resize(
      (size, size), Image.Resampling.BICUBIC))
