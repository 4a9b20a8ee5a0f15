"""Tests of the 3D UNet generator (persvid_jax/models/unet3d.py).

Compiling a UNet on CPU costs seconds (initialisers dominate: every kernel has
its own RNG stream), so each model is initialised once per module and the
jitted functions are shared between tests.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax import config_lib
from persvid_jax import sharding as sh
from persvid_jax.convert import unet3d as unet3d_convert
from persvid_jax.convert.common import torch_layout
from persvid_jax.models import attention, stack, unet3d, video_conv, video_transformer
from persvid_jax.models.unet3d import UNet3D

MODELSCOPE_PARAMS = 1_411_233_860   # diffusers' default UNet3DConditionModel()


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------

def _inputs(unet_cfg, *, batch=2, frames=4, height=16, width=16, text_len=8,
            detail_tokens=4, seed=0):
  """Random model inputs (numpy) for a ``config.unet``-shaped ConfigDict."""
  rng = np.random.default_rng(seed)
  out = dict(
      x=rng.standard_normal((batch, frames, height, width, unet_cfg.in_channels), np.float32),
      t=np.arange(1, batch + 1, dtype=np.int32) * 100,
      context=rng.standard_normal((batch, text_len, unet_cfg.cross_attention_dim), np.float32))
  if unet_cfg.detail_cross_attention:
    out["detail_tokens"] = rng.standard_normal(
        (batch, detail_tokens, unet_cfg.detail_dim), np.float32)
  if unet_cfg.sr:
    out["cond_video"] = rng.standard_normal(
        (batch, frames, height, width, unet_cfg.cond_channels), np.float32)
    out["noise_level"] = np.full((batch,), 20, np.int32)
  return out


def _call_args(inputs):
  """Splits the input dict into the positional and keyword arguments of UNet3D."""
  kwargs = {k: v for k, v in inputs.items() if k not in ("x", "t", "context")}
  return (inputs["x"], inputs["t"], inputs["context"]), kwargs


def _init_fn(model, inputs):
  """``key -> unboxed variables`` for ``model`` on ``inputs``."""
  args, kwargs = _call_args(inputs)
  return lambda key: nn.meta.unbox(model.init(key, *args, **kwargs))


def _apply_fn(model):
  """Jitted ``(variables, inputs) -> output``."""
  def apply(variables, inputs):
    args, kwargs = _call_args(inputs)
    return model.apply(variables, *args, **kwargs)
  return jax.jit(apply)


def _abstract(model, inputs):
  """Unboxed ShapeDtypeStruct variables of ``model`` (no compile)."""
  return jax.eval_shape(_init_fn(model, inputs), jax.random.key(0))


def _count(tree) -> int:
  """Number of scalars in a tree of arrays / ShapeDtypeStructs."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _flat(tree) -> dict[tuple[str, ...], jax.Array]:
  """``{('down_blocks_0', 'resnets_0', 'conv1', 'kernel'): leaf, ...}``."""
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _numpy_params(abstract_vars, seed=0):
  """Cheap random variables of the right shapes (no init compile)."""
  rng = np.random.default_rng(seed)

  def draw(leaf):
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in))

  return jax.tree.map(draw, abstract_vars)


