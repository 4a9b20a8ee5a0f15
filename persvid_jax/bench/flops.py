"""FLOPs without a device: ours counted from the lowered program, the peer's by torch's
counter on the meta device, and what each target asks of our side."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax

from persvid_jax.bench import ours
from persvid_jax.bench.core import (PEAK_TFLOPS, REFERENCE, REFERENCE_SHAPES, Shapes, fmt,
                                    fmt_flops, latent_side, row_shapes)
from persvid_jax.bench.peer import peer_flops
from persvid_jax.models import attention


def cost_flops(program) -> float | None:
  """FLOPs from XLA's cost analysis of a ``jax.stages.Compiled`` or ``Lowered``."""
  cost = program.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def ours_flops(config, shapes: Shapes, work: str) -> float:
  """FLOPs of one call of ``work`` (train / denoise256 / denoise512 / concept: its
  encoders / sr512: the cascade's SR step) from XLA's cost
  analysis of the lowered, unoptimised program: abstract params and inputs, so
  no memory and no device (the 1.4 B-parameter generator counts in seconds on a CPU).

  Attention is traced as XLA's matmuls on every backend: a cuDNN call is opaque
  to the cost analysis, as are the cuDNN convolutions of a *compiled* GPU program
  (whose count is about 2 % of this one). This is the count every MFU uses."""
  with attention.assume_cudnn(False):
    if work == "train":
      train_step, state, batch, rng = ours.train_program(config, shapes, abstract=True)
      return cost_flops(jax.jit(train_step).lower(state, batch, rng))
    if work == "concept":
      features, params, inputs = ours.concept_program(config)
      return cost_flops(features.lower(params, *inputs))
    if work == "sr512":
      step, params, inputs = ours.sr_program(config, shapes)
      return cost_flops(jax.jit(step).lower(params, *inputs))
    denoise, params, inputs = ours.denoise_program(config, shapes, latent_side(shapes, work),
                                               abstract=True)
    return cost_flops(jax.jit(denoise).lower(params, *inputs))


def count_flops(config, shapes: Shapes, works: Sequence[str], *, peer: bool = False,
                peak_tflops: float | None = None,
                log: Callable[[str], None] = print) -> dict:
  """FLOPs of the peer-comparable works and, at the reference shapes, what each
  target (``assets/bench_reference.json``) asks of our side: the time it allows and
  the TFLOP/s and MFU that time needs with our FLOPs. Runs anywhere (abstract
  shapes only).

  Returns:
    ``{config, dtype, shapes, peak_tflops, rows: [{work, shape, flops, peer_flops,
    issue_tflop, target, target_ms, need_tflops, need_mfu}]}``; ``peak_tflops``
    defaults to the H100/H200's 989 (the target's card).
  """
  peak = peak_tflops or PEAK_TFLOPS["H200"]
  labels = row_shapes(shapes)
  at_reference = dataclasses.asdict(shapes) == REFERENCE_SHAPES
  rows = []
  for w in (w for w in ("denoise256", "denoise512", "train") if w in works):
    log(f"counting: {w} ...")
    row = dict(work=w, shape=labels[w], flops=ours_flops(config, shapes, w),
               peer_flops=peer_flops(config, shapes, w) if peer else None,
               issue_tflop=REFERENCE["peer_h200"][w]["tflop"] if at_reference else None,
               target=None, target_ms=None, need_tflops=None, need_mfu=None)
    if at_reference and row["flops"]:
      target = REFERENCE["targets"][w]
      what, target_ms = target["what"], target["ms"]
      if target.get("min_mfu"):   # the MFU floor may ask for less time than the ms target
        target_ms = min(target_ms, row["flops"] / (target["min_mfu"] * peak * 1e12) * 1e3)
      need = row["flops"] / (target_ms * 1e-3) / 1e12
      row.update(target=what, target_ms=target_ms, need_tflops=need, need_mfu=need / peak)
    rows.append(row)
  return dict(config=config.get("name", "?"), dtype=str(config.dtype),
              shapes=dataclasses.asdict(shapes), peak_tflops=peak, rows=rows)


def flops_markdown(result: dict) -> str:
  """The table of ``count_flops``."""
  lines = [f"FLOPs per call, config `{result['config']}` ({result['dtype']}), counted "
           f"without running (ours: XLA cost analysis of the lowered program; peer: torch "
           f"FlopCounterMode on the meta device). Targets against a "
           f"{result['peak_tflops']:.0f} TFLOP/s peak.", "",
           "| work | shape | ours | peer | ours/peer | peer on an H200 | target | "
           "ours ms at most | needs TFLOP/s | needs MFU |",
           "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
  for r in result["rows"]:
    ratio = r["flops"] / r["peer_flops"] if r["flops"] and r["peer_flops"] else None
    lines.append(
        f"| {r['work']} | {r['shape']} | {fmt_flops(r['flops'])} | "
        f"{fmt_flops(r['peer_flops'])} | {fmt(ratio, '.3f')} | "
        f"{fmt(r['issue_tflop'], '.1f')}{' T' if r['issue_tflop'] else ''} | "
        f"{r['target'] or '—'} | {fmt(r['target_ms'], '.1f')} | "
        f"{fmt(r['need_tflops'], '.0f')} | "
        f"{'—' if r['need_mfu'] is None else format(100 * r['need_mfu'], '.1f') + ' %'} |")
  return "\n".join(lines)
