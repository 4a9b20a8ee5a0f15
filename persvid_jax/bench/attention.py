"""Attention alone at the generator's widest level: XLA's kernel against cuDNN's fused one."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from persvid_jax.bench.core import CFG_BATCH, Shapes, fmt, median_ms, time_calls
from persvid_jax.models import attention


def attention_cases(config, shapes: Shapes) -> list[tuple[str, int, int, int, int, int]]:
  """The attention calls of one denoise256 forward at the first (widest) level:
  ``(name, batch, q_len, kv_len, heads, head_dim)``, CFG batch 2.

  Spatial self- and cross-attention run per frame over the ``S*S`` latent
  positions; temporal attention per position over the ``T`` frames.
  """
  u = config.unet
  dh = u.head_dim
  heads = u.block_out_channels[0] // dh
  b, t, hw = CFG_BATCH, shapes.frames, shapes.size * shapes.size
  return [("spatial self", b * t, hw, hw, heads, dh),
          ("cross (text)", b * t, hw, shapes.text_len, heads, dh),
          ("temporal", b * hw, t, t, heads, dh)]


def attention_ab(config, shapes: Shapes, steps: int = 10) -> dict:
  """Times ``persvid_jax.models.attention.dot_product_attention`` per case of
  ``attention_cases`` with ``'xla'`` and, where it can run, ``'cudnn'``: forward
  and forward + backward (the train step's), in the config's compute dtype.

  Returns:
    ``{dtype, cudnn_available, rows: [{case, shape, flops, xla_ms, xla_bwd_ms,
    cudnn_ms, cudnn_bwd_ms, max_err}]}``; ``flops`` counts the two matmuls of the
    forward (``4 B H Lq Lk Dh``); ``max_err``: max |cudnn - xla| / max |xla| of the
    forward output; None where not measured.
  """
  dtype = jnp.dtype(config.dtype)
  available = attention.cudnn_available()
  rows = []
  for name, b, lq, lk, h, dh in attention_cases(config, shapes):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, lq, h * dh), dtype)
    k = jax.random.normal(kk, (b, lk, h * dh), dtype)
    v = jax.random.normal(kv, (b, lk, h * dh), dtype)
    row = dict(case=name, shape=f"{b}x{lq}x{lk}, {h}x{dh}", flops=4.0 * b * h * lq * lk * dh)
    outs = {}
    for impl in ("xla", "cudnn") if available else ("xla",):
      fwd = jax.jit(lambda q, k, v, impl=impl: attention.dot_product_attention(
          q, k, v, num_heads=h, implementation=impl))
      grad = jax.jit(jax.grad(lambda q, k, v, impl=impl: attention.dot_product_attention(
          q, k, v, num_heads=h, implementation=impl).astype(jnp.float32).sum(), (0, 1, 2)))
      try:
        outs[impl] = fwd(q, k, v)
        row[f"{impl}_ms"] = median_ms(time_calls(lambda: fwd(q, k, v), steps))
        row[f"{impl}_bwd_ms"] = median_ms(time_calls(lambda: grad(q, k, v), steps))
      except Exception as e:   # noqa: BLE001 -- report it, keep the other rows
        row[f"{impl}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if "xla" in outs and "cudnn" in outs:
      ref = jnp.abs(outs["xla"].astype(jnp.float32))
      diff = jnp.abs(outs["cudnn"].astype(jnp.float32) - outs["xla"].astype(jnp.float32))
      row["max_err"] = float(diff.max() / ref.max())
    rows.append(row)
  return dict(dtype=dtype.name, cudnn_available=available, rows=rows)


def attention_markdown(result: dict) -> str:
  """The table of ``attention_ab``."""
  notes = []
  lines = [f"Attention alone ({result['dtype']}; cuDNN fused attention "
           f"{'available' if result['cudnn_available'] else 'not available here'}):", "",
           "| case | B x Lq x Lk, heads x width | xla ms | xla TFLOP/s | cudnn ms | cudnn TFLOP/s"
           " | xla fwd+bwd ms | cudnn fwd+bwd ms | max rel err |", "|---|---|---:|---:|---:|---:|"
           "---:|---:|---:|"]
  for r in result["rows"]:
    tf = lambda ms: None if ms is None else r["flops"] / (ms * 1e-3) / 1e12
    lines.append(
        f"| {r['case']} | {r['shape']} | {fmt(r.get('xla_ms'), '.3f')} | "
        f"{fmt(tf(r.get('xla_ms')), '.3g')} | {fmt(r.get('cudnn_ms'), '.3f')} | "
        f"{fmt(tf(r.get('cudnn_ms')), '.3g')} | {fmt(r.get('xla_bwd_ms'), '.3f')} | "
        f"{fmt(r.get('cudnn_bwd_ms'), '.3f')} | {fmt(r.get('max_err'), '.2e')} |")
    notes += [f"- {r['case']}: {impl} failed: {r[f'{impl}_error']}"
              for impl in ("xla", "cudnn") if r.get(f"{impl}_error")]
  lines += ["", "Forward FLOPs 4 B H Lq Lk Dh; max rel err: max |cudnn - xla| / max |xla| of "
            "the forward output."] + notes
  return "\n".join(lines)