def _iter_eqns(jaxpr):
  """All equations of a jaxpr, sub-jaxprs (jit, remat, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _iter_eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _iter_eqns(sub)


def _num_resnets(unet_cfg) -> int:
  """Resnets (= temporal conv layers) in the down, mid and up blocks."""
  n = len(unet_cfg.block_out_channels)
  return n * unet_cfg.layers_per_block + 2 + n * (unet_cfg.layers_per_block + 1)


class _Setup:
  """A model, its inputs, its jitted init/apply and its params (key 0)."""

  def __init__(self, unet_cfg, **input_kw):
    self.cfg = unet_cfg
    self.model = UNet3D.from_config(unet_cfg)
    self.inputs = _inputs(unet_cfg, **input_kw)
    self.init = jax.jit(_init_fn(self.model, self.inputs))
    self.variables = self.init(jax.random.key(0))
    self.apply = _apply_fn(self.model)


@pytest.fixture(scope="module")
def base(tiny_config):
  return _Setup(tiny_config.unet)


@pytest.fixture(scope="module")
def sr(tiny_config):
  return _Setup(tiny_config.sr_unet)


@pytest.fixture(scope="module")
def base_out(base):
  return np.asarray(base.apply(base.variables, base.inputs))


# ----------------------------------------------------------------------------
# 1. Shapes, dtypes, determinism.
# ----------------------------------------------------------------------------

@pytest.mark.slow   # two compiles per network (~30 s each); bf16 numerics stay in the fast lane below
@pytest.mark.parametrize("kind", ["base", "sr"])
def test_forward_float32_and_bfloat16(kind, request, tiny_bf16_config):
  setup = request.getfixturevalue(kind)
  cfg = setup.cfg
  b, t, h, w, _ = setup.inputs["x"].shape
  out32 = setup.apply(setup.variables, setup.inputs)
  assert out32.shape == (b, t, h, w, cfg.out_channels)
  assert out32.dtype == jnp.float32
  assert np.isfinite(np.asarray(out32)).all()

  bf16_cfg = tiny_bf16_config.unet if kind == "base" else tiny_bf16_config.sr_unet
  model16 = UNet3D.from_config(bf16_cfg, dtype=tiny_bf16_config.dtype,
                               param_dtype=tiny_bf16_config.param_dtype)
  assert model16.dtype == jnp.bfloat16
  # Params stay float32 whatever the compute dtype, so f32 params serve both.
  abstract16 = _abstract(model16, setup.inputs)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract16)} == {jnp.dtype(jnp.float32)}
  assert jax.tree.structure(abstract16) == jax.tree.structure(setup.variables)
  out16 = _apply_fn(model16)(setup.variables, setup.inputs)
  assert out16.shape == out32.shape and out16.dtype == jnp.bfloat16
  out16 = np.asarray(out16, np.float32)
  assert np.isfinite(out16).all()
  rel = np.linalg.norm(out16 - np.asarray(out32)) / np.linalg.norm(np.asarray(out32))
  assert rel < 0.05, rel


@pytest.mark.parametrize("kind", ["base", "sr"])
def test_inference_params_give_the_same_bf16_output(kind, request, tiny_bf16_config):
  """Casting the kernels to bf16 once (``stack.inference_params``) is what every
  bf16 layer does per call: the output is identical bit for bit; norms stay f32."""
  from persvid_jax.models.stack import inference_params
  setup = request.getfixturevalue(kind)
  bf16_cfg = tiny_bf16_config.unet if kind == "base" else tiny_bf16_config.sr_unet
  model16 = UNet3D.from_config(bf16_cfg, dtype="bfloat16")
  params = setup.variables["params"]
  cast = inference_params(params, "bfloat16")
  dtypes = {path: leaf.dtype for path, leaf in _flat(cast).items()}
  assert dtypes[("conv_in", "kernel")] == jnp.bfloat16
  assert dtypes[("down_blocks_0", "resnets_0", "norm1", "scale")] == jnp.float32
  assert {d for p, d in dtypes.items() if any("norm" in k for k in p[:-1])} == {jnp.dtype(jnp.float32)}
  assert inference_params(params, "float32") is params
  apply = _apply_fn(model16)
  np.testing.assert_array_equal(np.asarray(apply({"params": cast}, setup.inputs), np.float32),
                                np.asarray(apply(setup.variables, setup.inputs), np.float32))


@pytest.mark.parametrize("kind", ["base", "sr"])
def test_init_is_deterministic(kind, request):
  setup = request.getfixturevalue(kind)
  same = setup.init(jax.random.key(0))
  other = setup.init(jax.random.key(1))
  flat, flat_same, flat_other = (_flat(v["params"]) for v in (setup.variables, same, other))
  assert all(np.array_equal(flat[k], flat_same[k]) for k in flat)
  randomised = [k for k in flat if np.std(np.asarray(flat[k])) > 0]
  assert randomised
  assert all(not np.array_equal(flat[k], flat_other[k]) for k in randomised)
  assert all(v.dtype == jnp.float32 for v in flat.values())


def test_temporal_layers_are_identity_at_init(base):
  params = _flat(base.variables["params"])
  zero = [k for k in params if (k[-3:-1] == ("conv4", "conv") or
                                (k[-2] == "proj_out" and ("transformer_in" in k or
                                                          any("temp_attentions" in p for p in k))))]
  # kernel + bias of: one conv4 per temporal conv layer (one per resnet), one
  # proj_out per temporal transformer (transformer_in + one per spatial one).
  n_temporal = 1 + len(_spatial_transformer_widths(base.cfg))
  assert len(zero) == 2 * _num_resnets(base.cfg) + 2 * n_temporal
  assert all(not np.asarray(params[k]).any() for k in zero)


def test_input_errors(base, sr):
  args, kwargs = _call_args(base.inputs)
  with pytest.raises(ValueError, match="SR network only"):
    jax.eval_shape(lambda v: base.model.apply(v, *args, cond_video=base.inputs["x"], **kwargs),
                   base.variables)
  sr_args, _ = _call_args(sr.inputs)
  with pytest.raises(ValueError, match="needs cond_video"):
    jax.eval_shape(lambda v: sr.model.apply(v, *sr_args), sr.variables)
  plain = UNet3D.from_config(config_lib.load_config("tiny:detail=0").unet)
  with pytest.raises(ValueError, match="without detail_cross_attention"):
    jax.eval_shape(lambda: plain.init(jax.random.key(0), *args, **kwargs))
  with pytest.raises(ValueError, match="context_mask must be"):
    jax.eval_shape(lambda v: base.model.apply(v, *args, context_mask=np.ones((2, 3), bool),
                                              **kwargs), base.variables)
  # Training mode: the temporal convs' dropout draws from the 'dropout' stream.
  out = jax.eval_shape(lambda v: base.model.apply(v, *args, deterministic=False, **kwargs,
                                                  rngs={"dropout": jax.random.key(1)}),
                       base.variables)
  assert out.shape == base.inputs["x"].shape


# ----------------------------------------------------------------------------
# 2. Parameter counts and the diffusers layout.
# ----------------------------------------------------------------------------

def _modelscope_abstract(variant, key="unet"):
  """``(unet config, abstract params)`` of a full-size modelscope generator."""
  u = config_lib.load_config(f"configs/modelscope.py:{variant}")[key]
  # Param shapes do not depend on the video size: abstract init on a tiny one.
  inputs = _inputs(u, batch=1, frames=1, height=8, width=8, text_len=2)
  return u, _abstract(UNet3D.from_config(u), inputs)["params"]


def _spatial_transformer_widths(u) -> list[int]:
  """Widths of all spatial transformers (those that get detail attention)."""
  c = list(u.block_out_channels)
  widths = []
  for i, kind in enumerate(u.down_block_types):
    widths += [c[i]] * u.layers_per_block * (kind == "CrossAttnDownBlock3D")
  widths.append(c[-1])                                          # mid block
  for i, kind in enumerate(u.up_block_types):
    widths += [c[::-1][i]] * (u.layers_per_block + 1) * (kind == "CrossAttnUpBlock3D")
  return widths


@pytest.mark.slow
def test_modelscope_param_counts():
  _, plain = _modelscope_abstract("detail=0")
  assert _count(plain) == MODELSCOPE_PARAMS

  u, detail = _modelscope_abstract("detail=1")
  # Decoupled attention adds to_k_detail/to_v_detail [detail_dim, C] per spatial transformer.
  extra = sum(2 * u.detail_dim * c for c in _spatial_transformer_widths(u))
  assert _count(detail) == MODELSCOPE_PARAMS + extra

  u, sr_params = _modelscope_abstract("detail=1", key="sr_unet")
  c0 = u.block_out_channels[0]
  sr_extra = (9 * u.cond_channels * c0                                   # wider conv_in
              + (c0 * 4 * c0 + 4 * c0) + (4 * c0 * 4 * c0 + 4 * c0))    # noise_level_embedding
  assert _count(sr_params) == MODELSCOPE_PARAMS + extra + sr_extra


def torch_to_flax(name: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  """diffusers ``(name, tensor)`` -> our ``(param path, array)`` (``persvid_jax.convert``)."""
  path, array = torch_layout(unet3d_convert.diffusers_path(name), array)
  return tuple(path.split("/")), array


def _torch_shapes(torch_model) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Our param path -> shape, for every parameter of a (meta-device) torch model."""
  out = {}
  for name, p in torch_model.named_parameters():
    path, array = torch_to_flax(name, np.empty(tuple(p.shape), np.float32))
    out[path] = array.shape
  return out


