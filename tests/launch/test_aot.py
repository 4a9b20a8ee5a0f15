"""``launch.bench --aot CARD``: compiling for a GPU that is not here.

The compile needs jax's CUDA plugin, which CI does not install (it is GBs of
CUDA libraries): there the CLI must say so in one line and exit 2, and with the
plugin the tiny config must compile. The reading of a compiled GPU program is
tested on a real one: ``data/h100_small_train.hlo.txt`` is ``_small_train``
compiled for an H100 by ``aot.compile_report`` (jax 0.11.2's plugin, no GPU;
``test_small_program_compiles_as_recorded`` rewrites it with
``PERSVID_WRITE_FIXTURE=1``), its entry computation counted by hand below.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import os

import jax
import jax.numpy as jnp
import pytest

from persvid_jax.bench import aot
from persvid_jax.models import attention

ROOT = pathlib.Path(__file__).resolve().parents[2]
HLO = pathlib.Path(__file__).parent / "data" / "h100_small_train.hlo.txt"
HAVE_PLUGIN = (importlib.util.find_spec("jax_plugins") is not None
               and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


def _small_train():
  """``(grad fn, abstract args)``: d/d(w, k) of 3x3 conv -> SiLU -> cuDNN attention -> matmul."""
  def f(w, k, x):   # x [2, 8, 8, 16] NHWC
    h = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.silu(h).reshape(2, 64, 16)
    a = attention.dot_product_attention(h, h, h, num_heads=2, implementation="cudnn")
    return jnp.sum((a @ w).astype(jnp.float32) ** 2)
  s = jax.ShapeDtypeStruct
  return jax.grad(f, (0, 1)), (s((16, 16), jnp.bfloat16), s((3, 3, 16, 16), jnp.bfloat16),
                               s((2, 8, 8, 16), jnp.bfloat16))


def test_kernel_summary_of_a_real_h100_program():
  s = aot.kernel_summary(HLO.read_text())
  # transpose(k), conv, silu, fmha fwd, dot, convert, 2 dots, fmha bwd, add,
  # conv filter grad, transpose(dk): 12 launches; parameters, bitcasts,
  # get-tuple-elements and the root tuple launch nothing.
  assert s["by_kind"] == {"elementwise / reduction": 5, "gemm": 3, "conv (cuDNN)": 2,
                          "attention fwd (cuDNN)": 1, "attention bwd (cuDNN)": 1}
  assert s["kernels"] == 12
  # Operands + result of the 5 elementwise fusions, bf16: the two kernel
  # transposes 2 x 4608 each, silu 2 x 4096, convert 2 x 4096, the 4-input add 5 x 4096.
  assert s["memory_bound_bytes"] == 2 * 9216 + 8192 + 8192 + 20480


SLICED = """HloModule m

%wrapped_slice_computation.1 (param_0.1: f32[1000]) -> f32[320] {
  %param_0.1 = f32[1000]{0} parameter(0)
  ROOT %slice.1 = f32[320]{0} slice(%param_0.1), slice={[600:920]}
}

%fused_add (param_0.2: f32[1000], param_1.2: f32[320]) -> f32[320] {
  %param_0.2 = f32[1000]{0} parameter(0)
  %slice.2 = f32[320]{0} slice(%param_0.2), slice={[0:320]}
  %param_1.2 = f32[320]{0} parameter(1)
  ROOT %add.1 = f32[320]{0} add(%slice.2, %param_1.2)
}

%fused_cast (param_0.4: f32[1000]) -> (bf16[100], bf16[2,50]) {
  %param_0.4 = f32[1000]{0} parameter(0)
  %convert.1 = bf16[1000]{0} convert(%param_0.4)
  %slice.3 = bf16[100]{0} slice(%convert.1), slice={[0:100]}
  %slice.4 = bf16[100]{0} slice(%convert.1), slice={[500:600]}
  %bitcast.1 = bf16[2,50]{1,0} bitcast(%slice.4)
  ROOT %tuple.1 = (bf16[100]{0}, bf16[2,50]{1,0}) tuple(%slice.3, %bitcast.1)
}

%fused_neg (param_0.3: f32[1000]) -> f32[1000] {
  %param_0.3 = f32[1000]{0} parameter(0)
  ROOT %negate.1 = f32[1000]{0} negate(%param_0.3)
}

