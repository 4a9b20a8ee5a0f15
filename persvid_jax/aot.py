"""Compile the benchmark's programs for a GPU that is not here (XLA's deviceless AOT).

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
card can differ. ``python -m launch.bench --aot h100`` prints the table. Checked
with jax 0.11.2 and its ``jax-cuda12-plugin`` (Python 3.12, as on the GPU image);
the plugin's topology options (``topology``, ``target_config``) are XLA's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import re
import time
from typing import Any

import jax
import numpy as np


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
  from jax._src.lib import cuda_versions
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
  from jax.experimental import topologies
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
  """Within: ``attention_impl='auto'`` resolves as it would on ``card`` (cuDNN's
  fused attention from compute capability 8.0 on), not as on this CPU."""
  from persvid_jax.models import attention
  with attention.assume_cudnn(card.capability >= (8, 0)):
    yield


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


def kernel_summary(hlo_text: str) -> dict[str, Any]:
  """What the entry computation of a compiled GPU program launches.

  Args:
    hlo_text: ``compiled.as_text()`` of a program compiled for a GPU.

  Returns:
    ``{kernels, by_kind: {kind: count}, memory_bound_bytes}``: ``kernels`` counts
    the entry computation's instructions that launch work (fusions, custom calls,
    copies; not parameters, tuples or bitcasts); ``memory_bound_bytes`` sums the
    operand and result bytes of the elementwise / reduction fusions and copies,
    the kernels whose time is their memory traffic.
  """
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
    if kind in ("elementwise / reduction", "copy / transpose"):
      moved += sizes[name] + sum(sizes.get(o, 0) for o in _operands(rest))
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


def compiled_report(compiled: Any, compile_s: float) -> dict[str, Any]:
  """``compile_report``'s dict of an already compiled program."""
  out = dict(compile_s=compile_s, **memory_of(compiled))
  hlo = compiled.as_text()
  out.update(kernel_summary(hlo))
  out["hlo"] = hlo
  return out