@pytest.mark.slow
def test_layout_matches_diffusers_default():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):
    reference = diffusers.UNet3DConditionModel()
  theirs = _torch_shapes(reference)
  _, plain = _modelscope_abstract("detail=0")
  ours = {k: tuple(v.shape) for k, v in _flat(plain).items()}
  assert sorted(set(theirs) - set(ours)) == []
  assert sorted(set(ours) - set(theirs)) == []
  assert {k: v for k, v in ours.items() if theirs[k] != v} == {}
  # Heads: diffusers uses attention_head_dim (64) as the head *width*.
  attn = reference.down_blocks[0].attentions[0].transformer_blocks[0].attn1
  assert attn.heads == 320 // 64
  assert reference.transformer_in.transformer_blocks[0].attn1.heads == 8


def _tiny_diffusers_pair(torch, diffusers):
  """The tiny base config (no detail attention) and the same diffusers model."""
  u = config_lib.load_config("tiny:detail=0").unet
  u.transformer_in_heads = 8          # hard-coded in diffusers
  torch.manual_seed(0)
  reference = diffusers.UNet3DConditionModel(
      in_channels=u.in_channels, out_channels=u.out_channels,
      block_out_channels=tuple(u.block_out_channels),
      down_block_types=tuple(u.down_block_types), up_block_types=tuple(u.up_block_types),
      layers_per_block=u.layers_per_block, norm_num_groups=u.norm_num_groups,
      norm_eps=u.norm_eps, cross_attention_dim=u.cross_attention_dim,
      attention_head_dim=u.head_dim).eval()
  with torch.no_grad():
    for p in reference.parameters():    # make zero-initialised layers non-trivial
      p.add_(0.05 * torch.randn_like(p))
  return u, reference


