"""Does the generator use its conditions? A denoising probe on held-out data.

Sampling metrics (``suite``) say *whether* a personalized video looks like the
subject; this probe says *why not* when it does not. For held-out synthetic
examples it noises the ground-truth video at fixed timesteps (same noise for
every case) and measures the base network's x0 error **on the subject's
pixels** (the renderer's mask) and on the background, under:

* ``matched``  -- the example's own reference (mapped tokens + detail tokens),
* ``shuffled`` -- another example's reference: if this is no worse than
  ``matched``, the network ignores the reference,
* ``ref_only`` / ``detail_only`` -- one path of the two,
* ``none``     -- raw placeholder embedding and null detail (the concept removed),
* ``words``    -- the plain caption that describes the subject in words.

``reference_gain`` = error(shuffled) - error(matched) on the subject, averaged
over the timesteps >= 500 (where the subject's identity is decided): > 0
means the reference helps. The synthetic data is the point: it has masks and
known subjects, so no learned metric sits between the model and the answer.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from persvid_jax.concepts import conditioning
from persvid_jax.data import pipeline
from persvid_jax.diffusion import schedules
from persvid_jax.models import stack as stack_lib

CASES = ("matched", "shuffled", "ref_only", "detail_only", "none", "words")
DESCRIPTIONS = {
    "matched": "own reference: mapped tokens + detail tokens",
    "shuffled": "another example's reference",
    "ref_only": "own reference tokens, null detail",
    "detail_only": "own detail tokens, raw placeholder",
    "none": "raw placeholder, null detail (concept removed)",
    "words": "plain caption naming the subject in words",
}


class ProbeError(ValueError):
  """The model's data cannot be probed (no synthetic source with masks)."""


