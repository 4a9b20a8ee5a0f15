"""The peer: diffusers' ``UNet3DConditionModel`` in torch, built from the same generator
config, on the same inputs. The only module of the benchmark that imports torch and
diffusers (inside its functions: both are optional)."""

from __future__ import annotations

import contextlib
import copy
import time
from typing import Any, Callable

from persvid_jax.bench.core import CFG_BATCH, Row, Shapes, bench_unet_config, latent_side, median_ms


def peer_kwargs(u) -> dict:
  """``UNet3DConditionModel(**kwargs)`` for a ``bench_unet_config`` (the inverse of
  ``convert.unet3d.unet_config``)."""
  return dict(in_channels=u.in_channels, out_channels=u.out_channels,
              block_out_channels=tuple(u.block_out_channels),
              down_block_types=tuple(u.down_block_types),
              up_block_types=tuple(u.up_block_types), layers_per_block=u.layers_per_block,
              norm_num_groups=u.norm_num_groups, norm_eps=u.norm_eps,
              cross_attention_dim=u.cross_attention_dim, attention_head_dim=u.head_dim)


def peer_compile_default() -> tuple[bool, str | None]:
  """``(compile?, reason if not)``: ``torch.compile`` on a GPU; skipped on a CPU."""
  import torch
  if torch.cuda.is_available():
    return True, None
  return False, ("torch.compile skipped on CPU (inductor builds C++ kernels for minutes); "
                 "--peer-compile yes forces it")


class Peer:
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
    row.peer_eager_ms = median_ms(self._timed(run(model)))
    row.peer_flops = self._flops(run(model))
    row.peer_peak_mem_bytes = self._peak(run(model))
    if compile_:
      try:
        compiled = torch.compile(model)
        start = time.perf_counter()
        run(compiled)()
        self.sync()
        row.peer_compile_s = time.perf_counter() - start
        row.peer_compile_ms = median_ms(self._timed(run(compiled)))
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
    row.peer_eager_ms = median_ms(self._timed(call))
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
