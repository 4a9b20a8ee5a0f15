"""The standard protocol of subject-driven video papers (DreamVideo, VideoBooth).

Over *any* supplied encoders, so that imported CLIP / DINO weights plug in:

* an ``ImageEmbedder``: uint8 ``[N, H, W, 3] -> float [N, D]``;
* a ``TextEmbedder``: ``list[str] (N) -> float [N, D]`` in the image
  embedder's space (CLIP).

Metrics, per video (uint8 ``[T, H, W, 3]``), all cosine similarities of
L2-normalised embeddings:

* **CLIP-T** — text-video alignment: mean over frames of cos(frame, prompt),
  the prompt with its concept replaced by the class word;
* **CLIP-I** / **DINO-I** — subject fidelity: mean over frames x reference
  photos of cos(frame, photo), with the CLIP image tower / a DINO ViT;
* **temporal consistency** — mean cos(frame_t, frame_t+1) (CLIP image space);
* **dynamic degree** — how much the video moves, from dense optical flow
  (OpenCV Farneback, no weights; VBench uses RAFT): the mean of the top 5 %
  flow magnitudes per frame pair, as a fraction of the frame's short side,
  and whether the video counts as dynamic (VBench's rule: at least
  ``T / 4`` pairs above 6 px at 256 px, scaled to the frame).

Papers print these x100; we keep raw cosines in [-1, 1].

``ClipModel`` is the CLIP pair (text + vision towers and the two
projections) with ``transformers``' ``CLIPModel`` parameter names, so CLIP
checkpoints import by renaming; with random weights it exercises the
protocol end to end (the numbers mean nothing then, and the runners say so).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from persvid_jax.models.image_encoder import ImageEncoder
from persvid_jax.models.text_encoder import TextEncoder

ImageEmbedder = Callable[[np.ndarray], np.ndarray]
TextEmbedder = Callable[[Sequence[str]], np.ndarray]

PROTOCOL_METRICS = ("clip_t", "clip_i", "dino_i", "temporal_consistency", "flow",
                    "dynamic")


# ---------------------------------------------------------------------------
# Similarities (pure functions of embeddings)
# ---------------------------------------------------------------------------

def normalize(x: np.ndarray) -> np.ndarray:
  """Rows of ``[N, D]`` scaled to unit L2 norm (float64; zero rows stay zero)."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """``[N, D] x [M, D] -> [N, M]`` cosine similarities."""
  return normalize(a) @ normalize(b).T


def clip_t(frame_embeds: np.ndarray, text_embed: np.ndarray) -> float:
  """Mean cos(frame, text): ``frame_embeds [T, D]``, ``text_embed [D]``."""
  return float(np.mean(cosine_matrix(frame_embeds, np.reshape(text_embed, (1, -1)))))


def image_similarity(frame_embeds: np.ndarray, reference_embeds: np.ndarray) -> float:
  """CLIP-I / DINO-I: mean cos over all (frame ``[T, D]``, reference ``[R, D]``) pairs."""
  return float(np.mean(cosine_matrix(frame_embeds, reference_embeds)))


def temporal_consistency(frame_embeds: np.ndarray) -> float:
  """Mean cos of consecutive frames' embeddings ``[T, D]`` (1.0 for ``T = 1``)."""
  e = normalize(frame_embeds)
  if len(e) < 2:
    return 1.0
  return float(np.mean(np.sum(e[:-1] * e[1:], axis=-1)))


