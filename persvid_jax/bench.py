"""Benchmarks: our train and denoise steps, the cascade, adding a concept; the peer.

Works (``WORKS``), each one row of the table:

============  ==========================================================================
``train``     one train step of the base generator: ``[B, T, S, S, C]`` latents,
              ``[B, L, D]`` text states, eps loss, AdamW + clipping + EMA (the project's
              ``train.step.make_train_step``)
``denoise256`` one forward of the base generator at batch 2 (CFG: unconditional +
              conditional rows), ``[2, T, S, S, C]``
``denoise512`` the same at twice the side, ``[2, T, 2S, 2S, C]``
``cascade``   end-to-end generation of one video with ``pipeline.generate.Generator``:
              DDIM base steps (3-branch CFG: text and detail scales) + SR steps
``concept``   adding a concept from one photo: subject recognition, encoders, Orbax commit
``attention`` attention alone at the generator's widest level, XLA's kernel against
              cuDNN's fused one (``attention_ab``; its own table, not a row)
============  ==========================================================================

Default shapes come from the config: ``S = config.video.height``, ``T =
config.video.frames``, ``L = config.text.max_length``, ``C`` and ``D`` of
``config.unet``; the train batch is 4. For ``configs/modelscope.py`` these are
the reference shapes (4 x 16 x 32x32x4 latents, 77 x 1024 text; 256 / 512 px after
the VAE's 8x); ``configs/tiny.py`` shrinks them to 4 x 4 x 16x16x3, 16 x 32.

The peer (``--peer``) is diffusers' ``UNet3DConditionModel`` built from the same
generator config (``peer_kwargs``), on the same inputs, in torch: eager and
``torch.compile``, bf16 autocast when our compute dtype is bf16 on a GPU. For the
comparison both sides run the plain ModelScope layout: detail attention off and
diffusers' 8 heads in ``transformer_in`` (our method's extra detail branch is
timed in the ``cascade`` row).

Measured per row: median wall time of ``steps`` calls (each waited for with
``block_until_ready`` / ``cuda.synchronize``) after one warm-up; FLOPs counted
from the lowered program with attention traced as XLA's matmuls (``ours_flops``,
what ``--count`` prints: a compiled GPU program hides its cuDNN convolutions and
attention from XLA's cost analysis), the peer's from torch's ``FlopCounterMode``
(matmuls, convs, attention); TFLOP/s = FLOPs / time; MFU against
``peak_tflops``; the device's peak memory (``memory_stats``, a high-water mark
of the process, so rows run smallest first); compile seconds of
``jit(...).lower(...).compile()``.

The denoise rows time the step as the samplers run it: the generator's params
cast once to the compute dtype (``stack.inference_params``: the same outputs bit
for bit) and laid out as XLA asks (``Layout.AUTO``: convolution kernels in
cuDNN's order, so no per-step transposes). Every program is compiled with the
options of ``persvid_jax.xla_options``, which the JSON records. The peer's
denoise rows run its weights in bf16 (``model.to(torch.bfloat16)``, as diffusers
pipelines run with ``torch_dtype``); its train row keeps float32 weights under
bf16 autocast (mixed precision, as ours).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout

from persvid_jax import records, xla_options

WORKS = ("train", "denoise256", "denoise512", "cascade", "concept", "attention")
PEER_WORKS = ("train", "denoise256", "denoise512")
DEFAULT_WORKS = tuple(w for w in WORKS if w != "attention")   # --which's default

# Dense bf16 peak TFLOP/s by device kind (substring of jax's device_kind).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# What the peer measured on one H200 at the ModelScope shapes, and our targets
# there: a data file (persvid_jax/assets/bench_reference.json), not code.
REFERENCE = json.loads((pathlib.Path(__file__).parent / "assets" / "bench_reference.json")
                       .read_text())
ISSUE_SHAPES = REFERENCE["shapes"]

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


# ----------------------------------------------------------------------------
# Shared helpers.
# ----------------------------------------------------------------------------

def bench_unet_config(config):
  """``config.unet`` in the plain diffusers layout (no detail attention, 8 heads in
  ``transformer_in``): the network both sides of the comparison build."""
  u = config.unet.copy_and_resolve_references()
  u.detail_cross_attention = False
  u.transformer_in_heads = 8         # hard-coded in diffusers
  return u


def peer_kwargs(u) -> dict:
  """``UNet3DConditionModel(**kwargs)`` for a ``bench_unet_config`` (the inverse of
  ``convert.unet3d.unet_config``)."""
  return dict(in_channels=u.in_channels, out_channels=u.out_channels,
              block_out_channels=tuple(u.block_out_channels),
              down_block_types=tuple(u.down_block_types),
              up_block_types=tuple(u.up_block_types), layers_per_block=u.layers_per_block,
              norm_num_groups=u.norm_num_groups, norm_eps=u.norm_eps,
              cross_attention_dim=u.cross_attention_dim, attention_head_dim=u.head_dim)


def random_params(abstract: Any, rng: jax.Array, std: float = 0.02,
                  chunk: int = 1 << 26) -> Any:
  """Normal(0, std) leaves of an abstract (ShapeDtypeStruct) params tree, on device.

  Values only matter for timing, so they are drawn as one flat stream in
  chunks of ``chunk`` floats by one small compiled program, split on the host
  and put on the device leaf by leaf. Not a jitted per-leaf draw: XLA compiles
  one kernel per random leaf (~0.1 s each on a CPU, a model's init has
  hundreds) and its CPU compile time grows faster than linearly with their
  number (1000 leaves: ~7 min on 2 cores). Not the model's init either,
  whose compile includes the forward pass.

  Args:
    abstract: pytree of ``jax.ShapeDtypeStruct``.
    rng: a PRNG key; the same key gives the same values.
    std: standard deviation of every leaf.
    chunk: floats per compiled draw (bounds the device buffer for big models).

  Returns:
    The pytree of ``abstract`` with device arrays of its shapes and dtypes.
  """
  leaves, treedef = jax.tree.flatten(abstract)
  sizes = [math.prod(l.shape) for l in leaves]
  total = sum(sizes)
  n = max(1, min(chunk, total))
  draw = jax.jit(lambda key: std * jax.random.normal(key, (n,), jnp.float32))
  flat = np.empty(-(-total // n) * n, np.float32)
  for i in range(len(flat) // n):
    flat[i * n:(i + 1) * n] = np.asarray(draw(jax.random.fold_in(rng, i)))
  out, offset = [], 0
  for leaf, size in zip(leaves, sizes):
    value = flat[offset:offset + size].reshape(leaf.shape).astype(leaf.dtype)
    out.append(jax.device_put(value))
    offset += size
  return jax.tree.unflatten(treedef, out)


def _median_ms(times_s: Sequence[float]) -> float:
  return 1e3 * statistics.median(times_s)


def _cost_flops(program) -> float | None:
  """FLOPs from XLA's cost analysis of a ``jax.stages.Compiled`` or ``Lowered``."""
  cost = program.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _program_bytes(compiled) -> int | None:
  from persvid_jax import aot
  try:
    return aot.memory_of(compiled)["total_bytes"]
  except Exception:   # not every backend reports it
    return None


