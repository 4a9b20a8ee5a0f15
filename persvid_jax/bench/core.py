"""What every part of the benchmark shares: the works, their shapes, a row, timing, formats."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
import time
from typing import Any, Callable, Sequence

import jax


WORKS = ("train", "denoise256", "denoise512", "cascade", "concept", "attention")


PEER_WORKS = ("train", "denoise256", "denoise512")
# What --aot compiles for an absent GPU: those, adding a concept's encoders, and
# the cascade's SR step (its base step is denoise256's network).
AOT_WORKS = PEER_WORKS + ("concept", "sr512")


DEFAULT_WORKS = tuple(w for w in WORKS if w != "attention")   # --which's default


# Dense bf16 peak TFLOP/s by device kind (substring of jax's device_kind).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


# What the peer measured on one H200 at the ModelScope shapes, and our targets
# there: a data file (persvid_jax/assets/bench_reference.json), not code.
REFERENCE = json.loads((pathlib.Path(__file__).parents[1] / "assets" / "bench_reference.json")
                       .read_text())


REFERENCE_SHAPES = REFERENCE["shapes"]


TRAIN_BATCH = 4


CFG_BATCH = 2


class BenchError(ValueError):
  """Bad benchmark request (unknown work, impossible shape): a user error."""


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Shapes of the rows (see module docstring)."""
  batch: int        # B of the train step
  frames: int       # T
  size: int         # S, the latent side of the base scale ('256 px'); '512 px' is 2S
  text_len: int     # L
  channels: int     # C, latent channels
  text_width: int   # D, text state width


def default_shapes(config, *, batch: int | None = None, frames: int | None = None,
                   size: int | None = None, text_len: int | None = None) -> Shapes:
  """The config's shapes (train batch 4), each overridable; raises ``BenchError``.

  Only None means "the default": an explicit 0 is refused, not silently replaced.
  """
  pick = lambda value, default: default if value is None else value
  s = Shapes(batch=pick(batch, TRAIN_BATCH), frames=pick(frames, config.video.frames),
             size=pick(size, config.video.height),
             text_len=pick(text_len, config.text.max_length),
             channels=config.unet.in_channels, text_width=config.unet.cross_attention_dim)
  for name in ("batch", "frames", "size", "text_len"):
    if getattr(s, name) < 1:
      raise BenchError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
  down = 2 ** (len(config.unet.block_out_channels) - 1)
  if s.size % down:
    raise BenchError(f"--size {s.size} must be a multiple of {down} (the generator's "
                     f"{down.bit_length() - 1} downsamplings halve it)")
  return s


def peak_tflops_of(device_kind: str) -> float | None:
  """Dense bf16 peak of a device kind, or None (CPU, unknown: MFU is n/a)."""
  for key, value in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return value
  return None


@dataclasses.dataclass
class Row:
  """One row of the table (times in ms, None where not measured)."""
  work: str
  shape: str
  ours_ms: float | None = None
  peer_eager_ms: float | None = None
  peer_compile_ms: float | None = None
  peer_note: str | None = None          # why a peer column is empty
  flops: float | None = None            # ours, counted (``ours_flops``, per call)
  peer_flops: float | None = None       # torch FlopCounterMode (per call)
  peak_mem_bytes: int | None = None     # ours, device high-water mark after the row
  peer_peak_mem_bytes: int | None = None
  compile_s: float | None = None        # ours
  peer_compile_s: float | None = None   # torch.compile's first call
  program_bytes: int | None = None      # ours, memory_analysis (args + temps + outputs)
  extra: dict = dataclasses.field(default_factory=dict)

  def ratio(self) -> float | None:
    """Best peer time / ours (> 1: ours is faster)."""
    peer = [v for v in (self.peer_eager_ms, self.peer_compile_ms) if v]
    return min(peer) / self.ours_ms if peer and self.ours_ms else None

  def tflops_per_s(self) -> float | None:
    """Achieved TFLOP/s of our side (counted FLOPs / our time), if both are known."""
    return self.flops / self.ours_ms / 1e9 if self.flops and self.ours_ms else None


