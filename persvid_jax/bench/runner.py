"""A benchmark run (ours and the peer, row by row) and its table."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax

from persvid_jax import records, xla_options
from persvid_jax.bench import ours
from persvid_jax.bench.attention import attention_ab, attention_markdown
from persvid_jax.bench.core import (PEER_WORKS, REFERENCE, REFERENCE_SHAPES, WORKS, BenchError, Row,
                                    Shapes, fmt, fmt_bytes, fmt_flops, latent_side, peak_tflops_of,
                                    row_shapes)
from persvid_jax.bench.flops import ours_flops
from persvid_jax.bench.peer import Peer, peer_compile_default
from persvid_jax.models import attention


def run(config, works: Sequence[str], shapes: Shapes, *, steps: int = 10, peer: bool = False,
        peer_compile: bool | None = None, peak_tflops: float | None = None,
        sample_steps: int = 25, sr_steps: int = 10, log: Callable[[str], None] = print,
        on_row: Callable[[dict], None] | None = None) -> dict:
  """Runs the works, smallest first, each row our side then the peer's (ours first:
  a time limit that cuts a row leaves our number, the one being worked on).

  A row that fails (out of memory, a torch.compile error) records the error and
  the run goes on. ``on_row(result)`` gets the result so far after every row
  (to save partial results of a run a time limit may cut).

  Returns:
    ``{device, device_kind, platform, peak_tflops, config, dtype, attention,
    group_norm, shapes, steps, peer, peer_h200_reference, rows: [Row fields + ratio,
    tflops_per_s, mfu]}``; ``attention``: the config's ``attention_impl`` and
    whether cuDNN's fused attention can run here (what ``'auto'`` then picks for
    bf16 rows); ``group_norm``: the config's ``norm_impl`` and the GroupNorm
    kernels that run here (``'xla'`` or ``'pallas'``).
  """
  if steps < 1:
    raise BenchError(f"--steps must be >= 1, got {steps}")
  if sample_steps < 1 or sr_steps < 1:
    raise BenchError(f"--sample-steps and --sr-steps must be >= 1, got {sample_steps}, "
                     f"{sr_steps}")
  device = jax.local_devices()[0]
  kind = device.device_kind
  peak = peak_tflops if peak_tflops is not None else peak_tflops_of(kind)
  labels = row_shapes(shapes)
  rows = {w: Row(work=w, shape=labels.get(w, "")) for w in WORKS
          if w in works and w != "attention"}
  reference = None
  if dataclasses.asdict(shapes) == REFERENCE_SHAPES:
    reference = REFERENCE["peer_h200"]
  result = dict(device=str(device), device_kind=kind, platform=device.platform,
                peak_tflops=peak, config=config.get("name", "?"), dtype=str(config.dtype),
                attention=dict(implementation=config.get("attention_impl"),
                               cudnn_available=attention.cudnn_available()),
                group_norm=dict(implementation=config.get("norm_impl"),
                                runs=attention.resolve_group_norm(config.get("norm_impl"))),
                shapes=dataclasses.asdict(shapes), steps=steps, jax=jax.__version__,
                xla=xla_options.describe(), git=records.git_state(),
                peer=None, peer_h200_reference=reference, rows=[])

  def publish():
    result["rows"] = [
        dict(dataclasses.asdict(r), ratio=r.ratio(), tflops_per_s=r.tflops_per_s(),
             mfu=(r.tflops_per_s() / peak if peak and r.tflops_per_s() else None))
        for r in rows.values()]
    if on_row is not None:
      on_row(result)

  p, do_compile, reason = None, False, None
  if peer and any(w in PEER_WORKS for w in works):
    import diffusers
    import torch
    auto, reason = peer_compile_default()
    do_compile = auto if peer_compile is None else peer_compile
    log("peer: building diffusers' UNet3DConditionModel ...")
    p = Peer(config, shapes, steps)
    result["peer"] = dict(torch=torch.__version__, diffusers=diffusers.__version__,
                          device=str(p.device), dtype=p.dtype_note,
                          params=sum(x.numel() for x in p.model.parameters()))

  params = None
  for w in ("denoise256", "denoise512", "train", "concept", "cascade"):
    if w not in works:
      continue
    r = rows[w]
    size = latent_side(shapes, w)
    log(f"ours: {w} ...")
    try:
      if w in ("denoise256", "denoise512"):
        got, params = ours.ours_denoise(config, shapes, size, steps, params)
      elif w == "train":
        params = None   # the train state holds its own params
        got = ours.ours_train(config, shapes, steps)
      elif w == "cascade":
        got = ours.ours_cascade(config, shapes, steps, sample_steps, sr_steps)
        r.shape = (f"{got.extra['base']} x{sample_steps} (3-branch CFG) + "
                   f"{got.extra['sr']} x{sr_steps}")
      else:
        got = ours.ours_concept(config, steps)
        r.shape = f"1 photo ({got.extra['photo']})"
      for f in ("ours_ms", "compile_s", "program_bytes", "peak_mem_bytes", "extra"):
        setattr(r, f, getattr(got, f))
      if w in PEER_WORKS:
        r.flops = ours_flops(config, shapes, w)
    except Exception as e:     # noqa: BLE001
      r.extra = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
      params = None
    publish()
    if p is not None and w in PEER_WORKS:
      log(f"peer: {w} ...")
      try:
        got = p.train() if w == "train" else p.denoise(size, do_compile)
        for f in ("peer_eager_ms", "peer_compile_ms", "peer_flops", "peer_peak_mem_bytes",
                  "peer_compile_s"):
          setattr(r, f, getattr(got, f))
        r.peer_note = got.peer_note or ("train step: eager only" if w == "train" else
                                        None if do_compile else reason)
      except Exception as e:   # noqa: BLE001 -- a failed row must not lose the others
        r.peer_note = f"peer failed: {type(e).__name__}: {str(e)[:200]}"
      p.release(keep_bf16=w == "denoise256" and "denoise512" in works)
    if w in ("cascade", "concept"):
      r.peer_note = "no peer (our pipeline only)"
    publish()
  if p is not None:
    p.close()
  if "attention" in works:
    log("attention alone: xla vs cudnn ...")
    result["attention_ab"] = attention_ab(config, shapes, steps)
  publish()
  return result


def markdown(result: dict) -> str:
  """The ratio table (markdown) with its notes."""
  ref = result.get("peer_h200_reference") or {}
  head = ("| work | shape | ours ms | peer eager ms | peer compile ms | ratio | FLOPs | "
          "TFLOP/s | MFU | peak mem | compile s | peer H200 ref ms |")
  att = result.get("attention") or {}
  lines = [f"Device: {result['device_kind']} ({result['platform']}), config "
           f"`{result['config']}` ({result['dtype']}), attention "
           f"`{att.get('implementation')}` (cuDNN fused attention "
           f"{'available' if att.get('cudnn_available') else 'not available'}), median of "
           f"{result['steps']} calls; peak {fmt(result['peak_tflops'], '.0f', 'n/a')} TFLOP/s.",
           "",
           head, "|" + "---|" * (head.count("|") - 1)]
  notes = []
  for r in result["rows"]:
    mfu = r["mfu"]
    ref_row = ref.get(r["work"])
    ref_cell = "—" if not ref_row else " / ".join(
        fmt(v, ".1f") for v in (ref_row["eager_ms"], ref_row["compile_ms"]))
    lines.append(
        f"| {r['work']} | {r['shape']} | {fmt(r['ours_ms'], '.2f')} | "
        f"{fmt(r['peer_eager_ms'], '.2f')} | {fmt(r['peer_compile_ms'], '.2f')} | "
        f"{fmt(r['ratio'], '.2f')} | {fmt_flops(r['flops'])} | "
        f"{fmt(r['tflops_per_s'], '.3g')} | "
        f"{'n/a' if mfu is None else format(100 * mfu, '.1f') + ' %'} | "
        f"{fmt_bytes(r['peak_mem_bytes'])} | "
        f"{fmt(r['compile_s'], '.1f')} | {ref_cell} |")
    if r.get("peer_flops"):
      agree = (f" (ours/peer {r['flops'] / r['peer_flops']:.2f})" if r.get("flops") else "")
      notes.append(f"- {r['work']}: peer FLOPs {fmt_flops(r['peer_flops'])} "
                   f"(torch FlopCounterMode){agree}.")
    if r.get("peer_note"):
      notes.append(f"- {r['work']}: {r['peer_note']}.")
    extra = r.get("extra") or {}
    if extra.get("error"):
      notes.append(f"- {r['work']}: ours failed: {extra['error']}")
    if "trace_s" in extra:
      notes.append(f"- {r['work']}: compile s = tracing {extra['trace_s']:.1f} + lowering "
                   f"{extra['lower_s']:.1f} + XLA {extra['xla_s']:.1f}"
                   + (" (from the persistent compilation cache)" if extra["xla_from_cache"]
                      else "") + ".")
  lines += ["", "ratio = best peer ms / ours ms (> 1: ours is faster). FLOPs: counted "
            "from our lowered program, attention as matmuls (as --count). peak mem: the device's "
            "high-water mark after the row "
            "(n/a on CPU). compile s: ours, AOT lower + compile (cascade / concept: first "
            "call minus a warm call). peer H200 ref ms: the peer's eager / torch.compile "
            "times measured on an H200 (torch 2.11, diffusers 0.42.1, bf16 autocast; "
            "assets/bench_reference.json), shown at those shapes only; not measured by "
            "this run."] + notes
  if not result["rows"]:    # --which attention alone
    lines = lines[:1]
  if result.get("attention_ab"):
    lines += ["", attention_markdown(result["attention_ab"])]
  return "\n".join(lines)