ENTRY %main (p0: f32[1000], p1: f32[320]) -> (f32[320], f32[320], f32[1000], (bf16[100], bf16[2,50])) {
  %p0 = f32[1000]{0} parameter(0)
  %p1 = f32[320]{0} parameter(1)
  %wrapped_slice.1 = f32[320]{0} fusion(%p0), kind=kLoop, calls=%wrapped_slice_computation.1
  %loop_add_fusion = f32[320]{0} fusion(%p0, %p1), kind=kLoop, calls=%fused_add
  %loop_neg_fusion = f32[1000]{0} fusion(%p0), kind=kLoop, calls=%fused_neg
  %loop_slice_fusion = (bf16[100]{0}, bf16[2,50]{1,0}) fusion(%p0), kind=kLoop, calls=%fused_cast
  ROOT %tuple = (f32[320]{0}, f32[320]{0}, f32[1000]{0}, (bf16[100]{0}, bf16[2,50]{1,0})) tuple(%wrapped_slice.1, %loop_add_fusion, %loop_neg_fusion, %loop_slice_fusion)
}
"""


def test_a_sliced_operand_counts_the_bytes_of_its_slices():
  """A kernel that slices a vector out of a big buffer (the train state's packed
  vectors) moves the slice, not the buffer; one that reads the whole buffer moves it."""
  assert aot._sliced_reads(SLICED) == {"wrapped_slice_computation.1": {0: 1280},
                                       "fused_add": {0: 1280},
                                       "fused_cast": {0: 800}}   # 200 floats, cast then sliced
  s = aot.kernel_summary(SLICED)
  assert s["kernels"] == 4
  # slice: 1280 in + 1280 out; add: 1280 + 1280 in + 1280 out; negate: 4000 + 4000;
  # cast: 800 in + 400 out.
  assert s["memory_bound_bytes"] == 2 * 1280 + 3 * 1280 + 2 * 4000 + 800 + 400


def test_target_config_carries_the_card():
  text = aot.target_config(aot.CARDS["h200"], (9, 10, 0))
  assert text.count("{") == text.count("}")
  fields = dict(re.findall(r"(\w+): ([\w.\"]+)", text))
  assert fields["core_count"] == "132"
  assert int(fields["device_memory_size"]) == 143771 * 2**20
  assert int(fields["memory_bandwidth"]) == 4_800_000_000_000
  assert "cuda_compute_capability { major: 9 minor: 0 }" in text
  assert "dnn_version_info { major: 9 minor: 10 patch: 0 }" in text
  assert aot.CARDS["a100"].capability == (8, 0)


def test_assume_cudnn_is_scoped():
  """Tracing as on the card: 'auto' answers cuDNN inside, this CPU's answer outside."""
  resolve = lambda: attention.resolve_implementation("auto", jnp.bfloat16, 64,
                                                     lengths=(1024, 1024))
  assert resolve() is None
  with attention.assume_cudnn(True):
    assert resolve() == "cudnn"
    with attention.assume_cudnn(False):
      assert resolve() is None
    assert resolve() == "cudnn"
  assert resolve() is None


def _bench(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "launch.bench", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--aot", "v100"], "--aot 'v100': use one of h100, h200, a100"),
    (["--aot", "h100", "--peer"], "--aot compiles our programs only"),
    (["--hlo-dir", "x"], "--hlo-dir, --gpus and --fsdp go with --aot CARD"),
    (["--gpus", "8"], "--hlo-dir, --gpus and --fsdp go with --aot CARD"),
    (["--aot", "h100", "--which", "cascade"],
     "--aot takes train, denoise256, denoise512, concept, sr512 only, not cascade"),
])
def test_bad_aot_flags_are_one_line(args, message):
  r = _bench("--config", "tiny", *args)
  assert r.returncode == 2, r.stderr
  assert message in r.stderr and "Traceback" not in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.skipif(HAVE_PLUGIN, reason="jax's CUDA plugin is installed: the next test runs")
def test_without_the_plugin_aot_says_what_to_install():
  r = _bench("--config", "tiny", "--aot", "h100")
  assert r.returncode == 2, r.stderr
  assert "pip install 'jax[cuda12]==" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs jax's CUDA plugin (not installed in CI)")