def bench_unet_config(config):
  """``config.unet`` in the plain diffusers layout (no detail attention, 8 heads in
  ``transformer_in``): the network both sides of the comparison build."""
  u = config.unet.copy_and_resolve_references()
  u.detail_cross_attention = False
  u.transformer_in_heads = 8         # hard-coded in diffusers
  return u


def median_ms(times_s: Sequence[float]) -> float:
  return 1e3 * statistics.median(times_s)


def device_peak_bytes() -> int | None:
  """The first device's peak bytes in use (None where it keeps no stats, e.g. CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def time_calls(call: Callable[[], Any], steps: int) -> list[float]:
  """Seconds of ``steps`` calls after one warm-up, each waited for."""
  jax.block_until_ready(call())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return times


def latent_side(shapes: Shapes, work: str) -> int:
  """The latent side of ``work``'s input: ``2 S`` for denoise512 (the SR scale), else ``S``."""
  return shapes.size * (2 if work == "denoise512" else 1)


def shape_str(*dims) -> str:
  return "x".join(str(d) for d in dims)


def row_shapes(shapes: Shapes) -> dict[str, str]:
  """The input shapes of each work, as printed in the table's shape column.

  Returns ``{work: "B x F x H x W x C, text L x D"}`` for train, denoise256 and
  denoise512 (the SR scale doubles H and W; denoising runs the CFG batch).
  """
  s = shapes
  text = f"text {s.text_len}x{s.text_width}"
  return {
      "train": f"{shape_str(s.batch, s.frames, s.size, s.size, s.channels)}, {text}",
      "denoise256": f"{shape_str(CFG_BATCH, s.frames, s.size, s.size, s.channels)}, {text}",
      "denoise512": f"{shape_str(CFG_BATCH, s.frames, 2 * s.size, 2 * s.size, s.channels)}"
                    f", {text}",
  }


def parse_works(text: str | None, compile_only: str | None = None) -> tuple[str, ...]:
  """``--which`` text (``"train,denoise256"``) -> the works; ``BenchError`` on unknown names.

  ``None`` gives the default works: every timed one but ``attention``, or, for a
  ``compile_only`` mode (``"count"``, ``"aot"``: no device run), ``PEER_WORKS``;
  ``--count`` takes those only, ``--aot`` ``AOT_WORKS``.
  """
  if text is None:
    text = ",".join(PEER_WORKS if compile_only else DEFAULT_WORKS)
  works = tuple(w.strip() for w in text.split(",") if w.strip())
  known = WORKS + tuple(w for w in AOT_WORKS if w not in WORKS)
  unknown = [w for w in works if w not in known]
  if unknown or not works:
    raise BenchError(f"--which {text!r}: unknown work {unknown or '(none)'}; use a "
                     f"comma-separated subset of {','.join(known)}")
  aot_only = sorted(set(works) - set(WORKS))
  if aot_only and compile_only != "aot":
    raise BenchError(f"{', '.join(aot_only)}: compiled by --aot only (no timed row)")
  allowed = AOT_WORKS if compile_only == "aot" else PEER_WORKS
  extra = sorted(set(works) - set(allowed))
  if compile_only and extra:
    raise BenchError(f"--{compile_only} takes {', '.join(allowed)} only, not "
                     f"{', '.join(extra)}")
  return works


def fmt(value, spec: str, empty: str = "—") -> str:
  return empty if value is None else format(value, spec)


def fmt_bytes(n: int | None) -> str:
  if n is None:
    return "n/a"
  return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def fmt_flops(f: float | None) -> str:
  if not f:
    return "—"
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
    if f >= scale:
      return f"{f / scale:.3g} {unit}"
  return f"{f:.3g}"


def memory_of(compiled: Any) -> dict[str, int]:
  """XLA's buffer assignment of a ``jax.stages.Compiled``: ``{argument_bytes,
  output_bytes, temp_bytes, alias_bytes, total_bytes}``, ``total_bytes`` being
  arguments + outputs + temporaries - aliased (donated), the device memory a call
  needs (per device for a sharded program). Raises where the backend does not say."""
  m = compiled.memory_analysis()
  out = dict(argument_bytes=int(m.argument_size_in_bytes),
             output_bytes=int(m.output_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
             alias_bytes=int(m.alias_size_in_bytes))
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                        - out["alias_bytes"])
  return out
