"""Classifier-free guidance with separate text and detail scales.

Three denoiser evaluations of the same ``x_t``:

    e_u     unconditional: null text + null detail tokens
    e_t     text only:     text      + null detail tokens
    e_f     full:          text      + detail tokens

composed as

    e = e_u + s_text * (e_t - e_u) + s_detail * (e_f - e_t).

``e_t - e_u`` is the direction the prompt adds; ``e_f - e_t`` the direction the
subject's detail tokens add *given* the prompt (the decoupled detail attention
is the only difference between the two). So each scale controls one
condition: ``s_detail`` trades subject fidelity against prompt adherence
(too high copies the reference), ``s_text`` is the usual CFG scale.

Special cases: ``s_text = s_detail = s`` is plain CFG on the joint condition,
``e_u + s (e_f - e_u)`` (the ``e_t`` terms cancel), which is why
``detail_scale=None`` means exactly that and evaluates only two branches;
``s_text = s_detail = 1`` is the conditional ``e_f``; ``0, 0`` is ``e_u``;
``s_detail = 0`` ignores the detail tokens (CFG on text alone).

Predictions of any parameterisation (eps, v, x0) combine the same way: they
are affine in each other for a fixed ``x_t`` with coefficients summing to one
across the branches, so guiding v is guiding eps.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
DenoiseFn = Callable[..., Array]


def _scale(s: Array | float, like: Array) -> Array:
  """A [] or [B] scale shaped to broadcast over ``like [B, ...]``."""
  s = jnp.asarray(s, jnp.float32)
  return s.reshape(s.shape + (1,) * (like.ndim - s.ndim))


def combine(e_uncond: Array, e_text: Array | None, e_full: Array, text_scale: Array | float,
            detail_scale: Array | float | None = None) -> Array:
  """``e_u + s_text (e_t - e_u) + s_detail (e_f - e_t)`` ``[B, ...]`` float32.

  ``detail_scale=None`` (then ``e_text`` is unused and may be None):
  ``e_u + s_text (e_f - e_u)``, the same as ``detail_scale = text_scale``.
  Scales are scalars or per-example ``[B]``.
  """
  e_u, e_f = jnp.asarray(e_uncond, jnp.float32), jnp.asarray(e_full, jnp.float32)
  if detail_scale is None:
    return e_u + _scale(text_scale, e_u) * (e_f - e_u)
  e_t = jnp.asarray(e_text, jnp.float32)
  return e_u + _scale(text_scale, e_u) * (e_t - e_u) + _scale(detail_scale, e_u) * (e_f - e_t)


def _stack_batch(branches: Sequence[Mapping[str, Any]], batch: int) -> dict[str, Any]:
  """Concatenates cond dicts of identical structure on the batch axis.

  Every leaf is ``[B, ...]`` or a scalar (broadcast to ``[B]`` first: e.g. a
  shared ``noise_level`` or ``detail_scale``), so the stacked leaves are
  ``[k * B, ...]``.
  """
  structs = [jax.tree.structure(dict(c)) for c in branches]
  if any(s != structs[0] for s in structs[1:]):
    raise ValueError(
        "guidance: the conditions of the branches must have the same structure to be "
        "evaluated in one batched call (pass null text states / the learned null detail "
        f"tokens rather than omitting them, or use batched=False); got {structs}")

  def cat(*leaves):
    leaves = [jnp.asarray(v) for v in leaves]
    leaves = [jnp.broadcast_to(v, (batch,)) if v.ndim == 0 else v for v in leaves]
    for v in leaves:
      if v.shape[0] != batch:
        raise ValueError(f"guidance: condition leaf of shape {v.shape} does not have the "
                         f"batch size {batch} on its first axis")
    return jnp.concatenate(leaves, axis=0)

  return jax.tree.map(cat, *[dict(c) for c in branches])


def _branches(uncond, cond, text_only, detail_scale, shared) -> list[dict[str, Any]]:
  """The branches' kwargs, ``[uncond, text_only, cond]`` or ``[uncond, cond]``."""
  if detail_scale is not None and text_only is None:
    raise ValueError("guidance: a detail_scale needs the text_only condition "
                     "(text + null detail tokens)")
  branches = [uncond, text_only, cond] if detail_scale is not None else [uncond, cond]
  for c in branches:
    clash = set(c) & set(shared)
    if clash:
      raise ValueError(f"guidance: {sorted(clash)} given both per branch and shared")
  return [{**c, **shared} for c in branches]


