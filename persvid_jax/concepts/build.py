"""Building a concept from photos: recognise, encode, extract, store.

For each photo: the subject is segmented (``subject.segment_subject``, or a
user mask) and cropped to the model's reference size; the image encoder +
reference mapper turn the masked crop into ``K`` pseudo-word tokens (the
*reference feature*) and the extraction network turns crop + mask into ``N``
*detail tokens*. Several photos of one concept are combined: reference tokens
averaged, detail tokens averaged slot by slot (the extractor's tokens are the
outputs of fixed learned queries, so token ``i`` means the same thing for
every photo), giving the bank's fixed ``[K, D]`` / ``[N, Dd]``.

The same feature function serves generation's target-image modes, so a
concept stored from a photo and the same photo given as a target image yield
the same tokens.

``add_concept`` also keeps a thumbnail of the concept's first photo (the UI
shows it on the concept's button) as ``DB/thumbnails/<sha256>.png``, named by
the photo's hash recorded in the manifest: versions and restores never
disagree with it, and a missing one (a database from before thumbnails) only
means a button without a picture.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from persvid_jax import atomic
from persvid_jax.concepts import conditioning, images
from persvid_jax.concepts import subject as subject_lib

THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_SIDE = 96       # px, the longer side: a button icon


@dataclasses.dataclass(frozen=True)
class ReferenceImage:
  """A photo prepared for the encoders.

  Attributes:
    image: float32 ``[R, R, 3]`` in [-1, 1], the square crop around the subject.
    mask: float32 ``[R, R, 1]`` in [0, 1], the subject within the crop.
    crop: uint8 ``[R, R, 3]``, the crop for contact sheets.
    coverage: the subject's share of the original photo.
  """
  image: np.ndarray
  mask: np.ndarray
  crop: np.ndarray
  coverage: float


def reference_size(config) -> int:
  """``R``: the side of reference crops (the image encoder's input size)."""
  return int(config.image.image_size)


def subject_reference(image: np.ndarray, config, mask: np.ndarray | None = None
                      ) -> ReferenceImage:
  """A photo of a subject (uint8 ``[H, W, 3]``) -> its segmented crop.

  ``mask`` (float ``[H, W]``) replaces the automatic segmentation.
  """
  return reference_from_crop(segment(image, config, mask))


def segment(image: np.ndarray, config, mask: np.ndarray | None = None
            ) -> subject_lib.SubjectCrop:
  """``segment_subject`` with the config's crop: side ``reference_size(config)``
  and ``concepts.subject_fill`` (what ``subject_reference`` runs)."""
  return subject_lib.segment_subject(image, mask=mask, size=reference_size(config),
                                     fill=config.concepts.get("subject_fill", 0.4))


def reference_from_crop(seg: subject_lib.SubjectCrop) -> ReferenceImage:
  """The encoders' input from a ``segment`` result (e.g. one a mask preview made)."""
  return ReferenceImage(image=seg.crop.astype(np.float32) / 127.5 - 1.0,
                        mask=np.asarray(seg.crop_mask, np.float32)[..., None],
                        crop=seg.crop, coverage=float(seg.coverage))


def scene_reference(image: np.ndarray, config) -> ReferenceImage:
  """A non-target (scene / style) image: the centre square, whole image as mask."""
  h, w = image.shape[:2]
  side = min(h, w)
  y0, x0 = (h - side) // 2, (w - side) // 2
  r = reference_size(config)
  crop = np.asarray(Image.fromarray(image[y0:y0 + side, x0:x0 + side]).resize(
      (r, r), Image.Resampling.LANCZOS))
  return ReferenceImage(image=crop.astype(np.float32) / 127.5 - 1.0,
                        mask=np.ones((r, r, 1), np.float32), crop=crop, coverage=1.0)


def make_feature_fn(model):
  """``features(params, crops [B,R,R,3], masks [B,R,R,1]) -> (ref [B,K,D], detail [B,N,Dd])``.

  Jitted; the encoders see the subject only (image * mask), as in training.
  """
  ctx = conditioning.Context.from_model(model)

  @jax.jit
  def features(params, crops, masks):
    ref = conditioning.reference_tokens(ctx, params, crops, masks)
    detail = conditioning.detail_tokens(ctx, params, crops, masks)
    return ref.astype(jnp.float32), detail.astype(jnp.float32)

  return features


def sha256_of(path: str | pathlib.Path) -> str:
  """Hex SHA-256 of a file's bytes (provenance in the manifest)."""
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ConceptFeatures:
  """What ``encode_concept`` returns."""
  ref_tokens: np.ndarray        # [K, D]
  detail_tokens: np.ndarray     # [N, Dd]
  references: tuple             # ReferenceImage per photo
  provenance: tuple             # {'file', 'sha256', 'coverage'} per photo


def load_photos(paths: Sequence[str | pathlib.Path], mask_paths=None):
  """Reads photos (and optional masks) -> ``[(uint8 [H,W,3], mask or None)]``.

  Raises ``images.ImageError`` naming the first unusable file, before any work:
  among them a photo of one flat colour without a mask (``images.flat_range``),
  where the segmentation would return an arbitrary blob as "the subject".
  """
  if mask_paths and len(mask_paths) != len(paths):
    raise images.ImageError(f"{len(mask_paths)} masks for {len(paths)} images; give one "
                            "mask per image or none")
  out = []
  for i, p in enumerate(paths):
    image = images.load_image(p)
    mask = images.load_mask(mask_paths[i], image.shape[:2]) if mask_paths else None
    levels = images.flat_range(image) if mask is None else None
    if levels is not None:
      raise images.ImageError(
          f"image {str(p)!r} is one flat colour (every channel within {levels} levels of 255): "
          f"there is no subject to find; use a photo of the subject, or give a mask with it")
    out.append((image, mask))
  return out


def encode_concept(model, photos, paths: Sequence[str | pathlib.Path] = (),
                   feature_fn=None, references=None) -> ConceptFeatures:
  """Photos of one subject -> its bank entry.

  Args:
    model: a ``pipeline.model.Model``.
    photos: ``[(uint8 [H, W, 3], mask [H, W] or None)]`` (``load_photos``).
    paths: the files, for provenance (may be empty).
    feature_fn: a ``make_feature_fn(model)`` to reuse (compiled once).
    references: optional, one per photo: its ``ReferenceImage`` if already
      segmented (``reference_from_crop`` of a preview's ``segment``), or None to
      segment it here. The segmentation is the slow, host-side part of adding a
      concept (tens of ms a photo); a UI that showed the mask has it already.
  """
  if references is None:
    references = [None] * len(photos)
  if len(references) != len(photos):
    raise ValueError(f"{len(references)} references for {len(photos)} photos")
  side = reference_size(model.config)
  for r in references:
    if r is not None and r.image.shape != (side, side, 3):
      raise ValueError(f"a reference crop of shape {r.image.shape}; this model's "
                       f"encoders take {side}x{side}x3")
  refs = [r if r is not None else subject_reference(img, model.config, mask)
          for (img, mask), r in zip(photos, references)]
  feature_fn = feature_fn or make_feature_fn(model)
  ref, detail = feature_fn(model.params, jnp.asarray(np.stack([r.image for r in refs])),
                           jnp.asarray(np.stack([r.mask for r in refs])))
  ref, detail = np.asarray(ref), np.asarray(detail)
  provenance = tuple(
      dict(file=pathlib.Path(p).name, sha256=sha256_of(p), coverage=round(r.coverage, 4))
      for p, r in zip(paths, refs))
  return ConceptFeatures(ref_tokens=ref.mean(0), detail_tokens=detail.mean(0),
                         references=tuple(refs), provenance=provenance)


def add_concept(db, name: str, model, photos, paths: Sequence[str | pathlib.Path],
                feature_fn=None, references=None):
  """Encodes ``photos`` and stores them as concept ``name`` in ``db``, with a thumbnail.

  Args:
    db: a ``database.ConceptDatabase`` of ``model``'s features.
    name: the new concept's name.
    model, photos, paths, feature_fn, references: as for ``encode_concept``.

  Returns:
    ``(record, features)``: the database's ``ConceptRecord`` and ``ConceptFeatures``.
  """
  features = encode_concept(model, photos, paths, feature_fn, references)
  record = db.add(name, features.ref_tokens, features.detail_tokens, list(features.provenance))
  if features.provenance:
    try:
      save_thumbnail(db.directory, photos[0][0], features.provenance[0]["sha256"])
    except OSError as e:    # the concept is stored; only its picture is missing
      logging.getLogger(__name__).warning("no thumbnail for <%s>: %s", name, e)
  return record, features


def save_thumbnail(db_dir: str | pathlib.Path, image: np.ndarray, sha256: str) -> pathlib.Path:
  """Writes ``image`` (uint8 ``[H, W, 3]``), shrunk to ``THUMBNAIL_SIDE``, as the thumbnail
  of the photo with hash ``sha256``; returns its path (atomic: complete or absent)."""
  path = pathlib.Path(db_dir) / THUMBNAIL_DIR / f"{sha256}.png"
  path.parent.mkdir(parents=True, exist_ok=True)
  thumb = Image.fromarray(np.asarray(image, np.uint8))
  thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
  with atomic.file(path) as tmp:
    thumb.save(tmp, format="PNG")
  return path


def thumbnail_path(db_dir: str | pathlib.Path, record) -> pathlib.Path | None:
  """The thumbnail of ``record``'s (a ``ConceptRecord``) first photo, or None if it has
  none (stored without photos, or before thumbnails were kept)."""
  if not record.images or "sha256" not in record.images[0]:
    return None
  path = pathlib.Path(db_dir) / THUMBNAIL_DIR / f"{record.images[0]['sha256']}.png"
  return path if path.is_file() else None
