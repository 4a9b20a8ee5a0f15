"""What the generators are conditioned on, and the space they denoise.

One module for training (``train.stages``, the loop's previews), generation
(``pipeline.generate``), building concepts (``concepts.build``) and the
denoising probe (``evaluate.probe``), so that every caller conditions the
networks the same way:

* *reference tokens*: the image encoder + mapper on the masked
  reference, ``[B, K, D]``;
* *detail tokens*: the extraction network on the reference and its
  mask, ``[B, N, Dd]`` (the learned null tokens for rows without an image);
* the *concept swap*: the text encoding with the concepts'
  reference tokens in place of their placeholders (``bank.encode_prompt``);
* *detail fusion* (``config.concepts.fusion``): the stored and the
  extracted detail tokens combined; ``concat`` — side by side (``2N`` tokens;
  a row with only one source gets it twice, which is exactly attention to
  that source alone, since duplicated keys do not change a softmax-weighted
  mean); ``mean`` — their average; ``weighted`` — ``w * stored + (1 - w) *
  extracted`` with ``config.concepts.fusion_weight``;
* the *diffusion space* (``config.latent.enabled``): pixels, or the frozen
  VAE's scaled latents, and the SR network's low-res condition in it.

Pure functions of ``(ctx, params, arrays)``, traced inside the callers' jitted
programs; ``params = {network: params}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from persvid_jax.concepts import bank as bank_lib
from persvid_jax.diffusion import cascade
from persvid_jax.models import stack as stack_lib

FUSIONS = ("concat", "mean", "weighted")

# fold_in constant of the VAE's posterior-sample keys (the training stages'
# own splits stay as they were when this stream was added).
_ENCODE_STREAM = 0x7AE


@dataclasses.dataclass(frozen=True)
class Context:
  """What conditioning closes over (static: modules, constants).

  Attributes:
    stack: the ``ModelStack``.
    config: the model config (``concepts``, ``latent``, ``diffusion``, sizes).
    placeholder_start: id of ``<c0>`` (``PromptTokenizer.placeholder_start``).
  """
  stack: stack_lib.ModelStack
  config: Any
  placeholder_start: int

  @classmethod
  def from_model(cls, model) -> "Context":
    """The context of a ``pipeline.model.Model`` (its stack, config and tokenizer)."""
    return cls(stack=model.stack, config=model.config,
               placeholder_start=model.tokenizer.placeholder_start)


# ---- the diffusion space ------------------------------------------------------


def resize_video(video: jax.Array, height: int, width: int) -> jax.Array:
  """``[B, T, H, W, C] -> [B, T, height, width, C]`` (antialiased linear)."""
  b, t, _, _, c = video.shape
  return jax.image.resize(video, (b, t, height, width, c), "linear", antialias=True)


def to_diffusion_space(ctx: Context, params, video: jax.Array,
                       rng: jax.Array | None) -> jax.Array:
  """Pixel video ``[B, T, H, W, 3]`` -> what the generators denoise.

  Pixel space: ``video`` itself. Latent space: the frozen VAE's scaled latents
  ``[B, T, H/f, W/f, C]`` of ``params['vae']``; a posterior sample drawn with
  ``rng`` if ``config.latent.sample_posterior`` (and ``rng`` is given), else the mean.
  """
  if not stack_lib.latent_enabled(ctx.config):
    return video
  if not ctx.config.latent.get("sample_posterior", True):
    rng = None
  rng = None if rng is None else jax.random.fold_in(rng, _ENCODE_STREAM)
  return stack_lib.encode_latents(ctx.stack, params[stack_lib.VAE], video, rng)


def to_pixel_space(ctx: Context, params, x: jax.Array) -> jax.Array:
  """Inverse of ``to_diffusion_space``: ``[B, T, h, w, C]`` -> pixels in [-1, 1]
  (the VAE's decoder, clipped), for previews."""
  if not stack_lib.latent_enabled(ctx.config):
    return x
  return stack_lib.decode_latents(ctx.stack, params[stack_lib.VAE], x)


def low_res_condition(ctx: Context, params, video: jax.Array, size: tuple[int, int],
                      rng: jax.Array | None) -> jax.Array:
  """The SR network's low-res input of a pixel video, before noise augmentation.

  ``video [B, T, H, W, 3]`` (SR-scale pixels) is downsampled to the base pixel
  size, brought to diffusion space (latent space: the VAE's latents of the
  downsampled video, posterior per ``to_diffusion_space`` with ``rng``) and
  upsampled per frame to ``size`` (the SR scale of the diffusion space), as
  the cascade upsamples the base network's output. Returns ``[B, T, *size, C]``.
  """
  c = ctx.config
  low = to_diffusion_space(ctx, params, resize_video(video, *stack_lib.pixel_size(c)), rng)
  return cascade.upsample_video(low, size, method=c.diffusion.resize_method,
                                clip=c.diffusion.clip_x0)


# ---- text, reference and detail tokens -----------------------------------------


def encode_text(ctx: Context, params, tokens: jax.Array) -> jax.Array:
  """Prompt ids ``[B, L]`` -> the text encoder's states ``[B, L, D]`` (no swap)."""
  context, _ = ctx.stack.text_encoder.apply({"params": params["text_encoder"]}, tokens)
  return context


def reference_tokens(ctx: Context, params, image: jax.Array, mask: jax.Array) -> jax.Array:
  """The mapped reference tokens ``[B, K, D]`` of ``image [B, R, R, 3]`` in [-1, 1].

  The encoders see the subject only (``image * mask``, ``mask [B, R, R, 1]``):
  subject recognition in the loop, in training as at inference.
  """
  stack = ctx.stack
  feats = stack.image_encoder.apply({"params": params["image_encoder"]}, image * mask)
  return stack.mapper.apply({"params": params["mapper"]}, feats)


def detail_tokens(ctx: Context, params, image: jax.Array, mask: jax.Array,
                  use: jax.Array | None = None) -> jax.Array:
  """The extractor's detail tokens ``[B, N, Dd]`` of ``image [B, R, R, 3]`` + ``mask``.

  ``use``: optional ``[B]`` bool; False rows get the learned null tokens.
  """
  return ctx.stack.extractor.apply({"params": params["extractor"]}, image, mask, use)


def null_detail_tokens(ctx: Context, params, batch: int) -> jax.Array:
  """The extractor's learned null detail tokens, ``[batch, N, Dd]``."""
  return ctx.stack.extractor.apply({"params": params["extractor"]}, batch,
                                   method="null_tokens")


def swap_concepts(ctx: Context, params, tokens: jax.Array, bank: bank_lib.ConceptBank,
                  ref_override: jax.Array, override_mask: jax.Array,
                  override_slot: jax.Array | None = None) -> jax.Array:
  """Text states ``[B, L, D]`` with the concepts' reference tokens swapped in.

  ``tokens [B, L]`` hold ``<ci>`` placeholders; the bank's tokens fill them,
  except where ``override_mask [B]`` takes ``ref_override [B, K, D]`` (for
  slot ``override_slot [B]``, or every placeholder of the row if None); see
  ``bank.encode_prompt``.
  """
  context, _ = bank_lib.encode_prompt(
      ctx.stack.text_encoder, params["text_encoder"], tokens, bank,
      swap_at=ctx.config.concepts.swap_at, placeholder_start=ctx.placeholder_start,
      ref_override=ref_override, override_mask=override_mask, override_slot=override_slot)
  return context


def personalization_conditions(ctx: Context, params, reference, reference_mask,
                               has_reference, tokens, *, use_ref, use_detail):
  """Text states with the reference's mapped tokens swapped in, and detail tokens.

  The conditions of training and of the probe: one reference per row, no
  stored concepts.

  Args:
    params: ``{network: params}`` with text/image encoders, mapper, extractor.
    reference: ``[B, R, R, 3]`` in [-1, 1]; reference_mask ``[B, R, R, 1]``.
    has_reference: ``[B]`` bool.
    tokens: ``[B, L]`` prompt ids holding ``<c0>`` (K copies).
    use_ref, use_detail: ``[B]`` bool, rows that get the mapped reference
      tokens / the extracted detail tokens (else raw placeholder / null tokens).

  Returns:
    ``(context [B, L, D], detail_tokens [B, N, Dd])``.
  """
  ref = reference_tokens(ctx, params, reference, reference_mask)          # [B, K, D]
  # The bank is empty: the reference tokens arrive per row through the
  # override (the "target image" path of inference).
  empty = bank_lib.ConceptBank.from_config(ctx.config, dtype=ref.dtype)
  context = swap_concepts(ctx, params, tokens, empty, ref, use_ref & has_reference)
  detail = detail_tokens(ctx, params, reference, reference_mask, use_detail & has_reference)
  return context, detail


def fuse_details(bank: bank_lib.ConceptBank, weights: jax.Array, extracted: jax.Array,
                 use_image: jax.Array, null: jax.Array, *, fusion: str,
                 fusion_weight: float) -> tuple[jax.Array, jax.Array]:
  """Stored, extracted, fused or null detail tokens per row (as each of the six modes asks).

  Args:
    bank: the ``ConceptBank`` (``detail_tokens [C, N, Dd]``, ``valid [C]``).
    weights: ``[B, C]`` float32, the stored concepts mixed into each row.
    extracted: ``[B, N, Dd]``, the extractor's tokens of each row's image.
    use_image: ``[B]`` bool, rows whose image's tokens are used.
    null: ``[B, N, Dd]``, the learned null tokens.
    fusion: one of ``FUSIONS``.
    fusion_weight: ``w`` of the 'weighted' fusion.

  Returns:
    ``(detail, null)``: ``[B, N', Dd]`` each, ``N' = 2N`` for 'concat' (the
    null tokens doubled to match), else ``N``.
  """
  # An empty slot has no detail tokens (its zeros are not a concept): a row
  # whose concepts are all empty gets the null tokens, as in training when
  # the reference is dropped.
  weights = weights * bank.valid[None, :].astype(jnp.float32)              # [B, C]
  has_stored = jnp.sum(weights, -1) > 0
  stored = jnp.einsum("bc,cnd->bnd", weights,
                      bank.detail_tokens.astype(jnp.float32)).astype(null.dtype)
  stored = jnp.where(has_stored[:, None, None], stored, null)
  both = (has_stored & use_image)[:, None, None]
  if fusion == "concat":
    first = jnp.where(has_stored[:, None, None], stored, extracted)
    second = jnp.where(use_image[:, None, None], extracted, stored)
    return (jnp.concatenate([first, second], axis=1),                     # [B, 2N, Dd]
            jnp.concatenate([null, null], axis=1))
  w = 0.5 if fusion == "mean" else fusion_weight
  fused = w * stored + (1.0 - w) * extracted
  return jnp.where(both, fused, jnp.where(has_stored[:, None, None], stored, extracted)), null


def generation_conditions(ctx: Context, params, bank: bank_lib.ConceptBank, inputs: dict,
                          null_ids: jax.Array, *, fusion: str, fusion_weight: float
                          ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The conditions of every generation mode from one graph.

  Args:
    params: ``{network: params}`` with text/image encoders, mapper, extractor.
    bank: the database's ``ConceptBank``.
    inputs: ``pipeline.generate.make_inputs`` as arrays: ``ids [B, L]``,
      ``image [B, R, R, 3]``, ``image_mask [B, R, R, 1]``, ``ref_from_image [B]``,
      ``override_slot [B]``, ``detail_weights [B, C]``, ``use_image_detail [B]``.
    null_ids: ``[1, L]`` ids of the empty prompt.
    fusion, fusion_weight: see ``fuse_details``.

  Returns:
    ``(context [B, L, D], null_context [B, L, D], detail [B, N', Dd],
    null_detail [B, N', Dd])``.
  """
  ids = inputs["ids"]
  b = ids.shape[0]
  image, image_mask = inputs["image"], inputs["image_mask"]
  # The concept swap: the concepts' (or the target image's) reference tokens swapped in.
  image_ref = reference_tokens(ctx, params, image, image_mask)             # [B, K, D]
  context = swap_concepts(ctx, params, ids, bank, image_ref, inputs["ref_from_image"],
                          inputs["override_slot"])
  null_context = jnp.broadcast_to(encode_text(ctx, params, null_ids), context.shape)
  use_image = inputs["use_image_detail"]
  null = null_detail_tokens(ctx, params, b)
  extracted = detail_tokens(ctx, params, image, image_mask, use_image)     # [B, N, Dd]
  detail, null = fuse_details(bank, inputs["detail_weights"], extracted, use_image, null,
                              fusion=fusion, fusion_weight=fusion_weight)
  return context, null_context, detail, null