def test_tiny_config_compiles_for_an_h100(tmp_path):
  r = _bench("--config", "tiny:bf16", "--aot", "h100", "--which", "denoise256,concept,sr512",
             "--hlo-dir", str(tmp_path / "hlo"))
  assert r.returncode == 0, r.stderr
  assert "fails" not in r.stdout
  # Adding a concept's encoders: their program, compiled for the card too.
  assert "| concept | 1 photo, 32x32 |" in r.stdout, r.stdout
  assert "__cudnn$fmhaSoftmax" in (tmp_path / "hlo" / "concept.hlo.txt").read_text()
  # The cascade's SR step (the SR network, one video at twice the side).
  assert "| sr512 | 1x4x32x32x3, text 16x32 |" in r.stdout, r.stdout
  hlo = (tmp_path / "hlo" / "denoise256.hlo.txt").read_text()
  assert "__cudnn$fmhaSoftmax" in hlo
  # 'auto' GroupNorms are Triton kernels there, counted as Pallas launches.
  assert aot.kernel_summary(hlo)["by_kind"]["pallas"] == hlo.count('"__gpu$xla.gpu.triton"') > 10


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs jax's CUDA plugin (not installed in CI)")
def test_group_norm_kernel_compiles_for_an_h100_and_counts_its_bytes():
  """One Triton launch where XLA emits three or four; its bytes are its
  operands and results (``x``, ``scale``, ``bias`` in; ``y``, mean, rstd out)."""
  from persvid_jax.models import group_norm_pallas
  device, = aot.compile_only_devices(aot.CARDS["h100"])
  s = jax.ShapeDtypeStruct
  x, p = s((2, 4, 16, 16, 320), jnp.bfloat16), s((320,), jnp.float32)
  for kernel, want in (("pallas", 1), ("xla", 3)):
    f = lambda x, a, b: attention.group_norm_silu(x, a, b, 32, 1e-6, 2, True, jnp.bfloat16,
                                                  kernel)
    with aot.lowering_for(device):
      report = aot.compile_report(jax.jit(f).lower(*aot.place((x, p, p), device)))
    assert report["kernels"] == want, report["by_kind"]
  assert report["by_kind"] == {"elementwise / reduction": 3}
  with aot.lowering_for(device):
    report = aot.compile_report(jax.jit(
        lambda x, a, b: group_norm_pallas.group_norm_silu_fwd(x, a, b, 32, 1e-6, 2, True,
                                                              jnp.bfloat16)
    ).lower(*aot.place((x, p, p), device)))
  assert report["by_kind"] == {"pallas": 1}
  assert report["memory_bound_bytes"] == 2 * (2 * 4 * 16 * 16 * 320 * 2) + 2 * 320 * 4 + 2 * 8 * 32 * 4


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs jax's CUDA plugin (not installed in CI)")
def test_geglu_gradient_kernel_compiles_for_an_h100_and_saves_the_bias_sum():
  """GEGLU's gradient with its bias gradient in one Triton launch (+ the small
  sum of its programs' sums) moves the ``[..., 2F]`` gradient once, where
  XLA's path reads it back for the bias gradient."""
  from persvid_jax.models import video_transformer as vt
  device, = aot.compile_only_devices(aot.CARDS["h100"])
  s = jax.ShapeDtypeStruct
  y, b, dy = s((8, 256, 2560), jnp.bfloat16), s((2560,), jnp.bfloat16), s((8, 256, 1280),
                                                                          jnp.bfloat16)
  reports = {}
  for impl in ("pallas", "xla"):
    f = lambda y, b, dy: jax.vjp(lambda y, b: vt.geglu(y, b, impl), y, b)[1](dy)
    with aot.lowering_for(device):
      reports[impl] = aot.compile_report(jax.jit(f).lower(*aot.place((y, b, dy), device)))
  assert reports["pallas"]["by_kind"]["pallas"] == 1, reports["pallas"]["by_kind"]
  assert "pallas" not in reports["xla"]["by_kind"]
  grad = 8 * 256 * 2560 * 2          # the [..., 2F] gradient in bf16
  saved = reports["xla"]["memory_bound_bytes"] - reports["pallas"]["memory_bound_bytes"]
  assert 0.9 * grad < saved < 1.1 * grad, (saved, grad)


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs jax's CUDA plugin (not installed in CI)")
def test_add_layer_norm_kernels_compile_for_an_h100_and_move_fewer_bytes():
  """The residual add + LayerNorm, forward and gradient: one Triton launch each
  way (+ the small sum of the programs' column sums), fewer bytes than XLA's
  kernels for the same work."""
  device, = aot.compile_only_devices(aot.CARDS["h100"])
  s = jax.ShapeDtypeStruct
  act, vec = s((8, 1024, 320), jnp.bfloat16), s((320,), jnp.float32)
  reports = {}
  for kernel in ("pallas", "xla"):
    def f(x, r, b, scale, bias, g, dy, kernel=kernel):
      outs, vjp = jax.vjp(lambda *a: attention.add_layer_norm(*a, 1e-5, jnp.bfloat16, kernel),
                          x, r, b, scale, bias)
      return outs, vjp((g, dy))
    with aot.lowering_for(device):
      reports[kernel] = aot.compile_report(jax.jit(f).lower(
          *aot.place((act, act, vec, vec, vec, act, act), device)))
  assert reports["pallas"]["by_kind"]["pallas"] == 2, reports["pallas"]["by_kind"]
  assert "pallas" not in reports["xla"]["by_kind"]
  assert reports["pallas"]["memory_bound_bytes"] < 0.8 * reports["xla"]["memory_bound_bytes"]


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs jax's CUDA plugin (not installed in CI)")
def test_small_program_compiles_as_recorded():
  fn, args = _small_train()
  device, = aot.compile_only_devices(aot.CARDS["h100"])
  report = aot.compile_report(jax.jit(fn).lower(*aot.place(args, device)))
  if os.environ.get("PERSVID_WRITE_FIXTURE"):
    HLO.write_text(report["hlo"])
  assert report["by_kind"] == aot.kernel_summary(HLO.read_text())["by_kind"]


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs jax's CUDA plugin (not installed in CI)")
def test_tiny_train_step_compiles_sharded_over_two_h100s():
  """The trainer's own compile_train_step over 2 compile-only GPUs, FSDP 2: the
  parameters are split, so each GPU holds less than one unsharded copy needs."""
  one = _bench("--config", "tiny:bf16", "--aot", "h100", "--which", "train")
  two = _bench("--config", "tiny:bf16", "--aot", "h100", "--which", "train",
               "--gpus", "2", "--fsdp", "2")
  assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
  row = lambda out: [c.strip() for c in out.splitlines()[-1].strip("|").split("|")]
  single, sharded = row(one.stdout), row(two.stdout)
  assert sharded[0] == "train x 2 GPUs (fsdp 2)", sharded
  mib = lambda cell: float(cell.split()[0]) * (1024 if cell.endswith("GiB") else 1)
  assert mib(sharded[3]) < mib(single[3]), (single, sharded)
  assert int(sharded[10]) > 0   # collectives


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs jax's CUDA plugin (not installed in CI)")
def test_kv_cache_is_padded_where_cudnn_would_pad():
  """Traced as for an H100: the cross-attention cache holds the 77 text keys as
  78 with lengths 77 (padded once per video, not by every step's attention)."""
  from flax import linen as nn
  from persvid_jax import config_lib
  from persvid_jax.models import video_transformer
  from persvid_jax.models.unet3d import UNet3D
  u = config_lib.load_config("tiny:bf16").unet
  model = UNet3D.from_config(u, dtype=jnp.bfloat16, attention_impl="auto")
  x = jnp.zeros((2, 4, 8, 8, u.in_channels))
  t = jnp.zeros((2,), jnp.int32)
  ctx = jnp.zeros((2, 77, u.cross_attention_dim))
  detail = jnp.zeros((2, 4, u.detail_dim))
  params = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), x, t, ctx,
                                                           detail_tokens=detail)))
  with aot.cudnn_as_on(aot.CARDS["h100"]):
    cache = jax.eval_shape(lambda v: model.apply(v, x, t, ctx, detail_tokens=detail,
                                                 mutable=[video_transformer.KV_CACHE])[1],
                           params)[video_transformer.KV_CACHE]
  flat = {tuple(k.key for k in p): leaf
          for p, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]}
  assert {leaf.shape[1] for p, leaf in flat.items() if p[-1] in ("k", "v")} == {78}
  assert {leaf.shape for p, leaf in flat.items() if p[-1] == "lengths"} == {(2,)}
  # 4 detail tokens are even: stored as they are.
  assert {leaf.shape[1] for p, leaf in flat.items() if p[-1].startswith("detail_")} == {4}