def diffusers_forward(torch, reference, inputs) -> np.ndarray:
  """The diffusers model's output on our (channels-last) inputs, channels-last."""
  with torch.no_grad():
    ref = reference(torch.from_numpy(inputs["x"]).permute(0, 4, 1, 2, 3),
                    torch.from_numpy(inputs["t"]).long(),
                    torch.from_numpy(inputs["context"])).sample
  return ref.permute(0, 2, 3, 4, 1).numpy()


def test_forward_matches_diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  u, reference = _tiny_diffusers_pair(torch, diffusers)
  # Odd width: exercises the upsampling to the skip's size (7 -> 4 -> 7).
  inputs = _inputs(u, batch=2, frames=3, height=8, width=7, text_len=5)
  model = UNet3D.from_config(u)
  params = {}
  for name, p in reference.named_parameters():
    path, array = torch_to_flax(name, p.detach().numpy())
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = jnp.asarray(array)
  abstract = _abstract(model, inputs)["params"]
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  assert _count(abstract) == sum(p.numel() for p in reference.parameters())

  out = np.asarray(_apply_fn(model)({"params": params}, inputs))
  ref = diffusers_forward(torch, reference, inputs)
  np.testing.assert_allclose(out, ref, atol=5e-5, rtol=1e-4)


# ----------------------------------------------------------------------------
# 3. Decoupled detail cross-attention.
# ----------------------------------------------------------------------------

def test_detail_attention(base, base_out):
  inputs = dict(base.inputs)
  # detail_scale is traced, so scale 0 and 1 share one compile.
  at_zero = np.asarray(base.apply(base.variables, {**inputs, "detail_scale": np.float32(0.0)}))
  at_one = np.asarray(base.apply(base.variables, {**inputs, "detail_scale": np.float32(1.0)}))
  per_sample = np.asarray(base.apply(base.variables,
                                     {**inputs, "detail_scale": np.array([0.0, 1.0], np.float32)}))
  no_tokens = np.asarray(base.apply(base.variables,
                                    {k: v for k, v in inputs.items() if k != "detail_tokens"}))
  np.testing.assert_allclose(at_one, base_out, atol=1e-6)  # default scale = config's 1.0
  assert np.abs(at_one - at_zero).max() > 1e-3             # the detail tokens matter
  np.testing.assert_allclose(at_zero, no_tokens, atol=1e-6)  # scale 0 == no tokens
  np.testing.assert_array_equal(per_sample[0], at_zero[0])  # [B] scales act per sample
  np.testing.assert_array_equal(per_sample[1], at_one[1])

  params = _flat(base.variables["params"])
  detail_keys = [k for k in params if k[-2] in ("to_k_detail", "to_v_detail")]
  assert len(detail_keys) == 2 * len(_spatial_transformer_widths(base.cfg))
  assert all(k[-3] == "attn2" for k in detail_keys)