def device_peak_bytes() -> int | None:
  """The first device's peak bytes in use (None where it keeps no stats, e.g. CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _compile(fn: Callable, *args, donate=(), in_shardings=None) -> tuple[Any, float]:
  start = time.perf_counter()
  kwargs = {} if in_shardings is None else dict(in_shardings=in_shardings)
  compiled = xla_options.jit(fn, donate_argnums=donate, **kwargs).lower(*args).compile()
  return compiled, time.perf_counter() - start


def auto_layout_shardings(params: Any, n_inputs: int, device: jax.Device) -> tuple:
  """``in_shardings`` of a denoise program ``(params, *inputs)`` on ``device``: the
  params' layouts chosen by XLA (``Layout.AUTO``), the inputs' the default."""
  single = jax.sharding.SingleDeviceSharding(device)
  return ((jax.tree.map(lambda _: Format(Layout.AUTO, single), params),)
          + (single,) * n_inputs)


def _time(call: Callable[[], Any], steps: int) -> list[float]:
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


def _shape_str(*dims) -> str:
  return "x".join(str(d) for d in dims)


def row_shapes(shapes: Shapes) -> dict[str, str]:
  """The input shapes of each work, as printed in the table's shape column.

  Returns ``{work: "B x F x H x W x C, text L x D"}`` for train, denoise256 and
  denoise512 (the SR scale doubles H and W; denoising runs the CFG batch).
  """
  s = shapes
  text = f"text {s.text_len}x{s.text_width}"
  return {
      "train": f"{_shape_str(s.batch, s.frames, s.size, s.size, s.channels)}, {text}",
      "denoise256": f"{_shape_str(CFG_BATCH, s.frames, s.size, s.size, s.channels)}, {text}",
      "denoise512": f"{_shape_str(CFG_BATCH, s.frames, 2 * s.size, 2 * s.size, s.channels)}"
                    f", {text}",
  }


# ----------------------------------------------------------------------------
# Ours: train and denoise steps of the base generator.
# ----------------------------------------------------------------------------

def _our_unet(config):
  from persvid_jax.models.unet3d import UNet3D
  return UNet3D.from_config(bench_unet_config(config), dtype=config.dtype,
                            param_dtype=config.param_dtype,
                            attention_impl=config.get("attention_impl"))


def _inputs(shapes: Shapes, batch: int, size: int, rng: jax.Array):
  """``(x [B, T, size, size, C], t [B], context [B, L, D])`` float32 / int32."""
  k1, k2, k3 = jax.random.split(rng, 3)
  x = jax.random.normal(k1, (batch, shapes.frames, size, size, shapes.channels))
  t = jax.random.randint(k2, (batch,), 0, 1000)
  context = jax.random.normal(k3, (batch, shapes.text_len, shapes.text_width))
  return x, t, context


def _abstract_unet_params(unet, shapes: Shapes, boxed: bool = False):
  """The generator's params as ``ShapeDtypeStruct``s; ``boxed``: still in their
  ``nn.LogicallyPartitioned`` boxes (for ``sharding.param_shardings``)."""
  x, t, ctx = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in
               jax.eval_shape(lambda: _inputs(shapes, 1, shapes.size, jax.random.key(0))))
  import flax.linen as nn
  variables = jax.eval_shape(unet.init, jax.random.key(0), x, t, ctx)
  return (variables if boxed else nn.meta.unbox(variables))["params"]


def _denoise_program(config, shapes: Shapes, size: int, params=None, abstract: bool = False):
  """``(denoise, params, (x, t, ctx))``: one forward of the base generator at
  ``[2, T, size, size, C]``; ``params`` is reused where given, else drawn, and
  cast as samplers use them (``stack.inference_params``). With ``abstract`` the
  params and inputs are ``jax.ShapeDtypeStruct`` trees (nothing allocated: for
  counting FLOPs of the lowered program, or compiling for an absent GPU)."""
  from persvid_jax.models.stack import inference_params
  unet = _our_unet(config)
  if params is None:
    params = _abstract_unet_params(unet, shapes)
    if not abstract:
      params = random_params(params, jax.random.key(1))
  params = inference_params(params, config.dtype)
  make_inputs = lambda: _inputs(shapes, CFG_BATCH, size, jax.random.key(2))

  def denoise(p, x, t, ctx):
    return unet.apply({"params": p}, x, t, ctx)

  return denoise, params, jax.eval_shape(make_inputs) if abstract else make_inputs()


def ours_denoise(config, shapes: Shapes, size: int, steps: int, params=None
                 ) -> tuple[Row, Any]:
  """One forward of the base generator at ``[2, T, size, size, C]``; returns the row
  and the params (reused by the next denoise row)."""
  denoise, params, (x, t, ctx) = _denoise_program(config, shapes, size, params)

  compiled, compile_s = _compile(
      denoise, params, x, t, ctx,
      in_shardings=auto_layout_shardings(params, 3, jax.local_devices()[0]))
  # Once per generation in a sampler: the kernels in the layouts XLA chose.
  laid_out = jax.device_put(params, compiled.input_formats[0][0])
  times = _time(lambda: compiled(laid_out, x, t, ctx), steps)
  del laid_out
  row = Row(work="", shape="", ours_ms=_median_ms(times),
            compile_s=compile_s, program_bytes=_program_bytes(compiled),
            peak_mem_bytes=device_peak_bytes(),
            extra=dict(params=int(sum(x.size for x in jax.tree.leaves(params)))))
  return row, params


def _train_program(config, shapes: Shapes, abstract: bool = False):
  """``(train_step, state, batch, rng)`` of the base generator's train step;
  with ``abstract`` the state and batch are ``jax.ShapeDtypeStruct`` trees
  (nothing allocated: for counting FLOPs of the lowered program)."""
  import ml_collections
  from persvid_jax.diffusion import losses, schedules
  from persvid_jax.train import state as state_lib
  from persvid_jax.train import step as step_lib

  unet = _our_unet(config)
  params = _abstract_unet_params(unet, shapes)
  params = {"unet": params if abstract else random_params(params, jax.random.key(1))}
  tc = ml_collections.ConfigDict(dict(
      trainable=("^unet/",), learning_rate=1e-4, warmup_steps=0, total_steps=1000,
      lr_min_ratio=1.0, weight_decay=0.0, adam_b1=0.9, adam_b2=0.99, grad_clip_norm=1.0))
  tx = state_lib.make_optimizer(tc, params)
  schedule = schedules.from_config(config.diffusion)

  def loss_fn(p, batch, rng):
    drop_rng, loss_rng = jax.random.split(rng)

    def denoise(q, x_t, t, context):
      return unet.apply({"params": q}, x_t, t, context, deterministic=False,
                        rngs={"dropout": drop_rng})

    out = losses.diffusion_loss(denoise, p["unet"], batch["x0"], loss_rng,
                                dict(context=batch["context"]), schedule=schedule,
                                prediction="eps")
    return out.loss, {"loss": out.loss}

  train_step = step_lib.make_train_step(loss_fn, tx, ema_decay=0.999,
                                        grad_clip_norm=tc.grad_clip_norm,
                                        trainable=state_lib.trainable_mask(params, tc.trainable))
  make_inputs = lambda: _inputs(shapes, shapes.batch, shapes.size, jax.random.key(3))
  if abstract:
    state = jax.eval_shape(lambda p: state_lib.create_state(p, tx), params)
    x0, _, ctx = jax.eval_shape(make_inputs)
    return train_step, state, dict(x0=x0, context=ctx), jax.eval_shape(lambda: jax.random.key(4))
  state = jax.jit(state_lib.create_state, static_argnums=1)(params, tx)
  x0, _, ctx = make_inputs()
  return train_step, state, dict(x0=x0, context=ctx), jax.random.key(4)


def ours_train(config, shapes: Shapes, steps: int) -> Row:
  """One train step (the project's ``make_train_step``: eps loss, AdamW with global-norm
  clipping, EMA) of the base generator on ``[B, T, S, S, C]`` latents + text states."""
  from persvid_jax.train import step as step_lib
  train_step, state, batch, rng = _train_program(config, shapes)
  # As the trainer compiles it (one device here): the state in XLA's layouts.
  from persvid_jax import sharding as sh
  mesh = sh.make_mesh(1, 1)
  single = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  compiled, compile_s = step_lib.compile_train_step(
      train_step, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state),
      jax.tree.map(lambda _: single, state), batch, mesh)
  holder = [step_lib.place_state(compiled, state)]
  del state

  def call():
    holder[0], metrics = compiled(holder[0], batch, rng)
    return metrics["loss"]

  times = _time(call, steps)
  row = Row(work="", shape="", ours_ms=_median_ms(times),
            compile_s=compile_s, program_bytes=_program_bytes(compiled),
            peak_mem_bytes=device_peak_bytes(),
            extra=dict(loss=float(jax.device_get(call()))))
  return row


# ----------------------------------------------------------------------------
# The peer: diffusers' UNet3DConditionModel in torch.
# ----------------------------------------------------------------------------

def peer_compile_default() -> tuple[bool, str | None]:
  """``(compile?, reason if not)``: ``torch.compile`` on a GPU; skipped on a CPU."""
  import torch
  if torch.cuda.is_available():
    return True, None
  return False, ("torch.compile skipped on CPU (inductor builds C++ kernels for minutes); "
                 "--peer-compile yes forces it")


class _Peer:
  """The diffusers model, its inputs and timing helpers on one torch device."""

  def __init__(self, config, shapes: Shapes, steps: int):
    import diffusers
    import torch
    self.torch, self.shapes, self.steps = torch, shapes, steps
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    self.model = diffusers.UNet3DConditionModel(
        **peer_kwargs(bench_unet_config(config))).to(self.device)
    bf16 = str(config.dtype) == "bfloat16" and self.device.type == "cuda"
    self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else None)
    self.dtype_note = ("bf16 weights (denoise), bf16 autocast over float32 weights (train)"
                       if bf16 else "float32")
    self._bf16 = None

  def _ctx(self):
    import contextlib
    return self.autocast if self.autocast is not None else contextlib.nullcontext()

  def sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def inputs(self, batch: int, size: int):
    """``(x [B, C, T, H, W], t [B], context [B, L, D])`` channels-first."""
    torch, s = self.torch, self.shapes
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, s.channels, s.frames, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, s.text_len, s.text_width, generator=g)
    return x.to(self.device), t.to(self.device), ctx.to(self.device)

  def _timed(self, call: Callable[[], Any]) -> list[float]:
    call()
    self.sync()
    times = []
    for _ in range(self.steps):
      start = time.perf_counter()
      call()
      self.sync()
      times.append(time.perf_counter() - start)
    return times

  def _flops(self, call: Callable[[], Any]) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
      call()
    self.sync()
    return float(counter.get_total_flops()) or None

  def _peak(self, call: Callable[[], Any]) -> int | None:
    if self.device.type != "cuda":
      return None
    self.torch.cuda.reset_peak_memory_stats()
    call()
    self.sync()
    return int(self.torch.cuda.max_memory_allocated())

  def _inference_model(self):
    """The model for the denoise rows: a bf16 copy on a GPU (as diffusers pipelines
    run with ``torch_dtype=torch.bfloat16``; ours casts its params once too), kept
    for both rows; float32 on a CPU. The float32 model stays for the train row."""
    if self.autocast is None:
      return self.model.eval(), False
    if getattr(self, "_bf16", None) is None:
      import copy
      self._bf16 = copy.deepcopy(self.model).to(self.torch.bfloat16).eval()
    return self._bf16, True

  def denoise(self, size: int, compile_: bool) -> Row:
    torch = self.torch
    model, bf16 = self._inference_model()
    x, t, ctx = self.inputs(CFG_BATCH, size)
    if bf16:
      x, ctx = x.to(torch.bfloat16), ctx.to(torch.bfloat16)

    def run(m):
      def call():
        with torch.no_grad():
          return m(x, t, ctx).sample
      return call

    row = Row(work="", shape="")
    row.peer_eager_ms = _median_ms(self._timed(run(model)))
    row.peer_flops = self._flops(run(model))
    row.peer_peak_mem_bytes = self._peak(run(model))
    if compile_:
      try:
        compiled = torch.compile(model)
        start = time.perf_counter()
        run(compiled)()
        self.sync()
        row.peer_compile_s = time.perf_counter() - start
        row.peer_compile_ms = _median_ms(self._timed(run(compiled)))
      except Exception as e:   # noqa: BLE001 -- keep the eager numbers
        row.peer_note = f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}"
    return row

  def train(self) -> Row:
    """fwd + bwd + global-norm clipping + AdamW + EMA, as ``ours_train``."""
    torch = self.torch
    model = self.model.train()
    s = self.shapes
    x0, _, ctx = self.inputs(s.batch, s.size)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    betas = torch.linspace(0.0001, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float().to(self.device)

    def call():
      t = torch.randint(0, 1000, (s.batch,), device=self.device)
      noise = torch.randn_like(x0)
      a = abar[t].view(-1, 1, 1, 1, 1)
      x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
      with self._ctx():
        pred = model(x_t, t, ctx).sample
      loss = torch.nn.functional.mse_loss(pred.float(), noise)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(params, 1.0)
      opt.step()
      with torch.no_grad():
        torch._foreach_lerp_(ema, params, 0.001)
      return loss

    row = Row(work="", shape="")
    row.peer_eager_ms = _median_ms(self._timed(call))
    row.peer_flops = self._flops(call)
    row.peer_peak_mem_bytes = self._peak(call)
    model.zero_grad(set_to_none=True)   # the optimizer state goes with this frame
    return row

  def release(self, keep_bf16: bool = False):
    """Returns torch's cached GPU memory (ours allocates next); the bf16 copy too,
    unless another denoise row follows."""
    if not keep_bf16:
      self._bf16 = None
    if self.device.type == "cuda":
      self.torch.cuda.empty_cache()

  def close(self):
    del self.model
    self.release()


# ----------------------------------------------------------------------------
# End to end: the cascade and adding a concept (the real pipeline code).
# ----------------------------------------------------------------------------

def random_model(config, seed: int = 0, networks: Sequence[str] | None = None):
  """A ``pipeline.model.Model`` of ``config`` with N(0, 0.02) params (no init compile).

  ``networks``: only these get params (default every network of
  ``stack.network_names``, the VAE too in latent space); adding a concept needs the
  image encoder, mapper and extractor only, not the 1.4 B-parameter generators.
  """
  import flax.linen as nn
  from persvid_jax.concepts.tokens import PromptTokenizer
  from persvid_jax.models.stack import ModelStack
  from persvid_jax.pipeline import model as model_lib
  tokenizer = PromptTokenizer.from_config(config)
  stack = ModelStack.from_config(config, eos_token_id=tokenizer.eos_id)
  names = tuple(networks or stack.network_names)
  abstract = {n: nn.meta.unbox(a)["params"]
              for n, a in stack.abstract_variables(names).items()}
  params = random_params(abstract, jax.random.key(seed))
  return model_lib.Model(config=config, stack=stack, tokenizer=tokenizer,
                         params={n: params[n] for n in names},
                         source=f"random N(0, 0.02) (seed {seed})", info={})


def _with_video_shape(config, shapes: Shapes):
  config = config.copy_and_resolve_references()
  config.video.frames, config.video.height, config.video.width = (
      shapes.frames, shapes.size, shapes.size)
  return config


def ours_cascade(config, shapes: Shapes, steps: int, sample_steps: int, sr_steps: int,
                 model=None) -> Row:
  """Latency of one video: ``sample_steps`` guided base steps + ``sr_steps`` SR steps."""
  from persvid_jax.concepts.bank import ConceptBank
  from persvid_jax.pipeline import generate as gen
  config = _with_video_shape(config, shapes)
  model = model or random_model(config)
  generator = gen.Generator(model, steps=sample_steps, sr_steps=sr_steps)
  bank = ConceptBank.from_config(config)
  image_slot = config.concepts.capacity - 1
  resolved = [gen.resolve(gen.Request("a red ball moving right on snow"), {}, image_slot,
                          config)]

  def call():
    return generator(bank, resolved, image_slot=image_slot, progress=False).video

  start = time.perf_counter()
  first = call()
  first_s = time.perf_counter() - start
  times = _time(call, max(1, min(steps, 3)))
  sr = config.video.sr_factor * shapes.size
  return Row(work="", shape="", ours_ms=_median_ms(times),
             compile_s=max(first_s - min(times), 0.0), peak_mem_bytes=device_peak_bytes(),
             extra=dict(first_call_s=first_s, video=list(first.shape),
                        base=_shape_str(1, shapes.frames, shapes.size, shapes.size),
                        sr=_shape_str(1, shapes.frames, sr, sr)))


# What adding a concept runs (concepts.build.make_feature_fn).
CONCEPT_NETWORKS = ("image_encoder", "mapper", "extractor")


def ours_concept(config, steps: int, photo: str | pathlib.Path | None = None,
                 model=None) -> Row:
  """Adding one concept from one photo: segmentation, encoders, database commit."""
  from persvid_jax.concepts import build
  from persvid_jax.concepts import database as db_lib
  from persvid_jax.pipeline import model as model_lib
  photo = pathlib.Path(photo or model_lib.DEMO_MODEL_DIR.parent / "demo_photos" / "sub1_a.png")
  model = model or random_model(config, networks=CONCEPT_NETWORKS)
  feature_fn = build.make_feature_fn(model)
  parts: dict[str, list[float]] = {"features": [], "commit": []}

  with tempfile.TemporaryDirectory(prefix="bench_concepts.") as tmp:
    db = db_lib.ConceptDatabase.create(pathlib.Path(tmp) / "db", config, "bench",
                                       commit=False)

    def call():
      start = time.perf_counter()
      feats = build.encode_concept(model, build.load_photos([photo]), [photo], feature_fn)
      mid = time.perf_counter()
      db.add("bench", feats.ref_tokens, feats.detail_tokens, list(feats.provenance))
      parts["features"].append(mid - start)
      parts["commit"].append(time.perf_counter() - mid)
      db.remove("bench")   # not timed: the next call adds it again

    for _ in range(2 + max(1, min(steps, 5))):   # first call, warm-up, timed calls
      call()
  total = [a + b for a, b in zip(parts["features"], parts["commit"])]
  timed = slice(2, None)
  return Row(work="", shape="", ours_ms=_median_ms(total[timed]),
             compile_s=max(total[0] - min(total[timed]), 0.0),
             peak_mem_bytes=device_peak_bytes(),
             extra=dict(first_call_s=total[0], photo=photo.name,
                        features_ms=_median_ms(parts["features"][timed]),
                        commit_ms=_median_ms(parts["commit"][timed])))


# ----------------------------------------------------------------------------
# FLOPs without a device: what each row costs, and what each target asks of it.
# ----------------------------------------------------------------------------

def ours_flops(config, shapes: Shapes, work: str) -> float:
  """FLOPs of one call of ``work`` (train / denoise256 / denoise512) from XLA's cost
  analysis of the lowered, unoptimised program: abstract params and inputs, so
  no memory and no device (the 1.4 B-parameter generator counts in seconds on a CPU).

  Attention is traced as XLA's matmuls on every backend: a cuDNN call is opaque
  to the cost analysis, as are the cuDNN convolutions of a *compiled* GPU program
  (whose count is about 2 % of this one). This is the count every MFU uses."""
  from persvid_jax.models import attention
  with attention.assume_cudnn(False):
    if work == "train":
      train_step, state, batch, rng = _train_program(config, shapes, abstract=True)
      return _cost_flops(jax.jit(train_step).lower(state, batch, rng))
    denoise, params, inputs = _denoise_program(config, shapes, latent_side(shapes, work),
                                               abstract=True)
    return _cost_flops(jax.jit(denoise).lower(params, *inputs))


def peer_flops(config, shapes: Shapes, work: str) -> float:
  """The peer's FLOPs for ``work`` by torch's ``FlopCounterMode`` on the meta device
  (shapes only, no memory): the forward at the CFG batch, or forward + backward of
  a mean-square loss at the train batch (the optimizer's elementwise work is not
  counted, as torch counts matmuls, convs and attention only)."""
  import diffusers
  import torch
  from torch.utils.flop_counter import FlopCounterMode
  with torch.device("meta"):
    model = diffusers.UNet3DConditionModel(**peer_kwargs(bench_unet_config(config)))
  train = work == "train"
  b = shapes.batch if train else CFG_BATCH
  size = latent_side(shapes, work)
  x = torch.empty(b, shapes.channels, shapes.frames, size, size, device="meta")
  t = torch.zeros(b, dtype=torch.long, device="meta")
  ctx = torch.empty(b, shapes.text_len, shapes.text_width, device="meta")
  counter = FlopCounterMode(display=False)
  with counter:
    if train:
      model(x, t, ctx).sample.float().pow(2).mean().backward()
    else:
      with torch.no_grad():
        model(x, t, ctx)
  return float(counter.get_total_flops())


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
  at_issue = dataclasses.asdict(shapes) == ISSUE_SHAPES
  rows = []
  for w in (w for w in ("denoise256", "denoise512", "train") if w in works):
    log(f"counting: {w} ...")
    row = dict(work=w, shape=labels[w], flops=ours_flops(config, shapes, w),
               peer_flops=peer_flops(config, shapes, w) if peer else None,
               issue_tflop=REFERENCE["peer_h200"][w]["tflop"] if at_issue else None,
               target=None, target_ms=None, need_tflops=None, need_mfu=None)
    if at_issue and row["flops"]:
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
        f"| {r['work']} | {r['shape']} | {_flops_str(r['flops'])} | "
        f"{_flops_str(r['peer_flops'])} | {_fmt(ratio, '.3f')} | "
        f"{_fmt(r['issue_tflop'], '.1f')}{' T' if r['issue_tflop'] else ''} | "
        f"{r['target'] or '—'} | {_fmt(r['target_ms'], '.1f')} | "
        f"{_fmt(r['need_tflops'], '.0f')} | "
        f"{'—' if r['need_mfu'] is None else format(100 * r['need_mfu'], '.1f') + ' %'} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Compiled for a GPU that is not here (persvid_jax.aot).
# ----------------------------------------------------------------------------

def _sharded_train(config, shapes: Shapes, devices, fsdp: int):
  """Compiles the train step sharded as the trainer shards it (``train.step``'s
  state shardings from the logical axis rules, batch over data x fsdp) over
  ``devices``; returns ``(compiled, seconds)``."""
  from persvid_jax import sharding as sh
  from persvid_jax.train import step as step_lib
  mesh = sh.make_mesh(data=len(devices) // fsdp, fsdp=fsdp, devices=devices)
  train_step, state, batch, _ = _train_program(config, shapes, abstract=True)
  boxed = {"unet": _abstract_unet_params(_our_unet(config), shapes, boxed=True)}
  shards = step_lib.state_shardings(state, boxed, mesh)
  return step_lib.compile_train_step(train_step, state, shards, batch, mesh)


def aot_report(config, shapes: Shapes, works: Sequence[str], card: str, *,
               gpus: int = 1, fsdp: int = 1, log: Callable[[str], None] = print,
               dump_dir: str | None = None) -> dict:
  """Compiles train / denoise256 / denoise512 for the GPU ``card`` (a key of
  ``aot.CARDS``) without one, as that GPU would trace them (``attention_impl``
  'auto' answers as there), and reads what XLA assigned and emitted.

  Args:
    gpus: with more than one, the train step is compiled sharded over that many
      GPUs of one host (``fsdp`` of them per parameter shard, the rest data
      parallel), through the trainer's own ``compile_train_step``; memory is then
      per GPU. The denoise rows stay on one GPU.
    dump_dir: where to write each work's compiled HLO (``WORK.hlo.txt``), if given.

  Returns:
    ``{config, card, memory_bytes, bandwidth_tbs, peak_tflops, rows: [{work, shape,
    gpus, fsdp, flops, compile_s, argument_bytes, output_bytes, temp_bytes,
    alias_bytes, total_bytes, kernels, by_kind, memory_bound_bytes, compute_ms,
    memory_ms, error}]}``: ``compute_ms`` = FLOPs per GPU at the card's dense bf16 peak,
    ``memory_ms`` = the memory-bound kernels' bytes at its bandwidth (two
    components of a roofline estimate, not a measurement); a work that does not
    trace or compile has only ``error``.

  Raises:
    aot.AotError: jax's CUDA plugin is missing or the process is not CPU-only.
  """
  from persvid_jax import aot
  spec = aot.CARDS[card]
  peak = peak_tflops_of(spec.name)
  if gpus < 1 or fsdp < 1 or gpus % fsdp or shapes.batch % gpus:
    raise BenchError(f"--gpus {gpus} --fsdp {fsdp}: fsdp must divide gpus, and gpus the "
                     f"train batch {shapes.batch} (--batch)")
  devices = aot.compile_only_devices(spec, gpus)
  labels = row_shapes(shapes)
  rows = []
  for w in (w for w in ("denoise256", "denoise512", "train") if w in works):
    log(f"compiling {w} for {spec.name} (no device; minutes at the full size) ...")
    sharded = w == "train" and gpus > 1
    row = dict(work=w, shape=labels[w], gpus=gpus if sharded else 1,
               fsdp=fsdp if sharded else 1, error=None)
    try:
      with aot.cudnn_as_on(spec):
        if w == "train":   # the trainer's own compile, over 1 or N GPUs
          on = devices if sharded else devices[:1]
          row.update(aot.compiled_report(*_sharded_train(config, shapes, on,
                                                         fsdp if sharded else 1)))
        else:   # as ours_denoise: inference params, their layouts XLA's choice
          fn, params, inputs = _denoise_program(config, shapes, latent_side(shapes, w),
                                                abstract=True)
          start = time.perf_counter()
          lowered = xla_options.jit(
              fn, in_shardings=auto_layout_shardings(params, len(inputs), devices[0])
          ).lower(*aot.place((params, *inputs), devices[0]))
          lower_s = time.perf_counter() - start
          row.update(aot.compile_report(lowered))
          row["compile_s"] += lower_s
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
           f"temporaries - donated), of the card's {_bytes(result['memory_bytes'])}. "
           f"Kernels: launches of one call. Roofline parts: FLOPs at "
           f"{result['peak_tflops']:.0f} TFLOP/s; the elementwise / reduction / copy "
           f"kernels' bytes at {result['bandwidth_tbs']} TB/s. A sharded row (x N GPUs): "
           f"memory, kernels, bytes and compute per GPU, FLOPs of the whole step.", "",
           "| work | shape | compile s (here) | memory | of card | kernels | cuDNN attention "
           "fwd / bwd | cuDNN conv | gemm | elementwise, copies | collectives | their bytes | "
           "FLOPs | compute ms | memory ms |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  notes = []
  for r in result["rows"]:
    work = r["work"] + (f" x {r['gpus']} GPUs (fsdp {r['fsdp']})" if r.get("gpus", 1) > 1
                        else "")
    if r["error"]:
      lines.append(f"| {work} | {r['shape']} | fails | | | | | | | | | | | | |")
      notes.append(f"- {work}: {r['error']}")
      continue
    k = r["by_kind"]
    lines.append(
        f"| {work} | {r['shape']} | {r['compile_s']:.0f} | {_bytes(r['total_bytes'])} | "
        f"{100 * r['total_bytes'] / result['memory_bytes']:.0f} % | {r['kernels']} | "
        f"{k.get('attention fwd (cuDNN)', 0)} / {k.get('attention bwd (cuDNN)', 0)} | "
        f"{k.get('conv (cuDNN)', 0)} | {k.get('gemm', 0)} | "
        f"{k.get('elementwise / reduction', 0) + k.get('copy / transpose', 0)} | "
        f"{k.get('collective', 0)} | {r['memory_bound_bytes'] / 1e9:.1f} GB | "
        f"{_flops_str(r['flops'])} | {_fmt(r['compute_ms'], '.1f')} | {r['memory_ms']:.1f} |")
  return "\n".join(lines + ([""] + notes if notes else []))


# ----------------------------------------------------------------------------
# Attention alone: XLA's against cuDNN's fused kernel at the generator's shapes.
# ----------------------------------------------------------------------------

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
  from persvid_jax.models import attention
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
        row[f"{impl}_ms"] = _median_ms(_time(lambda: fwd(q, k, v), steps))
        row[f"{impl}_bwd_ms"] = _median_ms(_time(lambda: grad(q, k, v), steps))
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
        f"| {r['case']} | {r['shape']} | {_fmt(r.get('xla_ms'), '.3f')} | "
        f"{_fmt(tf(r.get('xla_ms')), '.3g')} | {_fmt(r.get('cudnn_ms'), '.3f')} | "
        f"{_fmt(tf(r.get('cudnn_ms')), '.3g')} | {_fmt(r.get('xla_bwd_ms'), '.3f')} | "
        f"{_fmt(r.get('cudnn_bwd_ms'), '.3f')} | {_fmt(r.get('max_err'), '.2e')} |")
    notes += [f"- {r['case']}: {impl} failed: {r[f'{impl}_error']}"
              for impl in ("xla", "cudnn") if r.get(f"{impl}_error")]
  lines += ["", "Forward FLOPs 4 B H Lq Lk Dh; max rel err: max |cudnn - xla| / max |xla| of "
            "the forward output."] + notes
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# The run and the table.
# ----------------------------------------------------------------------------

def parse_works(text: str) -> tuple[str, ...]:
  """``--which`` text (``"train,denoise256"``) -> the works; ``BenchError`` on unknown names."""
  works = tuple(w.strip() for w in text.split(",") if w.strip())
  unknown = [w for w in works if w not in WORKS]
  if unknown or not works:
    raise BenchError(f"--which {text!r}: unknown work {unknown or '(none)'}; use a "
                     f"comma-separated subset of {','.join(WORKS)}")
  return works


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
    ``{device, device_kind, platform, peak_tflops, config, dtype, attention, shapes,
    steps, peer, peer_h200_reference, rows: [Row fields + ratio, tflops_per_s, mfu]}``;
    ``attention``: the config's ``attention_impl`` and whether cuDNN's fused
    attention can run here (what ``'auto'`` then picks for bf16 rows).
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
  if dataclasses.asdict(shapes) == ISSUE_SHAPES:
    reference = REFERENCE["peer_h200"]
  from persvid_jax.models import attention
  result = dict(device=str(device), device_kind=kind, platform=device.platform,
                peak_tflops=peak, config=config.get("name", "?"), dtype=str(config.dtype),
                attention=dict(implementation=config.get("attention_impl"),
                               cudnn_available=attention.cudnn_available()),
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
    p = _Peer(config, shapes, steps)
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
        got, params = ours_denoise(config, shapes, size, steps, params)
      elif w == "train":
        params = None   # the train state holds its own params
        got = ours_train(config, shapes, steps)
      elif w == "cascade":
        got = ours_cascade(config, shapes, steps, sample_steps, sr_steps)
        r.shape = (f"{got.extra['base']} x{sample_steps} (3-branch CFG) + "
                   f"{got.extra['sr']} x{sr_steps}")
      else:
        got = ours_concept(config, steps)
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


def _fmt(value, spec: str, empty: str = "—") -> str:
  return empty if value is None else format(value, spec)


def _bytes(n: int | None) -> str:
  if n is None:
    return "n/a"
  return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def _flops_str(f: float | None) -> str:
  if not f:
    return "—"
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
    if f >= scale:
      return f"{f / scale:.3g} {unit}"
  return f"{f:.3g}"


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
           f"{result['steps']} calls; peak {_fmt(result['peak_tflops'], '.0f', 'n/a')} TFLOP/s.",
           "",
           head, "|" + "---|" * (head.count("|") - 1)]
  notes = []
  for r in result["rows"]:
    mfu = r["mfu"]
    ref_row = ref.get(r["work"])
    ref_cell = "—" if not ref_row else " / ".join(
        _fmt(v, ".1f") for v in (ref_row["eager_ms"], ref_row["compile_ms"]))
    lines.append(
        f"| {r['work']} | {r['shape']} | {_fmt(r['ours_ms'], '.2f')} | "
        f"{_fmt(r['peer_eager_ms'], '.2f')} | {_fmt(r['peer_compile_ms'], '.2f')} | "
        f"{_fmt(r['ratio'], '.2f')} | {_flops_str(r['flops'])} | "
        f"{_fmt(r['tflops_per_s'], '.3g')} | "
        f"{'n/a' if mfu is None else format(100 * mfu, '.1f') + ' %'} | "
        f"{_bytes(r['peak_mem_bytes'])} | "
        f"{_fmt(r['compile_s'], '.1f')} | {ref_cell} |")
    if r.get("peer_flops"):
      agree = (f" (ours/peer {r['flops'] / r['peer_flops']:.2f})" if r.get("flops") else "")
      notes.append(f"- {r['work']}: peer FLOPs {_flops_str(r['peer_flops'])} "
                   f"(torch FlopCounterMode){agree}.")
    if r.get("peer_note"):
      notes.append(f"- {r['work']}: {r['peer_note']}.")
    if (r.get("extra") or {}).get("error"):
      notes.append(f"- {r['work']}: ours failed: {r['extra']['error']}")
  lines += ["", "ratio = best peer ms / ours ms (> 1: ours is faster). FLOPs: counted "
            "from our lowered program, attention as matmuls (as --count). peak mem: the device's high-water mark after the row "
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
