"""Tests of persvid_jax/diffusion/guidance.py with a toy denoiser.

Values come from jitted calls (one compile per call structure, cheaper on CPU
than op-by-op dispatch); how the denoiser is called (batch sizes) is recorded
by tracing alone (``jax.eval_shape``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax.diffusion import guidance

B = 2
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((B, 2, 3, 3, 2)).astype(np.float32))
T = jnp.array([10, 500], jnp.int32)
PARAMS = jnp.float32(0.7)


def _cond(text, detail):
  """A branch's kwargs: text states [B, L, D] and detail tokens [B, N, Dd]."""
  return dict(context=jnp.full((B, 4, 8), text, jnp.float32),
              detail_tokens=jnp.full((B, 3, 8), detail, jnp.float32))


UNCOND, TEXT_ONLY, FULL = _cond(0.0, 0.0), _cond(1.0, 0.0), _cond(1.0, 1.0)


def toy(params, x_t, t, *, context, detail_tokens, cond_video=None, calls=None):
  """Depends on x, t, text and detail (nonlinearly in the detail, so branches
  cannot collude); appends its batch size to ``calls`` when given."""
  if calls is not None:
    calls.append(x_t.shape[0])
  bcast = lambda v: v.reshape((-1,) + (1,) * (x_t.ndim - 1))  # noqa: E731
  out = params * x_t + bcast(t / 1000.0) + bcast(jnp.mean(context, axis=(1, 2)))
  out = out + bcast(jnp.sin(3.0 * jnp.mean(detail_tokens, axis=(1, 2))))
  if cond_video is not None:
    out = out + 0.5 * cond_video
  return out


GUIDED = {batched: guidance.guided_denoise_fn(toy, batched=batched) for batched in (True, False)}


@functools.partial(jax.jit, static_argnames="batched")
def _run(text_scale, detail_scale, shared, batched=True):
  return GUIDED[batched](PARAMS, X, T, uncond=UNCOND, text_only=TEXT_ONLY, cond=FULL,
                         text_scale=text_scale, detail_scale=detail_scale, **shared)


def _guided(text_scale, detail_scale, batched=True, **shared):
  return np.asarray(_run(text_scale, detail_scale, shared, batched=batched))


def _calls(text_scale, detail_scale, batched=True, **shared):
  """Batch sizes of the denoiser calls of one guided evaluation."""
  calls = []
  fn = guidance.guided_denoise_fn(functools.partial(toy, calls=calls), batched=batched)
  jax.eval_shape(lambda: fn(PARAMS, X, T, uncond=UNCOND, text_only=TEXT_ONLY, cond=FULL,
                            text_scale=text_scale, detail_scale=detail_scale, **shared))
  return calls


@jax.jit
def _branch(cond):
  return toy(PARAMS, X, T, **cond)


@pytest.mark.parametrize("batched", [True, False])
def test_special_scales(batched):
  e_u, e_t, e_f = (np.asarray(_branch(c)) for c in (UNCOND, TEXT_ONLY, FULL))
  assert _calls(1.0, 1.0, batched) == ([3 * B] if batched else [B] * 3)   # ONE call on 3B
  np.testing.assert_allclose(_guided(1.0, 1.0, batched), e_f, atol=1e-6)   # s = 1: conditional
  np.testing.assert_allclose(_guided(0.0, 0.0, batched), e_u, atol=1e-6)   # s = 0: uncond
  np.testing.assert_allclose(_guided(1.0, 0.0, batched), e_t, atol=1e-6)   # text only
  np.testing.assert_allclose(_guided(0.0, 1.0, batched), e_u + e_f - e_t, atol=1e-6)
  np.testing.assert_allclose(_guided(7.5, 2.0, batched),
                             e_u + 7.5 * (e_t - e_u) + 2.0 * (e_f - e_t), atol=1e-5)


def test_detail_scale_none_is_plain_cfg_with_two_branches():
  e_u, e_f = np.asarray(_branch(UNCOND)), np.asarray(_branch(FULL))
  assert _calls(4.0, None) == [2 * B]
  assert _calls(4.0, None, batched=False) == [B, B]
  out = _guided(4.0, None)
  np.testing.assert_allclose(out, e_u + 4.0 * (e_f - e_u), atol=1e-5)
  # ... which is what the three-branch composition gives at s_detail = s_text.
  np.testing.assert_allclose(out, _guided(4.0, 4.0), atol=1e-5)
  np.testing.assert_allclose(guidance.combine(e_u, None, e_f, 4.0), out, atol=1e-5)
  # No text_only condition is needed then.
  out2 = GUIDED[True](PARAMS, X, T, uncond=UNCOND, cond=FULL, text_scale=4.0)
  np.testing.assert_allclose(out2, out, atol=1e-5)


def test_per_example_scales_and_shared_inputs():
  video = jnp.asarray(RNG.standard_normal(X.shape).astype(np.float32))
  scales = jnp.array([1.0, 0.0])
  assert _calls(scales, scales, cond_video=video) == [3 * B]   # the shared video is tiled in
  out = _guided(scales, scales, cond_video=video)
  np.testing.assert_allclose(out[0], np.asarray(toy(PARAMS, X, T, **FULL, cond_video=video))[0],
                             atol=1e-6)
  np.testing.assert_allclose(out[1], np.asarray(toy(PARAMS, X, T, **UNCOND,
                                                    cond_video=video))[1], atol=1e-6)


def test_errors():
  fn = GUIDED[True]
  with pytest.raises(ValueError, match="needs the text_only"):
    fn(1.0, X, T, uncond=UNCOND, cond=FULL, text_scale=1.0, detail_scale=1.0)
  with pytest.raises(ValueError, match="same structure"):
    fn(1.0, X, T, uncond=dict(context=UNCOND["context"]), cond=FULL, text_scale=1.0)
  with pytest.raises(ValueError, match="both per branch and shared"):
    fn(1.0, X, T, uncond=UNCOND, cond=FULL, text_scale=1.0, context=FULL["context"])


def _cached_toy(params, x_t, t, *, context, detail_tokens, kv_cache=None):
  """``toy`` whose text and detail terms come from ``kv_cache`` when given (as a
  network's cross-attention keys and values would)."""
  if kv_cache is not None:
    context, detail_tokens = kv_cache["context"], kv_cache["detail_tokens"]
  return toy(params, x_t, t, context=context, detail_tokens=detail_tokens)


def test_kv_cache_lines_up_with_the_batched_branches():
  """A cache filled from ``stack_branches`` gives the guided output at every step,
  whatever the per-step conditions then hold."""
  fn = guidance.guided_denoise_fn(_cached_toy)
  _, _, kwargs = guidance.stack_branches(X, T, uncond=UNCOND, text_only=TEXT_ONLY, cond=FULL,
                                         detail_scale=2.0)
  cache = dict(context=kwargs["context"], detail_tokens=kwargs["detail_tokens"])
  want = fn(PARAMS, X, T, uncond=UNCOND, text_only=TEXT_ONLY, cond=FULL, text_scale=3.0,
            detail_scale=2.0)
  junk = _cond(5.0, -4.0)
  got = fn(PARAMS, X, T, uncond=junk, text_only=junk, cond=junk, text_scale=3.0,
           detail_scale=2.0, kv_cache=cache)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  with pytest.raises(ValueError, match="batched=True"):
    guidance.guided_denoise_fn(_cached_toy, batched=False)(
        PARAMS, X, T, uncond=UNCOND, cond=FULL, text_scale=3.0, kv_cache=cache)