def test_context_mask_hides_tokens(base, base_out):
  keep = 5
  mask = np.zeros(base.inputs["context"].shape[:2], bool)
  mask[:, :keep] = True
  other = base.inputs["context"].copy()
  other[:, keep:] = np.random.default_rng(1).standard_normal(other[:, keep:].shape)
  # Same shapes and mask: one compile; masked-out tokens must not matter.
  masked = base.apply(base.variables, {**base.inputs, "context_mask": mask})
  masked_other = base.apply(base.variables,
                            {**base.inputs, "context": other, "context_mask": mask})
  np.testing.assert_allclose(np.asarray(masked), np.asarray(masked_other), atol=1e-6)
  assert np.abs(np.asarray(masked) - base_out).max() > 1e-4


def test_no_detail_params_when_disabled(base):
  u = config_lib.load_config("tiny:detail=0").unet
  inputs = {k: v for k, v in base.inputs.items() if k != "detail_tokens"}
  plain = _abstract(UNet3D.from_config(u), inputs)["params"]
  assert not [k for k in _flat(plain) if any("detail" in p for p in k)]
  # Init without detail tokens still creates the branch when it is enabled.
  with_flag = _abstract(base.model, inputs)
  assert jax.tree.structure(with_flag) == jax.tree.structure(base.variables)


# ----------------------------------------------------------------------------
# 4. The SR network's spatial kernel (claim 7).
# ----------------------------------------------------------------------------

def _conv_eqns(model, inputs, variables):
  args, kwargs = _call_args(inputs)
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, *args, **kwargs))(variables)
  return [e for e in _iter_eqns(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]


@pytest.mark.parametrize("variant,kernel,dilation", [
    ("sr_kernel=5", 5, 1), ("sr_kernel=3,sr_dilation=2", 3, 2)])
def test_sr_spatial_kernel(variant, kernel, dilation, sr):
  u = config_lib.load_config(f"tiny:{variant}").sr_unet
  assert (u.spatial_kernel_size, u.spatial_dilation) == (kernel, dilation)
  model = UNet3D.from_config(u)
  inputs = _inputs(u, frames=2)
  abstract = _abstract(model, inputs)
  params = _flat(abstract["params"])

  resnet_convs = {k: v for k, v in params.items()
                  if any(p.startswith("resnets_") for p in k) and k[-2] in ("conv1", "conv2")
                  and k[-1] == "kernel"}
  assert len(resnet_convs) == 2 * _num_resnets(u)
  assert all(v.shape[:2] == (kernel, kernel) for v in resnet_convs.values())
  # conv_in / conv_out / down- and upsamplers keep 3x3.
  for k, v in params.items():
    if k[-1] == "kernel" and (k[0] in ("conv_in", "conv_out") or "samplers" in k[-3]):
      assert v.shape[:2] == (3, 3), k
  # The kernel size and dilation reach exactly the resnets' convs in the traced forward.
  convs = _conv_eqns(model, inputs, abstract)

  def is_resnet_conv(e):
    return (e.invars[1].aval.shape[:2] == (kernel, kernel)
            and e.params["rhs_dilation"] == (dilation, dilation))

  assert sum(map(is_resnet_conv, convs)) == 2 * _num_resnets(u)
  for e in convs:
    if not is_resnet_conv(e):
      assert set(e.params["rhs_dilation"]) == {1}
      assert e.invars[1].aval.shape[:2] != (kernel, kernel) or kernel == 3

  # And the network runs.
  if variant == "sr_kernel=5":
    assert u == sr.cfg   # the tiny default SR kernel is 5: reuse the initialised one
    inputs, out = sr.inputs, sr.apply(sr.variables, sr.inputs)
  else:
    out = _apply_fn(model)(_numpy_params(abstract), inputs)
  assert out.shape == inputs["x"].shape[:-1] + (u.out_channels,)
  assert np.isfinite(np.asarray(out)).all()


class _ConvChain(nn.Module):
  """``n`` spatial convs with all-ones kernels, no norms (support = receptive field)."""
  n: int
  kernel: int
  dilation: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.n):
      x = video_conv.spatial_conv(1, self.kernel, self.dilation, name=f"conv{i}",
                              kernel_init=nn.initializers.ones_init())(x)
    return x


