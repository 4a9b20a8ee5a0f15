"""The UI: one button per stored concept, a text box, a video.

Two layers:

* ``Studio``: everything the page does, without Gradio (open the database,
  match typed concept names, show the mode, generate, preview a subject mask,
  add a concept). Plain Python, tested directly.
* ``build_ui(studio)``: the Gradio page over it. The concept buttons are
  re-rendered from a ``gr.State`` list of names, so a concept added through
  the "add concept" panel (or by ``launch.concepts`` before a page reload)
  gets its button without restarting the app.

Safety: the server binds to 127.0.0.1 unless told otherwise, uploads are
capped (``max_upload_mb``), and every uploaded image goes through
``concepts.images.load_image`` (which refuses decompression bombs and
unreadable files) rather than Gradio's own decoding.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import pathlib
import re
import tempfile
import threading
import time
from typing import Sequence

import numpy as np
from PIL import Image

from persvid_jax.concepts import build, images
from persvid_jax.concepts import database as db_lib
from persvid_jax.concepts.bank import ConceptBank
from persvid_jax.pipeline import generate as gen
from persvid_jax.pipeline import media
from persvid_jax.pipeline.model import ModelError
from persvid_jax.apps import DEFAULT_DB

# Gradio's usage analytics would try the network at import and launch.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MAX_PHOTOS = 8
_MODE_TEXT = {
    "concept": "concept (stored subject, stored detail features)",
    "concept+target": "concept + target image (stored and image detail features fused)",
    "target": "target image only (<image> is the uploaded photo's subject)",
    "concept+scene": "concept + non-target image (the image sets scene / style)",
    "text": "text only",
    "text+scene": "text + non-target image",
}


# The errors whose message the page shows (as one line) instead of failing.
_USER_ERRORS = (db_lib.DatabaseError, images.ImageError, gen.GenerationError, ModelError)


def match_typed_names(prompt: str, names: Sequence[str]) -> tuple[str, list[str]]:
  """A stored concept's name typed as a plain word selects the concept.

  ``"a sub1 on snow"`` with a stored ``sub1`` becomes ``"a <sub1> on snow"``.
  Whole words only, case-insensitive, the longest name first (so ``dog_2``
  wins over ``dog``); names already written as ``<name>`` are left alone.

  Returns:
    ``(prompt with <name> placeholders, names matched from typed words)``.
  """
  matched = []
  for name in sorted(names, key=len, reverse=True):
    pattern = re.compile(r"(?<![<\w])" + re.escape(name) + r"(?![\w>])", re.IGNORECASE)
    prompt, n = pattern.subn(f"<{name}>", prompt)
    if n:
      matched.append(name)
  return prompt, matched


def insert_concept(prompt: str, name: str) -> str:
  """The button of concept ``name`` puts ``<name>`` into the prompt.

  An empty prompt becomes ``"a <name>"``; otherwise ``<name>`` is appended
  unless the prompt already names it.
  """
  token = f"<{name}>"
  prompt = (prompt or "").rstrip()
  if token in prompt:
    return prompt
  return f"{prompt} {token}" if prompt else f"a {token}"


@dataclasses.dataclass(frozen=True)
class Generated:
  """What ``Studio.generate`` returns."""
  path: pathlib.Path        # the MP4
  mode: str                 # one of pipeline.generate.MODES
  prompt: str               # the prompt as generated (typed names -> <name>)
  seconds: float            # wall time, compilation included on the first call


class Studio:
  """The app's state and actions, independent of Gradio.

  Args:
    model: a ``pipeline.model.Model``.
    db_dir: the concept database (created by the first added concept).
    out_dir: where generated videos are written.
    steps, sr_steps: sampler steps (default: the model's config).
    scale: pixel enlargement of the written videos (the demo model's frames
      are 32 px).
  """

  def __init__(self, model, db_dir: str | os.PathLike = DEFAULT_DB,
               out_dir: str | os.PathLike | None = None, *, steps: int | None = None,
               sr_steps: int | None = None, scale: int = 8):
    self.model = model
    self.db_dir = pathlib.Path(db_dir)
    self.out_dir = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="persvid_ui_"))
    try:
      self.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:    # a file in the way, no permission: the user's to fix
      raise gen.GenerationError(f"cannot create the output directory {self.out_dir}: "
                                f"{e.strerror or e}") from None
    self.scale = int(scale)
    self.generator = gen.Generator(model, steps=steps, sr_steps=sr_steps)
    self._feature_fn = build.make_feature_fn(model)
    # Gradio runs handlers on worker threads; one generation or database
    # write at a time (the compiled programs and the database are shared).
    self._lock = threading.Lock()
    self._count = 0
    # The encoders' crops that preview() segmented, by photo content: adding
    # the concept then skips the segmentation (the slow host-side part).
    self._segmented: collections.OrderedDict[str, build.ReferenceImage] = (
        collections.OrderedDict())
    self._segmented_lock = threading.Lock()
    self.check_database()

  # ---- database -------------------------------------------------------------------

  def _open(self):
    if not db_lib.ConceptDatabase.exists(self.db_dir):
      return None
    return db_lib.ConceptDatabase.open(self.db_dir)

  def check_database(self) -> None:
    """Raises ``DatabaseError`` if the database was built with another model."""
    db = self._open()
    if db is not None and db.feature_id != self.model.feature_id:
      raise db_lib.DatabaseError(
          f"{self.db_dir} was built with another model (feature id {db.feature_id}, this "
          f"model {self.model.feature_id}); pass that model with --model or use another --db")

  def concepts(self) -> dict[str, int]:
    """``{name: slot}`` of the stored concepts (empty without a database)."""
    db = self._open()
    return {n: r.slot for n, r in db.concepts.items()} if db is not None else {}

  def names(self) -> list[str]:
    """The stored concepts' names, in slot order (the button order)."""
    return [n for n, _ in sorted(self.concepts().items(), key=lambda kv: kv[1])]

  def thumbnails(self) -> dict[str, pathlib.Path | None]:
    """``{name: PNG of the concept's first photo, or None}`` (the buttons' pictures)."""
    db = self._open()
    if db is None:
      return {}
    return {n: build.thumbnail_path(self.db_dir, r) for n, r in db.concepts.items()}

  # ---- the prompt ----------------------------------------------------------------------

  def describe(self, prompt: str, has_image: bool, image_role: str = "target") -> str:
    """One markdown line for the page: the concepts matched and the mode, or the problem."""
    concepts = self.concepts()
    text, typed = match_typed_names(prompt or "", list(concepts))
    try:
      mode, _ = gen.request_mode(text, concepts, has_image=has_image, image_role=image_role)
    except gen.GenerationError as e:
      return f"**cannot generate:** {e}"
    named = sorted(set(gen._NAME_RE.findall(text)) - {gen.IMAGE_TOKEN})
    parts = [f"**mode:** {mode} — {_MODE_TEXT[mode]}"]
    if typed:
      parts.append("matched typed name " + ", ".join(f"`{n}` → `<{n}>`" for n in typed))
    if named:
      parts.append("concepts: " + ", ".join(f"`<{n}>`" for n in named))
    return " · ".join(parts)

  # ---- generation ----------------------------------------------------------------------

  def generate(self, prompt: str, image_path: str | None = None, image_role: str = "target",
               seed: int = 0, progress: bool = True) -> Generated:
    """Generates one video (any of the six modes) and writes it as MP4.

    Raises the library's user errors (unknown concept, unreadable image, ...)
    before any sampling.
    """
    if not (prompt or "").strip():
      raise gen.GenerationError("the prompt is empty; describe the video, naming a concept "
                                "with its button or as <name>")
    image = images.load_image(image_path) if image_path else None
    with self._lock:
      db = self._open()
      concepts = {n: r.slot for n, r in db.concepts.items()} if db is not None else {}
      text, _ = match_typed_names(prompt, list(concepts))
      bank = db.bank if db is not None else ConceptBank.from_config(self.model.config)
      image_slot = self.model.config.concepts.capacity - 1
      resolved = gen.resolve(gen.Request(prompt=text, image=image, image_role=image_role),
                             concepts, image_slot, self.model.config)
      t0 = time.perf_counter()
      out = self.generator(bank, [resolved], image_slot=image_slot, seed=int(seed),
                           progress=progress)
      seconds = time.perf_counter() - t0
      self._count += 1
      path = media.save_mp4(self.out_dir / f"video_{self._count:04d}_{resolved.mode}.mp4",
                            out.video[0], scale=self.scale)
    return Generated(path=path, mode=resolved.mode, prompt=text, seconds=seconds)

  # ---- adding a concept ----------------------------------------------------------------

  def preview(self, paths: Sequence[str]) -> np.ndarray:
    """The subject masks the database would store: uint8 ``[H, W, 3]`` sheet.

    One row per photo: the photo with the background dimmed and the subject
    outlined in red, beside the square crop the encoders see.
    """
    _check_photo_count(paths)
    rows, side = [], 192
    config = self.model.config
    for image, mask in build.load_photos(list(paths)):
      # One segmentation gives both the full-photo mask and the encoders' crop
      # (the arguments build.subject_reference uses).
      seg = build.segment(image, config, mask)
      self._remember(image, mask, build.reference_from_crop(seg))
      m = seg.mask[..., None]
      shown = (image * (0.35 + 0.65 * m)).astype(np.uint8)
      edge = (m[..., 0] > 0) & ~_eroded(m[..., 0] > 0)
      shown[edge] = (255, 0, 0)
      h, w = shown.shape[:2]
      s = side / max(h, w)
      photo = np.asarray(Image.fromarray(shown).resize((max(1, round(w * s)), max(1, round(h * s)))))
      crop = np.asarray(Image.fromarray(seg.crop).resize((side, side), Image.Resampling.NEAREST))
      row = np.full((side, 2 * side + 8, 3), 255, np.uint8)
      row[:photo.shape[0], :photo.shape[1]] = photo
      row[:, side + 8:] = crop
      rows.append(row)
    return np.concatenate([np.pad(r, ((0, 8), (0, 0), (0, 0)), constant_values=255)
                           for r in rows])[:-8]

  def add(self, name: str, paths: Sequence[str]) -> str:
    """Registers a concept from photos; returns a one-line summary.

    Every check (name, photos, model match) runs before anything is written;
    the database gets a new version only when the features are computed.
    """
    name = (name or "").strip()
    db_lib.validate_name(name)
    _check_photo_count(paths)
    with self._lock:
      db = self._open()
      if db is not None:
        db.check_new_name(name)
      photos = build.load_photos(list(paths))
      if db is None:
        db = db_lib.ConceptDatabase.create(self.db_dir, self.model.config,
                                           self.model.feature_id, commit=False)
      record, features = build.add_concept(
          db, name, self.model, photos, list(paths), feature_fn=self._feature_fn,
          references=[self._recall(image, mask) for image, mask in photos])
    cover = ", ".join(f"{p['coverage']:.0%}" for p in features.provenance)
    return (f"added <{record.name}> (slot {record.slot}, {record.num_images} photo(s), "
            f"subject coverage {cover})")


  def _remember(self, image: np.ndarray, mask, ref: build.ReferenceImage) -> None:
    with self._segmented_lock:
      self._segmented[_photo_key(image, mask)] = ref
      while len(self._segmented) > 4 * MAX_PHOTOS:   # a long-running page: bounded
        self._segmented.popitem(last=False)

  def _recall(self, image: np.ndarray, mask) -> build.ReferenceImage | None:
    with self._segmented_lock:
      return self._segmented.get(_photo_key(image, mask))


def _photo_key(image: np.ndarray, mask) -> str:
  """A photo's identity by content (and its mask's): the same pixels, the same crop."""
  h = hashlib.blake2b(digest_size=16)
  for a in (image, mask):
    if a is not None:
      a = np.ascontiguousarray(a)
      h.update(repr((a.dtype.str, a.shape)).encode())
      h.update(a.tobytes())
    else:
      h.update(b"none")
  return h.hexdigest()


def _check_photo_count(paths: Sequence[str]) -> None:
  """Raises ``ImageError`` unless there are 1 to ``MAX_PHOTOS`` photos."""
  if not paths:
    raise images.ImageError("no photos; upload one or more photos of the subject")
  if len(paths) > MAX_PHOTOS:
    raise images.ImageError(f"{len(paths)} photos; give at most {MAX_PHOTOS}")


def _eroded(mask: np.ndarray) -> np.ndarray:
  """4-neighbour erosion of a bool ``[H, W]`` mask (for the outline)."""
  m = np.pad(mask, 1)
  return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


# ---- the page ---------------------------------------------------------------------------

def _escape(text: str) -> str:
  """Markdown-safe text: ``<name>`` would otherwise be taken for an HTML tag and vanish."""
  return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _theme():
  import gradio as gr   # optional ([ui] extra): Studio works without it
  # System fonts: the default theme fetches web fonts, which an offline
  # machine (or a pod's login node) cannot reach.
  return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "monospace"])