def stack_branches(x_t: Array, t: Array, *, uncond, cond, text_only=None, detail_scale=None,
                   **shared) -> tuple[Array, Array, dict[str, Any]]:
  """The one batched call of ``guided``: ``(x [k*B, ...], t [k*B], kwargs)``, the
  branches on the batch axis (branch-major). Also what a cross-attention cache
  (``stack.kv_cache_fn``) is filled from, so that it lines up with the call."""
  b = x_t.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t), (b,))
  branches = _branches(uncond, cond, text_only, detail_scale, shared)
  k = len(branches)
  return (jnp.concatenate([x_t] * k, axis=0), jnp.concatenate([t] * k, axis=0),
          _stack_batch(branches, b))


def guided_denoise_fn(denoise_fn: DenoiseFn, *, batched: bool = True) -> DenoiseFn:
  """Wraps ``denoise_fn`` into a guided denoiser with the same calling convention.

  Returns ``guided(params, x_t, t, *, uncond, cond, text_only=None, text_scale,
  detail_scale=None, **shared) -> [B, ...]`` where

    uncond:    kwargs of ``denoise_fn`` for null text + null detail,
    cond:      kwargs for text + detail (the full condition),
    text_only: kwargs for text + null detail (needed iff ``detail_scale`` is not None),
    text_scale, detail_scale: [] or [B] (see ``combine``),
    shared:    kwargs passed to every branch (e.g. the SR network's
               ``cond_video`` and ``noise_level``).

  All of these are call arguments (not closed over), so the guided denoiser can
  be the static ``denoise_fn`` of a compiled sampler while prompts, scales and
  conditioning videos change freely.

  ``batched=True`` evaluates the 2 or 3 branches in ONE ``denoise_fn`` call on
  a ``k * B`` batch (branch-major: ``[uncond; text_only; cond]``), which needs
  branches with the same structure and shapes; ``batched=False`` makes ``k``
  calls (lower peak memory, any structure). ``kv_cache`` (batched only): the
  cross-attentions' keys and values of that batch (``stack.kv_cache_fn`` of
  ``stack_branches``), passed on to ``denoise_fn``.
  """

  def guided(params, x_t, t, *, uncond, cond, text_only=None, text_scale,
             detail_scale=None, kv_cache=None, **shared):
    three = detail_scale is not None
    k = 3 if three else 2
    if batched:
      x, tt, kwargs = stack_branches(x_t, t, uncond=uncond, cond=cond, text_only=text_only,
                                     detail_scale=detail_scale, **shared)
      if kv_cache is not None:
        kwargs["kv_cache"] = kv_cache
      out = denoise_fn(params, x, tt, **kwargs)
      preds = jnp.split(jnp.asarray(out, jnp.float32), k, axis=0)
    else:
      if kv_cache is not None:
        raise ValueError("guidance: a kv_cache holds the batched branches; use batched=True")
      t = jnp.broadcast_to(jnp.asarray(t), (x_t.shape[0],))
      branches = _branches(uncond, cond, text_only, detail_scale, shared)
      preds = [denoise_fn(params, x_t, t, **c) for c in branches]
    if three:
      e_u, e_t, e_f = preds
    else:
      (e_u, e_f), e_t = preds, None
    return combine(e_u, e_t, e_f, text_scale, detail_scale)

  return guided