@pytest.mark.parametrize("kernel,dilation", [(3, 1), (5, 1), (3, 2)])
@pytest.mark.parametrize("n", [1, 2])
def test_spatial_conv_impulse_support(kernel, dilation, n):
  field = unet3d.spatial_receptive_field(kernel, dilation, n)
  assert field == n * (kernel - 1) * dilation + 1
  size = field + 6
  c = size // 2
  impulse = np.zeros((1, 1, size, size, 1), np.float32)    # [B, T, H, W, C]
  impulse[0, 0, c, c, 0] = 1.0
  chain = _ConvChain(n, kernel, dilation)
  variables = nn.meta.unbox(chain.init(jax.random.key(0), impulse))
  out = np.asarray(jax.jit(chain.apply)(variables, impulse))[0, 0, :, :, 0]
  assert out.shape == (size, size)                          # SAME padding keeps the size
  rows, cols = np.nonzero(out)
  assert rows.max() - rows.min() + 1 == field
  assert cols.max() - cols.min() + 1 == field
  # Exactly the taps on the dilation grid within the field are reached.
  offsets = np.arange(size) - c
  on_grid = (np.abs(offsets) <= (field - 1) // 2) & (offsets % dilation == 0)
  np.testing.assert_array_equal(out != 0, on_grid[:, None] & on_grid[None, :])
  if dilation == 2 and n == 1:
    np.testing.assert_array_equal(np.nonzero(out[c])[0] - c, [-2, 0, 2])


def test_receptive_field_helper():
  assert unet3d.spatial_receptive_field(3, 1, 2) == 5
  assert unet3d.spatial_receptive_field(5, 1, 2) == 9
  assert unet3d.spatial_receptive_field(3, 2, 2) == 9   # 5x5 reach with 3x3 weights


# ----------------------------------------------------------------------------
# 5. Remat and sharding.
# ----------------------------------------------------------------------------

def test_remat_same_params_and_traces_grad(base):
  model = UNet3D(spec=dataclasses.replace(base.model.spec, remat=True))
  assert jax.tree.structure(_abstract(model, base.inputs)) == jax.tree.structure(base.variables)
  args, kwargs = _call_args(base.inputs)

  def loss(v):
    return jnp.mean(model.apply(v, *args, **kwargs) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss))(base.variables)
  names = {e.primitive.name for e in _iter_eqns(jaxpr.jaxpr)}
  assert names & {"checkpoint", "remat", "remat2"}, sorted(names)