def build_ui(studio: Studio):
  """The Gradio page over ``studio`` (``gr.Blocks``, not yet launched).

  Element ids (for tests and scripting): ``prompt``, ``mode``, ``image``,
  ``image-role``, ``seed``, ``generate``, ``status``, ``video``; concept
  buttons have the class ``concept-button`` and show the concept's first
  photo as their icon (``Studio.thumbnails``); the add panel has
  ``new-name``, ``new-photos``, ``preview``, ``add-concept``, ``add-status``.
  """
  import gradio as gr   # optional ([ui] extra): Studio works without it
  errors = _USER_ERRORS

  def fail(e: BaseException) -> str:
    return f"**error:** {_escape(str(e))}"

  with gr.Blocks(title="persvid_jax") as page:
    names = gr.State(studio.names())
    gr.Markdown("## persvid_jax — personalized video\nClick a concept to put it in the "
                "prompt (or type its name), optionally add an image, then Generate.")
    with gr.Row():
      with gr.Column(scale=3):
        gr.Markdown("**Concepts**")

        @gr.render(inputs=names)
        def concept_buttons(current):
          if not current:
            gr.Markdown("_no concepts yet: add one below_", elem_id="no-concepts")
            return
          thumbs = studio.thumbnails()
          with gr.Row(elem_id="concept-buttons"):
            for n in current:
              # The concept's first photo on its button (none for a concept stored
              # before thumbnails were kept: the name alone).
              thumb = thumbs.get(n)
              btn = gr.Button(f"<{n}>", icon=str(thumb) if thumb else None,
                              elem_classes=["concept-button"], size="sm", scale=0,
                              min_width=90, key=f"concept-{n}")
              btn.click(lambda p, n=n: insert_concept(p, n), inputs=prompt, outputs=prompt)

        prompt = gr.Textbox(label="Prompt", elem_id="prompt", lines=2,
                            placeholder="a <name> moving left on grass")
        mode = gr.Markdown(studio.describe("", False), elem_id="mode")
        with gr.Row():
          image = gr.Image(label="Image (optional)", type="filepath", image_mode="RGB",
                           sources=["upload"], elem_id="image", height=160)
          with gr.Column():
            role = gr.Radio(["target", "scene"], value="target", label="Image role",
                            info="target: the image shows the subject; scene: setting/style",
                            elem_id="image-role")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        status = gr.Markdown("", elem_id="status")
      with gr.Column(scale=2):
        video = gr.Video(label="Video", elem_id="video", autoplay=True, loop=True,
                         interactive=False)

    with gr.Accordion("Add a concept", open=False, elem_id="add-panel"):
      with gr.Row():
        with gr.Column():
          new_name = gr.Textbox(label="Name (used as <name>)", elem_id="new-name")
          photos = gr.File(label=f"Photos of the subject (1-{MAX_PHOTOS})",
                           file_count="multiple", file_types=["image"], type="filepath",
                           elem_id="new-photos")
          add = gr.Button("Add concept", elem_id="add-concept")
          add_status = gr.Markdown("", elem_id="add-status")
        preview = gr.Image(label="Subject mask (red outline) and the stored crop",
                           interactive=False, elem_id="preview")

    def on_describe(p, img, r):
      return studio.describe(p, img is not None, r)

    for trigger in (prompt.change, image.change, role.change):
      trigger(on_describe, inputs=[prompt, image, role], outputs=mode, show_progress="hidden")

    def on_generate(p, img, r, s, progress=gr.Progress(track_tqdm=True)):
      try:
        out = studio.generate(p, img, r, int(s or 0), progress=True)
      except errors as e:
        return gr.update(), fail(e)
      return str(out.path), (f"mode **{out.mode}** · `{out.prompt}` · seed {int(s or 0)} · "
                             f"{out.seconds:.1f} s")

    generate.click(on_generate, inputs=[prompt, image, role, seed], outputs=[video, status])

    def on_photos(files):
      if not files:
        return None, ""
      try:
        return studio.preview(files), ""
      except errors as e:
        return None, fail(e)

    photos.change(on_photos, inputs=photos, outputs=[preview, add_status])

    def on_add(n, files, current):
      try:
        msg = studio.add(n, files or [])
      except errors as e:
        return current, fail(e), gr.update()
      return studio.names(), _escape(msg), ""

    add.click(on_add, inputs=[new_name, photos, names], outputs=[names, add_status, new_name])
    # A concept added from the command line appears on the next page load.
    page.load(studio.names, outputs=names)
  return page


def launch(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860,
           max_upload_mb: float = 10.0, block: bool = True):
  """Serves the page; returns the ``gr.Blocks`` (``block=False``: in a thread).

  Only the output directory is served besides Gradio's own upload cache.
  """
  page = build_ui(studio)
  page.queue(default_concurrency_limit=1)
  page.launch(server_name=host, server_port=int(port), max_file_size=int(max_upload_mb * 1024 * 1024),
              allowed_paths=[str(studio.out_dir)], prevent_thread_lock=not block,
              show_error=False, quiet=True, theme=_theme(), footer_links=[])
  return page
