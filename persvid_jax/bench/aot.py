"""The benchmark's programs compiled for a GPU that is not here (XLA's deviceless AOT).

jax's CUDA plugin (``pip install 'jax[cuda12]'``; no GPU and no driver needed)
can build a compile-only device from a *target config*, the facts XLA reads
from a live GPU (compute capability, SM count, shared memory, memory size),
and compile for it: the whole GPU pipeline runs (fusion, the cuDNN / cuBLAS /
Triton rewrites, buffer assignment) except autotuning. Without a GPU this tells:

- whether a program traces and compiles for that card at all. The first run of
  this found that jax's cuDNN attention refuses the 77-token text
  cross-attention under ``jax.grad`` (see ``attention.resolve_implementation``):
  the GPU train step would have failed before its first step;
- the device memory XLA assigns (parameters and inputs, temporaries, outputs):
  whether a train step fits an 80-GB card;
- what runs: how many kernels a call launches, how many are cuDNN attention /
  cuDNN convolution / GEMM, and the bytes the memory-bound rest moves.

It does not time anything, and kernel choices that autotuning would make on the
card can differ. ``python -m launch.bench --aot h100`` prints the table
(``aot_report``). Checked with jax 0.11.2 and its ``jax-cuda12-plugin`` (Python
3.12, as on the GPU image); the plugin's topology options (``topology``,
``target_config``) are XLA's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import pathlib
import re
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import topologies

from persvid_jax import records, xla_options
from persvid_jax import sharding as sh
from persvid_jax.bench import ours
from persvid_jax.bench.core import (BenchError, Shapes, fmt, fmt_bytes, fmt_flops, latent_side,
                                    memory_of, peak_tflops_of, row_shapes, shape_str)
from persvid_jax.bench.flops import ours_flops
from persvid_jax.concepts import build
from persvid_jax.models import attention
from persvid_jax.train import step as step_lib


class AotError(RuntimeError):
  """Compiling for an absent GPU is not possible here (the message says what to do)."""


@dataclasses.dataclass(frozen=True)
class Card:
  """What XLA needs to know of a GPU to compile for it (NVIDIA's published figures;
  memory as ``nvidia-smi`` reports it)."""
  name: str                  # as the driver names it (jax's device_kind)
  capability: tuple[int, int]
  sms: int
  memory_mib: int
  bandwidth_tbs: float       # HBM bandwidth, TB/s
  clock_ghz: float           # boost clock
  l2_mib: int
  smem_per_sm_kib: int       # shared memory per SM
  smem_per_block_kib: int    # the opt-in maximum per block
  fp32_per_sm: int

  @property
  def memory_bytes(self) -> int:
    return self.memory_mib * 2**20


CARDS = {
    "h100": Card("NVIDIA H100 80GB HBM3", (9, 0), 132, 81559, 3.35, 1.98, 50, 228, 227, 128),
    "h200": Card("NVIDIA H200", (9, 0), 132, 143771, 4.8, 1.98, 50, 228, 227, 128),
    "a100": Card("NVIDIA A100-SXM4-80GB", (8, 0), 108, 81920, 2.039, 1.41, 40, 164, 163, 64),
}


def target_config(card: Card, dnn_version: tuple[int, int, int]) -> str:
  """``card`` as XLA's ``GpuTargetConfigProto`` in text format (what
  ``--xla_gpu_target_config_filename`` reads); ``dnn_version`` is the cuDNN
  (major, minor, patch) to compile against, which decides the fused kernels
  XLA may use."""
  major, minor = card.capability
  kib = 1024
  fields = dict(
      threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * kib,
      shared_memory_per_core=card.smem_per_sm_kib * kib, threads_per_core_limit=2048,
      core_count=card.sms, fpus_per_core=card.fp32_per_sm, block_dim_limit_x=2**31 - 1,
      block_dim_limit_y=65535, block_dim_limit_z=65535,
      memory_bandwidth=int(card.bandwidth_tbs * 1e12), l2_cache_size=card.l2_mib * 2**20,
      clock_rate_ghz=card.clock_ghz, device_memory_size=card.memory_bytes,
      shared_memory_per_block_optin=card.smem_per_block_kib * kib,
      registers_per_core_limit=65536, registers_per_block_limit=65536)
  body = "".join(f"  {k}: {v}\n" for k, v in fields.items())
  return (f"gpu_device_info {{\n{body}"
          f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
          f'platform_name: "CUDA"\n'
          f"dnn_version_info {{ major: {dnn_version[0]} minor: {dnn_version[1]} "
          f"patch: {dnn_version[2]} }}\n"
          f'device_description_str: "{card.name}"\n')


def plugin_hint() -> str:
  """What to install for compiling without a GPU."""
  return (f"--aot needs jax's CUDA plugin (no GPU or driver needed): "
          f"pip install 'jax[cuda12]=={jax.__version__}'")


def _cudnn_version() -> tuple[int, int, int]:
  from jax._src.lib import cuda_versions   # private: where jax keeps the plugin's cuDNN version
  if cuda_versions is None:
    raise AotError(plugin_hint())
  v = int(cuda_versions.cudnn_get_version())   # e.g. 92800 for 9.28.0
  return v // 10000, v // 100 % 100, v % 100


def compile_only_devices(card: Card, count: int = 1) -> list[jax.Device]:
  """``count`` devices of ``card`` on one host that programs can be compiled for
  but not run on (sharded programs see them as one machine's GPUs).

  Raises:
    AotError: jax's CUDA plugin is missing, or the process's default backend is
      not the CPU (the plugin would then try to open a GPU).
  """
  if jax.default_backend() != "cpu":
    raise AotError("--aot compiles for an absent GPU: run it with JAX_PLATFORMS=cpu")
  config = target_config(card, _cudnn_version())
  try:
    topo = topologies.get_topology_desc(
        platform="cuda", topology_name=card.name, topology=f"1x1x{count}",
        target_config=config)
  except (NotImplementedError, RuntimeError) as e:
    raise AotError(f"{plugin_hint()} ({type(e).__name__}: {str(e)[:200]})") from e
  return list(topo.devices)


@contextlib.contextmanager
def cudnn_as_on(card: Card):
  """Within: ``attention_impl='auto'`` and the GroupNorm's ``'auto'`` resolve as
  they would on ``card`` (cuDNN's fused attention and the Triton GroupNorm from
  compute capability 8.0 on), not as on this CPU."""
  with attention.assume_cudnn(card.capability >= (8, 0)):
    yield


def lowering_for(device: jax.Device):
  """Within: lowering targets ``device`` (a compile-only GPU), as Pallas's Triton
  lowering needs: it reads the GPU's generation from the default device. Only
  around a compile: an eager op there would try to run on a device that is not."""
  return jax.default_device(device)


# ----------------------------------------------------------------------------
# Reading the compiled program.
# ----------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_FREE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant", "after-all",
         "opt-barrier"}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


def _shape_bytes(shape: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def _operands(args: str) -> list[str]:
  """The ``%name`` operands of an instruction (the text up to its closing paren)."""
  depth, end = 1, len(args)
  for i, ch in enumerate(args):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      end = i
      break
  return re.findall(r"%([^\s,()]+)", args[:end])


def _kind(op: str, rest: str) -> str:
  if op == "custom-call":
    target = re.search(r'custom_call_target="([^"]+)"', rest)
    target = target.group(1) if target else ""
    if "fmha" in target:
      return "attention bwd (cuDNN)" if "Backward" in target else "attention fwd (cuDNN)"
    if "conv" in target:
      return "conv (cuDNN)"
    if "cublas" in target or "gemm" in target.lower():
      return "gemm"
    if target == "__gpu$xla.gpu.triton":   # a Pallas kernel (ours: the GroupNorm's)
      return "pallas"
    return "other custom call"
  if op == "fusion":
    if re.search(r"__triton_(nested_)?gemm|__cudnn\$fusion", rest):
      return "gemm"
    # Everything else, Triton's block-level fusions (``"kind":"__triton"``: a
    # normalisation or softmax in one kernel) included, is memory-bound work.
    return "elementwise / reduction"
  if op in ("copy", "transpose"):
    return "copy / transpose"
  if op.startswith(_COLLECTIVES):
    return "collective"
  return op


_COMPUTATION = re.compile(r"^%?([\w.\-]+) \(.*\) -> .* \{$")
_PARAM = re.compile(r"^\s*%(\S+) = .+? parameter\((\d+)\)")


def _elements(shape: str) -> tuple[int, int]:
  """``(elements, bytes per element)`` of a one-array shape (``f32[4,8]{1,0}``)."""
  m = _ARRAY.search(shape)
  if not m or m.group(1) not in _DTYPE_BYTES:
    return 0, 0
  return int(np.prod([int(d) for d in m.group(2).split(",") if d])), _DTYPE_BYTES[m.group(1)]


# Ops through which a kernel still reads only what the slices after them take.
_PASS_THROUGH = {"convert", "bitcast", "reshape"}


def _sliced_reads(hlo_text: str) -> dict[str, dict[int, int]]:
  """``{computation: {parameter index: bytes}}`` for the parameters of fused
  computations that are only read through ``slice``s (possibly after a
  ``convert``, ``bitcast`` or ``reshape`` of the whole operand, which a loop
  kernel evaluates only where the slices read): such a kernel reads the slices,
  not the whole operand (e.g. one vector or weight out of the train state's
  packed buffer, ``train.packing``)."""
  out: dict[str, dict[int, int]] = {}
  name, params, users, shapes = None, {}, collections.defaultdict(list), {}

  def read(node: str, elem_bytes: int) -> int | None:
    total = 0
    for op, user in users.get(node, []):
      if op == "slice":
        total += _elements(shapes[user])[0] * elem_bytes
      elif op in _PASS_THROUGH:
        sub = read(user, elem_bytes)
        if sub is None:
          return None
        total += sub
      else:
        return None
    return total if users.get(node) else None

  for line in hlo_text.splitlines():
    if name is None:
      m = _COMPUTATION.match(line)
      if m:
        name, params, users, shapes = m.group(1), {}, collections.defaultdict(list), {}
      continue
    if line.startswith("}"):
      reads = {}
      for pname, index in params.items():
        b = read(pname, _elements(shapes[pname])[1])
        if b is not None:
          reads[index] = b
      if reads:
        out[name] = reads
      name = None
      continue
    p = _PARAM.match(line)
    if p:
      params[p.group(1)] = int(p.group(2))
      shapes[p.group(1)] = line.split(" = ", 1)[1]
      continue
    m = _INSTR.match(line)
    if m:
      iname, shape, op, rest = m.groups()
      shapes[iname] = shape
      for o in _operands(rest):
        users[o].append((op, iname))
  return out


# Kernels whose time is their memory traffic. A Pallas kernel's bytes are its
# operands and results, read or written once (ours, the GroupNorm, reads its
# input twice in one kernel; the second read should mostly hit L2).
_MEMORY_BOUND = ("elementwise / reduction", "copy / transpose", "pallas")


def kernel_summary(hlo_text: str) -> dict[str, Any]:
  """What the entry computation of a compiled GPU program launches.

  Args:
    hlo_text: ``compiled.as_text()`` of a program compiled for a GPU.

  Returns:
    ``{kernels, by_kind: {kind: count}, memory_bound_bytes}``: ``kernels`` counts
    the entry computation's instructions that launch work (fusions, custom calls,
    copies; not parameters, tuples or bitcasts); ``memory_bound_bytes`` sums the
    operand and result bytes of the elementwise / reduction fusions, copies and
    Pallas kernels, the kernels whose time is their memory traffic (an operand
    the kernel only slices counts with the bytes of its slices).
  """
  sliced = _sliced_reads(hlo_text)
  entry = hlo_text[hlo_text.index("\nENTRY "):]
  sizes: dict[str, int] = {}
  by_kind: collections.Counter = collections.Counter()
  moved = 0
  for line in entry.splitlines()[1:]:
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    sizes[name] = _shape_bytes(shape)
    if op in _FREE or op.endswith("-done"):   # an async op counts once, at its start
      continue
    kind = _kind(op, rest)
    by_kind[kind] += 1
    if kind in _MEMORY_BOUND:
      calls = re.search(r"calls=%?([\w.\-]+)", rest) if op == "fusion" else None
      reads = sliced.get(calls.group(1), {}) if calls else {}
      moved += sizes[name] + sum(reads.get(i, sizes.get(o, 0))
                                 for i, o in enumerate(_operands(rest)))
  return dict(kernels=int(sum(by_kind.values())), by_kind=dict(by_kind.most_common()),
              memory_bound_bytes=int(moved))


def place(tree: Any, device: jax.Device) -> Any:
  """``jax.ShapeDtypeStruct`` leaves of ``tree`` committed to ``device``."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      tree)