@pytest.mark.slow
def test_sharded_init_and_forward(tiny_config):
  u = tiny_config.unet
  model = UNet3D.from_config(u)
  mesh = sh.make_mesh(data=4, fsdp=2)
  inputs = _inputs(u, batch=8, frames=2, height=8, width=8)
  args, kwargs = _call_args(inputs)
  key = jax.random.key(0)
  # Boxed abstract variables carry the logical axis names param_shardings reads.
  shardings = sh.param_shardings(jax.eval_shape(lambda k: model.init(k, *args, **kwargs), key),
                                 mesh)
  init = _init_fn(model, inputs)
  variables = jax.jit(init, out_shardings=shardings)(key)

  kernel = variables["params"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
  assert "fsdp" in jax.tree.leaves(tuple(kernel.sharding.spec))
  assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 2
  sharded = [leaf for leaf in jax.tree.leaves(variables)
             if "fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec))]
  assert len(sharded) > 20

  batch_sh = {k: sh.batch_sharding(mesh, np.ndim(v)) for k, v in inputs.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sh.LOGICAL_RULES):
    forward = jax.jit(lambda v, x: model.apply(v, *_call_args(x)[0], **_call_args(x)[1]),
                      in_shardings=(shardings, batch_sh))
    # Activations carry the batch constraint at block boundaries.
    assert "sharding_constraint" in str(jax.make_jaxpr(forward)(variables, inputs))
    out = forward(variables, {k: jax.device_put(v, batch_sh[k]) for k, v in inputs.items()})
  assert out.sharding.spec[0] == ("data", "fsdp")

  host_vars = jax.device_get(variables)
  expected = _apply_fn(model)(host_vars, inputs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------
# 6. The cross-attention cache (keys and values once per video).
# ----------------------------------------------------------------------------

def _fill(model, variables, inputs):
  """The cache ``stack.kv_cache_fn`` fills for ``inputs`` (jitted: projections only)."""
  args, kwargs = _call_args(inputs)
  return jax.jit(stack.kv_cache_fn(model))(variables["params"], *args, **kwargs)


@pytest.mark.parametrize("kind", ["base", "sr"])
def test_kv_cache_gives_the_same_output(kind, request):
  """Applied with its filled cache (and garbage text), the network gives its output."""
  s = request.getfixturevalue(kind)
  cache = _fill(s.model, s.variables, s.inputs)
  flat = _flat(cache)
  # Text k/v of every spatial transformer's attn2 (detail k/v too in the base),
  # nothing for the temporal ones (their attn2 attends to the frames).
  spatial = {p[:-1] for p in _flat(s.variables["params"]) if p[-2:] == ("to_k", "kernel")
             and p[-3] == "attn2" and not any(q.startswith(("temp_", "transformer_in"))
                                              for q in p)}
  names = {"k", "v", "detail_k", "detail_v"} if s.cfg.detail_cross_attention else {"k", "v"}
  assert spatial and {p[:-1] for p in flat} == {p[:-1] for p in spatial}
  assert {p[-1] for p in flat} == names
  b, lc = s.inputs["context"].shape[:2]
  assert all(leaf.shape[:2] == (b, lc) for p, leaf in flat.items() if p[-1] in ("k", "v"))
  want = np.asarray(s.apply(s.variables, s.inputs))
  garbage = {k: (v * 0 + 7 if k in ("context", "detail_tokens") else v)
             for k, v in s.inputs.items()}
  got = s.apply({**s.variables, video_transformer.KV_CACHE: cache}, garbage)
  np.testing.assert_array_equal(np.asarray(got), want)



def test_padded_keys_with_lengths_attend_as_unpadded():
  """What a cache padded for cuDNN holds (``pad_keys``: 77 -> 78 keys, lengths 77)
  gives XLA's attention the unpadded result: the pad key is masked out."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 12, 16), np.float32)) for _ in range(3))
  k, v = k[:, :7], v[:, :7]
  kp, vp, lengths = attention.pad_keys(k, v)
  assert kp.shape == (2, 8, 16) and lengths.tolist() == [7, 7]
  want = attention.dot_product_attention(q, k, v, num_heads=2)
  got = attention.dot_product_attention(q, kp, vp, num_heads=2, kv_lengths=lengths)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# 7. Nearest upsampling.
# ----------------------------------------------------------------------------

def _gathered(x, size):
  """torch's nearest rule by index, as a gather (the reference)."""
  rows = (np.arange(size[0]) * x.shape[2]) // size[0]
  cols = (np.arange(size[1]) * x.shape[3]) // size[1]
  return x[:, :, rows][:, :, :, cols]


@pytest.mark.parametrize("size", [(8, 10), (12, 15), (7, 9)])
def test_nearest_upsampling_is_torchs_rule(size):
  """An integer factor (2x, 3x) is a broadcast whose gradient sums each pixel's
  copies; another size (an odd skip) gathers; both give torch's pixels."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 4, 5, 6)).astype(np.float32)
  got = video_conv._nearest_resize_hw(jnp.asarray(x), size)
  np.testing.assert_array_equal(np.asarray(got), _gathered(x, size))
  w = rng.standard_normal(got.shape).astype(np.float32)
  g = jax.grad(lambda v: jnp.sum(video_conv._nearest_resize_hw(v, size) * w))(jnp.asarray(x))
  ref = jax.grad(lambda v: jnp.sum(v[:, :, (np.arange(size[0]) * 4) // size[0]]
                                   [:, :, :, (np.arange(size[1]) * 5) // size[1]] * w))(
      jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-5, atol=1e-6)
  if size[0] % 4 == 0 and size[1] % 5 == 0:
    assert "gather" not in str(jax.make_jaxpr(
        lambda v: video_conv._nearest_resize_hw(v, size))(x))