def condition_probe(model, *, examples: int = 32,
                    timesteps: Sequence[int] = (100, 300, 500, 700, 900),
                    draws: int = 2, seed: int = 0, split: str = "test") -> dict:
  """Subject / background x0 errors of ``model``'s base network per condition.

  Args:
    model: a ``pipeline.model.Model`` whose config names a ``persvid_synthetic``
      dataset (the renderer supplies videos, masks and references).
    examples: held-out examples (one batch; >= 2, shuffling needs a partner).
    timesteps: diffusion timesteps to noise to (each < the schedule's length).
    draws: noise draws per timestep (the same draws for every case).
    seed: noise seed.
    split: the renderer split.

  Returns:
    ``{"timesteps", "examples", "draws", "space", "subject": {case: [per t]},
    "background": {case: [per t]}, "reference_gain", "detail_gain",
    "words_gain"}``: mean squared x0 errors of the base network's video
    ``[examples, T, h, w, C]`` (``config.video``), in [-1, 1] pixel units, or
    with ``space == "latent"`` in the VAE's scaled latent units, each cell
    weighted by the subject's coverage.
  """
  config = model.config.copy_and_resolve_references()
  if not str(config.data.get("name", "")).startswith("persvid_synthetic"):
    raise ProbeError(f"the probe needs a persvid_synthetic dataset (masks, references); "
                     f"this model was trained on {config.data.get('name')!r}")
  if examples < 2:
    raise ProbeError(f"examples={examples}: use at least 2")
  schedule = schedules.from_config(config.diffusion)
  n_t = int(schedule.num_timesteps)
  bad = [t for t in timesteps if not 0 <= int(t) < n_t]
  if bad:
    raise ProbeError(f"timesteps {bad} outside [0, {n_t})")
  config.data.update(dict(source="renderer", processes=0))
  tok = model.tokenizer
  batch = next(pipeline.make_dataset(config, split, batch_size=examples, process_index=0,
                                     process_count=1, seed=seed, tokenize=tok.encode))
  ctx = conditioning.Context(stack=model.stack, config=config,
                             placeholder_start=tok.placeholder_start)
  params = model.params
  latent = stack_lib.latent_enabled(config)
  # What the base network denoises: the base-size pixel video, or in latent
  # space its VAE latents (posterior mean) at config.video's size.
  pixels = conditioning.resize_video(jnp.asarray(batch["video"]), *stack_lib.pixel_size(config))
  video = conditioning.to_diffusion_space(ctx, params, pixels, None)
  h, w = config.video.height, config.video.width
  mask = jnp.clip(conditioning.resize_video(jnp.asarray(batch["mask"]), h, w), 0.0, 1.0)
  if not latent:
    mask = (mask > 0.5).astype(jnp.float32)   # the subject's pixels
  # Latent space: each cell weighs by the subject's coverage (a cell spans
  # f x f pixels, which a small subject rarely fills half of).
  frames = jnp.asarray(batch["frame_mask"], jnp.float32)[:, :, None, None, None]
  subject_w, background_w = mask * frames, (1.0 - mask) * frames
  channels = video.shape[-1]
  denoise = stack_lib.base_denoise_fn(model.stack)
  prediction = config.diffusion.prediction

  @jax.jit
  def errors(params, tokens, ref, ref_mask, use_ref, use_detail, t, noise):
    # params as an argument, not a closure: a large model is not baked into
    # the program as constants.
    has = jnp.ones((examples,), bool)
    context, detail = conditioning.personalization_conditions(
        ctx, params, ref, ref_mask, has, tokens, use_ref=use_ref, use_detail=use_detail)
    x_t = schedules.q_sample(schedule, video, t, noise)
    out = denoise(params["unet"], x_t, t, context=context, detail_tokens=detail)
    x0 = schedules.predict_x0(schedule, x_t, t, out, prediction)
    sq = jnp.square(x0 - video)
    return (jnp.sum(sq * subject_w) / jnp.maximum(channels * jnp.sum(subject_w), 1e-6),
            jnp.sum(sq * background_w) / jnp.maximum(channels * jnp.sum(background_w), 1e-6))

  placeholder = jnp.asarray(batch["placeholder_caption_tokens"])
  words = jnp.asarray(batch["caption_tokens"])
  ref, ref_mask = jnp.asarray(batch["reference"]), jnp.asarray(batch["reference_mask"])
  other = np.roll(np.arange(examples), 1)    # each example gets its neighbour's reference
  yes, no = jnp.ones((examples,), bool), jnp.zeros((examples,), bool)
  args = {
      "matched": (placeholder, ref, ref_mask, yes, yes),
      "shuffled": (placeholder, ref[other], ref_mask[other], yes, yes),
      "ref_only": (placeholder, ref, ref_mask, yes, no),
      "detail_only": (placeholder, ref, ref_mask, no, yes),
      "none": (placeholder, ref, ref_mask, no, no),
      "words": (words, ref, ref_mask, no, no),
  }
  result = {"timesteps": [int(t) for t in timesteps], "examples": examples, "draws": draws,
            "space": "latent" if latent else "pixel", "subject": {}, "background": {}}
  for case in CASES:
    subj, back = [], []
    for t in timesteps:
      s_t, b_t = [], []
      for d in range(draws):
        noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1000 * d + int(t)),
                                  video.shape, jnp.float32)
        s, b = errors(params, *args[case], jnp.full((examples,), int(t), jnp.int32), noise)
        s_t.append(float(s))
        b_t.append(float(b))
      subj.append(float(np.mean(s_t)))
      back.append(float(np.mean(b_t)))
    result["subject"][case], result["background"][case] = subj, back

  late = [i for i, t in enumerate(timesteps) if t >= 500] or list(range(len(timesteps)))
  mean_late = lambda case: float(np.mean([result["subject"][case][i] for i in late]))
  result["reference_gain"] = mean_late("shuffled") - mean_late("matched")
  result["detail_gain"] = mean_late("ref_only") - mean_late("matched")
  result["words_gain"] = mean_late("none") - mean_late("words")
  return result


def markdown(result: dict) -> str:
  """The probe's table: subject (background) x0 MSE per case and timestep."""
  ts = result["timesteps"]
  lines = [f"Denoising probe: {result['examples']} held-out examples x {result['draws']} "
           f"noise draws per timestep; x0 MSE on subject "
           f"{'latent cells (VAE latent units)' if result.get('space') == 'latent' else 'pixels'}"
           f" (background in brackets).",
           "", "| condition | " + " | ".join(f"t={t}" for t in ts) + " | what |",
           "|---|" + "---|" * (len(ts) + 1)]
  for case in CASES:
    cells = [f"{s:.3f} ({b:.3f})" for s, b in zip(result["subject"][case],
                                                   result["background"][case])]
    lines.append(f"| {case} | " + " | ".join(cells) + f" | {DESCRIPTIONS[case]} |")
  lines += ["", f"reference gain (shuffled - matched, subject, t >= 500): "
                f"{result['reference_gain']:+.4f}; detail gain (ref only - matched): "
                f"{result['detail_gain']:+.4f}; words gain (none - words): "
                f"{result['words_gain']:+.4f}. Positive = the condition helps."]
  return "\n".join(lines) + "\n"
