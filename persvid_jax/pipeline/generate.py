"""Generation in all six modes (docs/design.md) from one compiled graph.

A ``Request`` (prompt, optional image and its role) is *resolved* on the host
against the concept database into per-row switches; the device sees only
arrays of fixed shapes, so every mode, every prompt and every database
content runs the same compiled programs:

====================  ================  ===================  =======================
mode                  prompt            reference tokens     detail tokens
====================  ================  ===================  =======================
concept               ``<name>``        bank slot            stored (bank)
concept+target        ``<name>`` + img  image -> mapper      fused(stored, image)
target                ``<image>`` + img image -> mapper      image
concept+scene         ``<name>`` + img  bank slot            image (whole)
text                  plain             --                   learned null
text+scene            plain + img       --                   image (whole)
====================  ================  ===================  =======================

Per-row inputs (``GenerationInputs``): the token ids with ``<ci>``
placeholders (``<image>`` is the reserved slot ``C - 1``), the reference
image + mask, ``ref_from_image`` / ``override_slot`` (which slot the image's
mapped tokens replace), ``detail_weights [B, C]`` (the stored detail tokens
mixed in: the concepts of the prompt, equally) and ``use_image_detail``.

The conditions themselves (reference and detail tokens, the concept swap,
detail fusion) are ``concepts.conditioning``'s, shared with training.

Sampling: classifier-free guidance with separate text and detail scales on
the base network (three branches in one batched call), then the SR network on
the upsampled, noise-augmented base video (the two-scale cascade), conditioned on the same
semantic feature. A latent-space model samples both scales as VAE latents
(``config.video``) and decodes them per frame at the end (``Generator._pixels``):
outputs are pixels either way.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from persvid_jax.concepts import bank as bank_lib
from persvid_jax.concepts import build, conditioning
from persvid_jax.concepts.tokens import placeholder
from persvid_jax.diffusion import cascade as cascade_lib
from persvid_jax.diffusion import guidance, samplers, schedules
from persvid_jax.models import stack as stack_lib
from persvid_jax.models.stack import base_denoise_fn, sr_denoise_fn

MODES = ("concept", "concept+target", "target", "concept+scene", "text", "text+scene")
IMAGE_ROLES = ("target", "scene")
FUSIONS = conditioning.FUSIONS
# Which detail tokens reach the network (the detail-token ablations): "auto" is
# the method (per mode, fused where both exist); the others restrict it.
DETAIL_SOURCES = ("auto", "stored", "image", "off")
IMAGE_TOKEN = "image"
_NAME_RE = re.compile(r"<([^<>\s]*)>")


class GenerationError(ValueError):
  """A request that cannot be served (the message says what to change)."""


def _check_detail_source(detail_source: str) -> None:
  if detail_source not in DETAIL_SOURCES:
    raise GenerationError(f"detail source {detail_source!r}; use one of {DETAIL_SOURCES}")


@dataclasses.dataclass(frozen=True)
class Request:
  """One video to generate.

  Attributes:
    prompt: text naming concepts as ``<name>`` and the image's subject as ``<image>``.
    image: optional uint8 ``[H, W, 3]`` photo.
    image_role: 'target' (the image shows the subject) or 'scene' (a
      non-target image: scene, style).
    mask: optional float ``[H, W]`` subject mask of ``image`` (else segmented).
    mode: optional expected mode; resolution fails if the request means another.
  """
  prompt: str
  image: np.ndarray | None = None
  image_role: str = "target"
  mask: np.ndarray | None = None
  mode: str | None = None


@dataclasses.dataclass(frozen=True)
class Resolved:
  """A request resolved against a database (host side)."""
  mode: str
  prompt: str                   # as the user wrote it
  text: str                     # the prompt with <ci> placeholders
  slots: tuple                  # bank slots of the named concepts, in order
  reference: build.ReferenceImage | None


def check_brackets(prompt: str) -> None:
  """Raises ``GenerationError`` at the first ``<`` or ``>`` that is not part of a ``<name>``.

  A stray bracket is almost always a mistyped concept (``a <my_dog moving``):
  read as plain text it would silently generate in text mode, without the
  concept the user asked for.
  """
  # The <name>s blanked out (same length: positions stay the prompt's).
  rest = _NAME_RE.sub(lambda m: " " * len(m.group(0)), prompt)
  i = next((k for k, ch in enumerate(rest) if ch in "<>"), None)
  if i is None:
    return
  if rest[i] == "<":
    fragment = prompt[i:i + 24] + ("..." if len(prompt) > i + 24 else "")
    raise GenerationError(f"unclosed '<' at character {i + 1} of the prompt: {fragment!r}; "
                          "write a concept as <name> (no spaces inside), or remove the '<'")
  fragment = ("..." if i > 23 else "") + prompt[max(0, i - 23):i + 1]
  raise GenerationError(f"unmatched '>' at character {i + 1} of the prompt: {fragment!r}; "
                        "write a concept as <name>, or remove the '>'")


def concept_names(prompt: str) -> list[str]:
  """The ``<name>``s of a prompt in order (``<image>`` included), brackets checked.

  Raises:
    GenerationError: a ``<`` or ``>`` outside a ``<name>`` (``check_brackets``).
  """
  check_brackets(prompt)
  return _NAME_RE.findall(prompt)


def request_mode(prompt: str, concepts: dict[str, int], *, has_image: bool,
                 image_role: str = "target") -> tuple[str, tuple]:
  """The mode (of the six) a prompt (+ optional image) asks for, without any work.

  The UI shows it live while the user types; ``resolve`` uses it too.

  Args:
    prompt: text naming concepts as ``<name>`` and the image's subject as ``<image>``.
    concepts: ``{name: slot}`` of the database.
    has_image: whether an image comes with the prompt.
    image_role: 'target' or 'scene'.

  Returns:
    ``(mode, slots)``: one of ``MODES`` and the bank slots of the named concepts.

  Raises:
    GenerationError: unknown concept, a stray ``<`` or ``>``, ``<image>`` without
      an image, or an image role that does not fit the prompt.
  """
  if image_role not in IMAGE_ROLES:
    raise GenerationError(f"image role {image_role!r}; use one of {IMAGE_ROLES}")
  names = concept_names(prompt)
  unknown = [n for n in names if n != IMAGE_TOKEN and n not in concepts]
  if unknown:
    known = ", ".join(f"<{n}>" for n in concepts) or "none (the database is empty)"
    raise GenerationError(f"unknown concept <{unknown[0]}> in the prompt (known: {known}); "
                          "add it with 'python -m launch.concepts add'")
  has_image_token = IMAGE_TOKEN in names
  slots = tuple(dict.fromkeys(concepts[n] for n in names if n != IMAGE_TOKEN))
  if has_image_token and not has_image:
    raise GenerationError("the prompt names <image> but no image was given; pass --image")
  if has_image_token and image_role != "target":
    raise GenerationError("<image> names the subject of a target image; use --image-role "
                          "target (or name a stored concept instead)")
  if has_image_token and slots:
    raise GenerationError("a prompt names either stored concepts or <image>, not both")
  if has_image_token:
    return "target", slots
  if slots:
    return ("concept" if not has_image else
            "concept+target" if image_role == "target" else "concept+scene"), slots
  return ("text" if not has_image else "text+scene"), slots


def resolve(request: Request, concepts: dict[str, int], image_slot: int, config
            ) -> Resolved:
  """Maps a request to its mode and placeholder prompt.

  Args:
    request: the request.
    concepts: ``{name: slot}`` of the database.
    image_slot: the bank slot reserved for ``<image>``.
    config: the model config (reference size, subject fill).

  Raises:
    GenerationError: unknown concept, ``<image>`` without an image, an image
      role that does not fit the prompt, or a ``request.mode`` that disagrees.
  """
  if request.image_role not in IMAGE_ROLES:
    raise GenerationError(f"image role {request.image_role!r}; use one of {IMAGE_ROLES}")
  if request.mode is not None and request.mode not in MODES:
    raise GenerationError(f"mode {request.mode!r}; use one of {MODES}")
  image = request.image
  mode, slots = request_mode(request.prompt, concepts, has_image=image is not None,
                             image_role=request.image_role)
  if request.mode is not None and request.mode != mode:
    need = {"concept": "a prompt naming a stored <concept>, no image",
            "concept+target": "a prompt naming a stored <concept> and --image",
            "target": "a prompt naming <image> and --image",
            "concept+scene": "a prompt naming a stored <concept> and --image with "
                             "--image-role scene",
            "text": "a prompt without <concepts>, no image",
            "text+scene": "a prompt without <concepts> and --image"}[request.mode]
    raise GenerationError(f"mode {request.mode!r} needs {need}; this request is {mode!r}")

  reference = None
  if image is not None:
    if mode in ("concept+target", "target"):
      reference = build.subject_reference(image, config, request.mask)
    else:
      reference = build.scene_reference(image, config)
  text = _NAME_RE.sub(lambda m: placeholder(
      image_slot if m.group(1) == IMAGE_TOKEN else concepts[m.group(1)]), request.prompt)
  return Resolved(mode=mode, prompt=request.prompt, text=text, slots=slots,
                  reference=reference)


def make_inputs(resolved: Sequence[Resolved], tokenizer, config, image_slot: int,
                detail_source: str = "auto") -> dict[str, np.ndarray]:
  """Host arrays of a batch of resolved requests (``B = len(resolved)``).

  ``detail_source`` (``DETAIL_SOURCES``) restricts the detail tokens: 'stored'
  drops the image's, 'image' drops the database's, 'off' drops both (the
  learned null tokens); the reference tokens are untouched.

  Returns ``{ids [B,L] int32, image [B,R,R,3], image_mask [B,R,R,1] float32,
  ref_from_image [B] bool, override_slot [B] int32, detail_weights [B,C]
  float32, use_image_detail [B] bool}``.

  Raises:
    GenerationError: a prompt too long for the text encoder with its
      concepts expanded (e.g. more concepts than fit).
  """
  b, r = len(resolved), build.reference_size(config)
  capacity = config.concepts.capacity
  for x in resolved:
    try:
      tokenizer.encode([x.text])
    except ValueError:
      raise GenerationError(
          f"the prompt {x.prompt!r} is too long for the text encoder ({tokenizer.max_length} "
          f"tokens, each concept taking {tokenizer.ref_tokens}); use fewer concepts or "
          "words") from None
  ids = tokenizer.encode([x.text for x in resolved])
  out = dict(ids=ids,
             image=np.zeros((b, r, r, 3), np.float32),
             image_mask=np.zeros((b, r, r, 1), np.float32),
             ref_from_image=np.zeros((b,), bool),
             override_slot=np.zeros((b,), np.int32),
             detail_weights=np.zeros((b, capacity), np.float32),
             use_image_detail=np.zeros((b,), bool))
  for i, x in enumerate(resolved):
    if x.reference is not None:
      out["image"][i] = x.reference.image
      out["image_mask"][i] = x.reference.mask
      out["use_image_detail"][i] = True
    if x.mode in ("concept+target", "target"):
      out["ref_from_image"][i] = True
      out["override_slot"][i] = image_slot if x.mode == "target" else x.slots[0]
    if x.mode in ("concept", "concept+target"):
      out["detail_weights"][i, list(x.slots)] = 1.0 / len(x.slots)
  if detail_source in ("image", "off"):
    out["detail_weights"][:] = 0.0
  if detail_source in ("stored", "off"):
    out["use_image_detail"][:] = False
  return out


@dataclasses.dataclass
class GenerationOutput:
  """What ``Generator.__call__`` returns (numpy)."""
  video: np.ndarray        # [B, T, H', W', 3] in [-1, 1], the SR output (pixels)
  base: np.ndarray         # [B, T, H, W, 3] in [-1, 1], the base network's output (pixels)
  modes: tuple             # mode per row
  resolved: tuple          # Resolved per row


def sampler_steps(steps: int | None, sr_steps: int | None, diffusion) -> tuple[int, int]:
  """``(base steps, SR steps)``: the arguments, or where None the config's defaults.

  Args:
    steps, sr_steps: the requested steps; None (only None: 0 is not "default")
      takes ``diffusion.sample_steps`` / ``diffusion.sr_sample_steps`` (or ``steps``).
    diffusion: ``config.diffusion``.

  Raises:
    GenerationError: a requested count below 1, named.
  """
  for name, value in (("steps", steps), ("sr_steps", sr_steps)):
    if value is not None and not value >= 1:
      raise GenerationError(f"{name}={value!r}: sampler steps must be >= 1 (or None for "
                            "the model config's)")
  steps = int(diffusion.sample_steps if steps is None else steps)
  # The config's sr_sample_steps may be 0 / None on purpose: "as many as the base".
  sr_steps = int((diffusion.get("sr_sample_steps") or steps) if sr_steps is None
                 else sr_steps)
  if steps < 1 or sr_steps < 1:
    raise GenerationError(f"the model config's sampler steps are {steps} / {sr_steps}; "
                          "pass steps >= 1")
  return steps, sr_steps


class Generator:
  """Serves every mode with one compiled graph per (batch size, steps).

  Args:
    model: a ``pipeline.model.Model``.
    steps: base sampler steps (default ``config.diffusion.sample_steps``).
    sr_steps: SR sampler steps (default ``config.diffusion.sr_sample_steps``
      or ``steps``).
    text_scale, detail_scale: CFG scales (default ``config.diffusion``).
    fusion: 'concat' | 'mean' | 'weighted' (default ``config.concepts.fusion``).
    detail_source: ``DETAIL_SOURCES`` (ablations; 'auto' is the method).
    cascade: True (the method): base network, then SR. False samples the
      base network directly at the SR resolution (the no-cascade ablation:
      its 3x3 kernels tuned for small frames, run on large ones).
    kv_cache: True computes the cross-attentions' text and detail keys and
      values once per video (``stack.kv_cache_fn``); False at every step (the
      reference path: the same videos, tested).
  """

  def __init__(self, model, *, steps: int | None = None, sr_steps: int | None = None,
               text_scale: float | None = None, detail_scale: float | None = None,
               fusion: str | None = None, detail_source: str = "auto",
               cascade: bool = True, kv_cache: bool = True):
    c = model.config
    self.model = model
    self.kv_cache = bool(kv_cache)
    _check_detail_source(detail_source)
    self.detail_source = detail_source
    self.cascade = bool(cascade)
    d = c.diffusion
    self.fusion = fusion or c.concepts.get("fusion", "concat")
    if self.fusion not in FUSIONS:
      raise GenerationError(f"fusion {self.fusion!r}; use one of {FUSIONS}")
    self.fusion_weight = float(c.concepts.get("fusion_weight", 0.5))
    self.text_scale = float(d.guidance_text if text_scale is None else text_scale)
    detail = d.guidance_detail if detail_scale is None else detail_scale
    self.detail_scale = float(self.text_scale if detail is None else detail)
    steps, sr_steps = sampler_steps(steps, sr_steps, d)
    schedule = schedules.from_config(d)
    mk = lambda n: samplers.make_sampler(
        schedule, d.sampler, n, eta=d.eta, prediction=d.prediction, clip_x0=d.clip_x0,
        spacing=d.get("timestep_spacing", "trailing"))
    self.sampler, self.sr_sampler = mk(steps), mk(sr_steps)
    # One function object each, reused by every call: the samplers' compiled
    # programs are keyed on them.
    self._base_fn = guidance.guided_denoise_fn(base_denoise_fn(model.stack))
    self._sr_fn = sr_denoise_fn(model.stack)
    # The generators' kernels cast to the compute dtype once, not at each of the
    # sampler's steps (the same outputs; ``stack.inference_params``).
    self._unet_params = {n: stack_lib.inference_params(model.params[n], c.dtype)
                         for n in ("unet", "sr_unet")}
    self._null_ids = jnp.asarray(model.tokenizer.encode([""]))
    self._ctx = conditioning.Context.from_model(model)
    # The cross-attentions' keys and values: once per video, not at every step.
    self._base_cache = stack_lib.kv_cache_fn(model.stack.unet)
    self._sr_cache = stack_lib.kv_cache_fn(model.stack.sr_unet)
    self._conditions = jax.jit(self._conditions_fn)
    self._caches = jax.jit(self._caches_fn, static_argnames=("base_shape", "sr_shape"))
    self._decode = (jax.jit(lambda p, x: stack_lib.decode_latents(model.stack, p, x))
                    if model.stack.vae is not None else None)

  def _pixels(self, x) -> np.ndarray:
    """Sampled ``[B, T, h, w, C]`` -> numpy pixel video (latent space: the VAE decodes)."""
    if self._decode is None:
      return np.asarray(x)
    return np.asarray(self._decode(self.model.params[stack_lib.VAE], x))

  # ---- the device graph ------------------------------------------------------

  def _conditions_fn(self, params, bank: bank_lib.ConceptBank, inputs: dict):
    """Guidance branches for the base network and the SR context (one graph, all modes)."""
    context, null_context, detail, null = conditioning.generation_conditions(
        self._ctx, params, bank, inputs, self._null_ids, fusion=self.fusion,
        fusion_weight=self.fusion_weight)
    b = context.shape[0]
    base_cond = dict(uncond=dict(context=null_context, detail_tokens=null),
                     text_only=dict(context=context, detail_tokens=null),
                     cond=dict(context=context, detail_tokens=detail),
                     text_scale=jnp.full((b,), self.text_scale, jnp.float32),
                     detail_scale=jnp.full((b,), self.detail_scale, jnp.float32))
    return base_cond, dict(context=context)

  def _caches_fn(self, unet_params, base_cond: dict, sr_cond: dict, *,
                 base_shape: tuple[int, ...], sr_shape: tuple[int, ...] | None):
    """``base_cond``, ``sr_cond`` with their networks' cross-attention keys and
    values (``kv_cache``, ``stack.kv_cache_fn``) for videos of ``base_shape`` (and
    ``sr_shape``; None: no SR): the samplers' steps then skip those projections."""
    t = jnp.zeros((base_shape[0],), jnp.int32)   # shapes only, as the videos
    context = sr_cond["context"]
    base_cond, sr_cond = dict(base_cond), dict(sr_cond)
    x, tt, kwargs = guidance.stack_branches(
        jnp.zeros(base_shape, jnp.float32), t,
        uncond=base_cond["uncond"], cond=base_cond["cond"], text_only=base_cond["text_only"],
        detail_scale=base_cond["detail_scale"])
    base_cond["kv_cache"] = self._base_cache(unet_params["unet"], x, tt, **kwargs)
    if sr_shape is not None:
      cond_video = jnp.zeros(sr_shape[:-1] + (self.model.config.sr_unet.cond_channels,))
      sr_cond["kv_cache"] = self._sr_cache(unet_params["sr_unet"], jnp.zeros(sr_shape), t,
                                           context, cond_video=cond_video, noise_level=t)
    return base_cond, sr_cond

  # ---- the host API -------------------------------------------------------------

  def __call__(self, bank: bank_lib.ConceptBank, resolved: Sequence[Resolved], *,
               image_slot: int, seed: int = 0, progress: bool = True,
               detail_source: str | None = None, cascade: bool | None = None
               ) -> GenerationOutput:
    """Generates one video per resolved request (one batch, one seed).

    Args:
      bank: the database's bank.
      resolved: ``resolve``'d requests (all rows share the compiled graph).
      image_slot: the slot ``<image>`` maps to.
      seed: the videos are a deterministic function of it and the inputs.
      progress: tqdm bars over the sampler steps (a Python loop over one
        jitted step); False runs each scale as one ``lax.scan`` program.
      detail_source, cascade: override the constructor's for this call (the
        ablations share this generator's compiled programs).
    """
    c = self.model.config
    detail_source = self.detail_source if detail_source is None else detail_source
    _check_detail_source(detail_source)
    use_cascade = self.cascade if cascade is None else bool(cascade)
    inputs = make_inputs(resolved, self.model.tokenizer, c, image_slot, detail_source)
    params = self.model.params
    b = len(resolved)
    v = c.video
    base_shape = (b, v.frames, v.height, v.width, v.channels)
    sr_shape = (b, v.frames, v.height * v.sr_factor, v.width * v.sr_factor, v.channels)
    base_cond, sr_cond = self._conditions(params, bank, jax.tree.map(jnp.asarray, inputs))
    if self.kv_cache:
      base_cond, sr_cond = self._caches(self._unet_params, base_cond, sr_cond,
                                        base_shape=base_shape if use_cascade else sr_shape,
                                        sr_shape=sr_shape if use_cascade else None)
    if not use_cascade:
      video = samplers.sample(self._base_fn, self._unet_params["unet"], jax.random.key(seed),
                              sr_shape, sampler=self.sampler, cond=base_cond,
                              progress=progress, desc="base @ high res")
      video = self._pixels(video)
      return GenerationOutput(video=video, base=video, modes=tuple(x.mode for x in resolved),
                              resolved=tuple(resolved))
    out = cascade_lib.cascade_sample(
        self._base_fn, self._unet_params["unet"], self._sr_fn, self._unet_params["sr_unet"],
        jax.random.key(seed), (base_shape, sr_shape), base_cond, sampler=self.sampler,
        sr_sampler=self.sr_sampler, sr_cond=sr_cond, noise_aug=c.diffusion.sr_noise_aug,
        resize_method=c.diffusion.resize_method, progress=progress)
    return GenerationOutput(video=self._pixels(out.video), base=self._pixels(out.base),
                            modes=tuple(x.mode for x in resolved), resolved=tuple(resolved))