def compile_report(lowered: Any) -> dict[str, Any]:
  """Compiles ``lowered`` (lowered with arguments ``place``d on a compile-only device).

  Returns:
    ``{compile_s, argument_bytes, output_bytes, temp_bytes, alias_bytes,
    total_bytes, hlo}`` (``total_bytes``: arguments + outputs + temporaries -
    aliased, the device memory the call needs; per device for a sharded
    program) plus ``kernel_summary``'s keys.
  """
  start = time.perf_counter()
  compiled = lowered.compile()
  return compiled_report(compiled, time.perf_counter() - start)


def compiled_report(compiled: Any, compile_s: float) -> dict[str, Any]:
  """``compile_report``'s dict of an already compiled program."""
  out = dict(compile_s=compile_s, **memory_of(compiled))
  hlo = compiled.as_text()
  out.update(kernel_summary(hlo))
  out["hlo"] = hlo
  return out


def _sharded_train(config, shapes: Shapes, devices, fsdp: int):
  """Compiles the train step sharded as the trainer shards it (``train.step``'s
  state shardings from the logical axis rules, batch over data x fsdp) over
  ``devices``; returns ``(compiled, seconds)``."""
  mesh = sh.make_mesh(data=len(devices) // fsdp, fsdp=fsdp, devices=devices)
  train_step, state, batch, _ = ours.train_program(config, shapes, abstract=True,
                                                   pack_matrices=fsdp == 1)
  boxed = {"unet": ours.abstract_unet_params(ours.our_unet(config), shapes, boxed=True)}
  shards = step_lib.state_shardings(state, boxed, mesh, packing=train_step.packing)
  with lowering_for(devices[0]):
    return step_lib.compile_train_step(train_step, state, shards, batch, mesh)


def aot_report(config, shapes: Shapes, works: Sequence[str], card: str, *,
               gpus: int = 1, fsdp: int = 1, log: Callable[[str], None] = print,
               dump_dir: str | None = None) -> dict:
  """Compiles train / denoise256 / denoise512 / concept (adding a concept's
  encoders, one photo) / sr512 (the cascade's SR step, ``ours.sr_program``) for
  the GPU ``card`` (a key of ``CARDS``) without one, as that GPU would trace them
  (``attention_impl`` 'auto' answers as there), and reads what XLA assigned and
  emitted.

  Args:
    gpus: with more than one, the train step is compiled sharded over that many
      GPUs of one host (``fsdp`` of them per parameter shard, the rest data
      parallel), through the trainer's own ``compile_train_step``; memory is then
      per GPU. The denoise rows stay on one GPU.
    dump_dir: where to write each work's compiled HLO (``WORK.hlo.txt``), if given.

  Returns:
    ``{config, card, memory_bytes, bandwidth_tbs, peak_tflops, rows: [{work, shape,
    gpus, fsdp, flops, compile_s, trace_s, lower_s, argument_bytes, output_bytes, temp_bytes,
    alias_bytes, total_bytes, kernels, by_kind, memory_bound_bytes, compute_ms,
    memory_ms, error}]}``: ``compile_s`` includes jax's tracing and lowering
    (``trace_s``, ``lower_s``: what a second process still spends when XLA's
    part comes from the persistent cache), ``compute_ms`` = FLOPs per GPU at the card's dense bf16 peak,
    ``memory_ms`` = the memory-bound kernels' bytes at its bandwidth (two
    components of a roofline estimate, not a measurement); a work that does not
    trace or compile has only ``error``.

  Raises:
    AotError: jax's CUDA plugin is missing or the process is not CPU-only.
  """
  spec = CARDS[card]
  peak = peak_tflops_of(spec.name)
  if gpus < 1 or fsdp < 1 or gpus % fsdp or shapes.batch % gpus:
    raise BenchError(f"--gpus {gpus} --fsdp {fsdp}: fsdp must divide gpus, and gpus the "
                     f"train batch {shapes.batch} (--batch)")
  devices = compile_only_devices(spec, gpus)
  labels = row_shapes(shapes)
  side = build.reference_size(config)
  labels["concept"] = f"1 photo, {side}x{side}"
  sr = config.video.sr_factor * shapes.size
  video = shape_str(1, shapes.frames, sr, sr, shapes.channels)
  labels["sr512"] = f"{video}, text {shapes.text_len}x{shapes.text_width}"
  rows = []
  order = ("denoise256", "denoise512", "train", "concept", "sr512")
  for w in (w for w in order if w in works):
    log(f"compiling {w} for {spec.name} (no device; minutes at the full size) ...")
    sharded = w == "train" and gpus > 1
    row = dict(work=w, shape=labels[w], gpus=gpus if sharded else 1,
               fsdp=fsdp if sharded else 1, error=None)
    try:
      with cudnn_as_on(spec):
        if w == "train":   # the trainer's own compile, over 1 or N GPUs
          on = devices if sharded else devices[:1]
          compiled, times = _sharded_train(config, shapes, on, fsdp if sharded else 1)
          row.update(compiled_report(compiled, times.total_s),
                     trace_s=times.trace_s, lower_s=times.lower_s)
        else:   # one GPU, jitted as its caller jits it
          if w == "concept":   # build.make_feature_fn's program
            fn, params, inputs = ours.concept_program(config)
          else:   # a sampler's step (ours_denoise's; sr512: the cascade's SR step):
            # inference params, their layouts XLA's choice
            step, params, inputs = (
                ours.sr_program(config, shapes) if w == "sr512" else
                ours.denoise_program(config, shapes, latent_side(shapes, w), abstract=True))
            fn = ours.jit_denoise(step, params, len(inputs), devices[0])
          with lowering_for(devices[0]):
            compiled, times = xla_options.compile_timed(
                fn, *place((params, *inputs), devices[0]))
          row.update(compiled_report(compiled, times.total_s),
                     trace_s=times.trace_s, lower_s=times.lower_s)
      # Counted as --count does (on this CPU, attention as XLA's matmuls): the
      # lowered GPU program holds cuDNN calls, which XLA's cost analysis does not see.
      # The whole step's FLOPs, also when sharded (each GPU does 1/gpus of them).
      row["flops"] = ours_flops(config, shapes, w)
    except Exception as e:   # noqa: BLE001 -- the finding itself: report it, go on
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      rows.append(row)
      continue
    hlo = row.pop("hlo")
    if dump_dir:
      pathlib.Path(dump_dir, f"{w}.hlo.txt").write_text(hlo)
    row["compute_ms"] = (row["flops"] / row["gpus"] / (peak * 1e12) * 1e3
                         if row["flops"] else None)
    row["memory_ms"] = row["memory_bound_bytes"] / (spec.bandwidth_tbs * 1e12) * 1e3
    rows.append(row)
  return dict(config=config.get("name", "?"), card=spec.name, memory_bytes=spec.memory_bytes,
              bandwidth_tbs=spec.bandwidth_tbs, peak_tflops=peak, jax=jax.__version__,
              xla=xla_options.describe(), git=records.git_state(), rows=rows)


def aot_markdown(result: dict) -> str:
  """The table of ``aot_report``."""
  lines = [f"Compiled for {result['card']} without one (XLA deviceless AOT, no autotuning), "
           f"config `{result['config']}`. Memory: what XLA assigned (arguments + outputs + "
           f"temporaries - donated), of the card's {fmt_bytes(result['memory_bytes'])}. "
           f"Kernels: launches of one call. Roofline parts: FLOPs at "
           f"{result['peak_tflops']:.0f} TFLOP/s; the elementwise / reduction / copy / Pallas "
           f"kernels' bytes at {result['bandwidth_tbs']} TB/s. A sharded row (x N GPUs): "
           f"memory, kernels, bytes and compute per GPU, FLOPs of the whole step.", "",
           "| work | shape | compile s here (tracing + lowering) | memory | of card | kernels | cuDNN attention "
           "fwd / bwd | cuDNN conv | gemm | elementwise, copies | Pallas | collectives | "
           "their bytes | FLOPs | compute ms | memory ms |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  notes = []
  for r in result["rows"]:
    work = r["work"] + (f" x {r['gpus']} GPUs (fsdp {r['fsdp']})" if r.get("gpus", 1) > 1
                        else "")
    if r["error"]:
      lines.append(f"| {work} | {r['shape']} | fails | | | | | | | | | | | | | |")
      notes.append(f"- {work}: {r['error']}")
      continue
    k = r["by_kind"]
    lines.append(
        f"| {work} | {r['shape']} | {r['compile_s']:.0f} ({r['trace_s'] + r['lower_s']:.1f}) | "
        f"{fmt_bytes(r['total_bytes'])} | "
        f"{100 * r['total_bytes'] / result['memory_bytes']:.0f} % | {r['kernels']} | "
        f"{k.get('attention fwd (cuDNN)', 0)} / {k.get('attention bwd (cuDNN)', 0)} | "
        f"{k.get('conv (cuDNN)', 0)} | {k.get('gemm', 0)} | "
        f"{k.get('elementwise / reduction', 0) + k.get('copy / transpose', 0)} | "
        f"{k.get('pallas', 0)} | {k.get('collective', 0)} | {r['memory_bound_bytes'] / 1e9:.1f} GB | "
        f"{fmt_flops(r['flops'])} | {fmt(r['compute_ms'], '.1f')} | {r['memory_ms']:.1f} |")
  return "\n".join(lines + ([""] + notes if notes else []))