def dynamic_degree(video: np.ndarray, *, top_fraction: float = 0.05) -> dict[str, float]:
  """How much a video moves, from Farneback optical flow between consecutive frames.

  Args:
    video: uint8 ``[T, H, W, 3]``.
    top_fraction: the share of largest flow magnitudes averaged per pair.

  Returns:
    ``{'flow': mean over pairs of the top-``top_fraction`` flow magnitude,
    as a fraction of min(H, W) per frame; 'dynamic': 1.0 if at least
    max(1, round(T / 4)) pairs exceed VBench's 6 px at 256 px, else 0.0}``.
  """
  video = np.asarray(video)
  t_len, h, w, _ = video.shape
  if t_len < 2:
    return dict(flow=0.0, dynamic=0.0)
  side = min(h, w)
  # Farneback needs a few pixels per pyramid level: work at >= 64 px.
  up = max(1, int(np.ceil(64 / side)))
  grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in video]
  if up > 1:
    grey = [cv2.resize(g, (w * up, h * up), interpolation=cv2.INTER_CUBIC) for g in grey]
  tops = []
  for a, b in zip(grey[:-1], grey[1:]):
    flow = cv2.calcOpticalFlowFarneback(a, b, None, pyr_scale=0.5, levels=3, winsize=15,
                                        iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
    mag = np.linalg.norm(flow, axis=-1).ravel() / up          # pixels of the input frame
    k = max(1, int(round(top_fraction * mag.size)))
    tops.append(float(np.mean(np.partition(mag, -k)[-k:])))
  tops = np.asarray(tops) / side
  threshold = 6.0 / 256.0
  needed = max(1, int(round(t_len / 4)))
  return dict(flow=float(np.mean(tops)), dynamic=float(np.sum(tops > threshold) >= needed))


# ---------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class ProtocolScorer:
  """Scores videos with the standard protocol over supplied encoders.

  Attributes:
    clip_image: CLIP image embedder (CLIP-I, temporal consistency).
    clip_text: CLIP text embedder in the same space (CLIP-T).
    dino_image: DINO image embedder (DINO-I); None leaves DINO-I out.
    weights: a word for reports ('random' when the encoders are untrained).
  """
  clip_image: ImageEmbedder
  clip_text: TextEmbedder
  dino_image: ImageEmbedder | None = None
  weights: str = "supplied"

  def score(self, video: np.ndarray, text: str, references: np.ndarray | None = None
            ) -> dict[str, float]:
    """One video's metrics.

    Args:
      video: uint8 ``[T, H, W, 3]``.
      text: the prompt as the encoder should read it (concept -> class word).
      references: uint8 ``[R, h, w, 3]`` photos of the subject (any size;
        the embedders resize), or None (no CLIP-I / DINO-I).

    Returns:
      ``{clip_t, temporal_consistency, flow, dynamic[, clip_i][, dino_i]}``.
    """
    frames = self.clip_image(np.asarray(video))
    out = dict(clip_t=clip_t(frames, self.clip_text([text])[0]),
               temporal_consistency=temporal_consistency(frames),
               **dynamic_degree(video))
    if references is not None:
      out["clip_i"] = image_similarity(frames, self.clip_image(np.asarray(references)))
      if self.dino_image is not None:
        out["dino_i"] = image_similarity(self.dino_image(np.asarray(video)),
                                         self.dino_image(np.asarray(references)))
    return out


# ---------------------------------------------------------------------------
# Encoders in linen
# ---------------------------------------------------------------------------

class ClipModel(nn.Module):
  """CLIP: text and vision towers with projections into one ``E``-dim space.

  Parameter names follow ``transformers``' ``CLIPModel`` (``text_model``,
  ``vision_model``, ``text_projection``, ``visual_projection``), so a CLIP
  checkpoint imports by renaming.
  """
  text_model: TextEncoder       # (field names are the parameter names)
  vision_model: ImageEncoder
  projection_dim: int

  def setup(self):
    self.text_projection = nn.Dense(self.projection_dim, use_bias=False)
    self.visual_projection = nn.Dense(self.projection_dim, use_bias=False)

  def embed_images(self, images: jax.Array) -> jax.Array:
    """``[N, H, W, 3]`` in [-1, 1] -> ``[N, E]`` (unnormalised)."""
    return self.visual_projection(self.vision_model(images).pooled)

  def embed_texts(self, token_ids: jax.Array) -> jax.Array:
    """``[N, L]`` int32 -> ``[N, E]`` (the pooled end-of-text state, projected)."""
    _, pooled = self.text_model(token_ids)
    return self.text_projection(pooled)

  def __call__(self, images: jax.Array, token_ids: jax.Array):
    return self.embed_images(images), self.embed_texts(token_ids)


def _uint8_to_unit(images: np.ndarray) -> jax.Array:
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _batched(fn, batch_size: int):
  """Applies ``fn`` in fixed-size chunks (pads the last): one compile per batch size."""
  def apply(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    out = []
    for i in range(0, len(x), batch_size):
      chunk = x[i:i + batch_size]
      pad = batch_size - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      out.append(np.asarray(fn(chunk))[:batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
  return apply


def clip_embedders(model: ClipModel, params, tokenize: Callable[[Sequence[str]], np.ndarray],
                   *, batch_size: int = 16) -> tuple[ImageEmbedder, TextEmbedder]:
  """``(image_embedder, text_embedder)`` of a ``ClipModel`` (jitted, batched).

  ``tokenize`` maps ``N`` strings to int ``[N, L]`` (e.g. a
  ``PromptTokenizer.encode`` or a CLIP tokenizer's ids).
  """
  images = jax.jit(lambda p, x: model.apply({"params": p}, _uint8_to_unit(x),
                                            method=ClipModel.embed_images))
  texts = jax.jit(lambda p, ids: model.apply({"params": p}, ids, method=ClipModel.embed_texts))
  image_fn = _batched(lambda x: images(params, x), batch_size)
  text_fn = _batched(lambda ids: texts(params, jnp.asarray(ids)), batch_size)
  return image_fn, lambda strings: text_fn(np.asarray(tokenize(list(strings))))


def vit_embedder(encoder: ImageEncoder, params, *, batch_size: int = 16) -> ImageEmbedder:
  """An ``ImageEmbedder`` from a ViT's pooled class token (DINO's image feature)."""
  fn = jax.jit(lambda p, x: encoder.apply({"params": p}, _uint8_to_unit(x)).pooled)
  return _batched(lambda x: fn(params, x), batch_size)


def random_scorer(tokenize: Callable[[Sequence[str]], np.ndarray], vocab_size: int,
                  max_length: int, *, eos_token_id: int, seed: int = 0,
                  image_size: int = 32, width: int = 64) -> ProtocolScorer:
  """A ``ProtocolScorer`` over random-weight CLIP and DINO-style ViTs.

  For tests and for running the protocol end to end where no weights are at
  hand: the numbers are not comparable to any paper's (``weights='random'``).
  """
  text = TextEncoder(vocab_size=vocab_size, max_length=max_length, width=width, layers=2,
                     heads=4, mlp_dim=2 * width, eos_token_id=eos_token_id)
  vision = ImageEncoder(image_size=image_size, patch_size=4, width=width, layers=2,
                        heads=4, mlp_dim=2 * width)
  clip = ClipModel(text_model=text, vision_model=vision, projection_dim=width)
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = clip.init(k1, jnp.zeros((1, image_size, image_size, 3)),
                     jnp.zeros((1, max_length), jnp.int32))["params"]
  dino = ImageEncoder(image_size=image_size, patch_size=4, width=width, layers=2, heads=4,
                      mlp_dim=2 * width)
  dino_params = dino.init(k2, jnp.zeros((1, image_size, image_size, 3)))["params"]
  image_fn, text_fn = clip_embedders(clip, params, tokenize)
  return ProtocolScorer(clip_image=image_fn, clip_text=text_fn,
                        dino_image=vit_embedder(dino, dino_params), weights="random")
