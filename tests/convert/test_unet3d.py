"""diffusers UNet3D import: save_pretrained -> safetensors -> our generator, outputs equal;
the SR network's extra inputs and larger kernels start as the checkpoint's function."""

from __future__ import annotations

import numpy as np
import pytest

from persvid_jax import config_lib
from persvid_jax.convert import ConvertError, common
from persvid_jax.convert import unet3d as convert
from persvid_jax.models.unet3d import UNet3D
from tests.models.test_unet3d import (_abstract, _apply_fn, _inputs, _tiny_diffusers_pair,
                                      diffusers_forward)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  u, reference = _tiny_diffusers_pair(torch, diffusers)
  d = tmp_path_factory.mktemp("unet")
  reference.save_pretrained(d)          # config.json + diffusion_pytorch_model.safetensors
  return u, reference, d


def test_unet3d_matches_diffusers_through_safetensors(saved):
  u, reference, d = saved
  cfg = convert.unet_config(common.read_config(d))
  for k, v in cfg.items():
    assert tuple(u[k]) == v if isinstance(v, tuple) else u[k] == v, k
  model = UNet3D.from_config(u)
  inputs = _inputs(u, batch=2, frames=3, height=8, width=7, text_len=5)
  abstract = common.nn_unbox(_abstract(model, inputs)["params"])
  params, report = convert.unet_params(common.read_state(d), abstract, source=str(d))
  assert report == {"new": [], "widened": []}
  out = np.asarray(_apply_fn(model)({"params": params}, inputs))
  ref = diffusers_forward(torch, reference, inputs)
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  print(f"parity unet3d: {rel:.1e}")
  assert rel <= 1e-4, rel


def test_sr_network_starts_as_the_checkpoint(saved):
  """Into our SR network (5x5 spatial kernels, +3 input channels, detail attention,
  noise-level embedding): the converted network computes the checkpoint's function,
  whatever the upsampled video, the detail tokens and the noise level."""
  u, reference, d = saved
  sr = config_lib.load_config("tiny:detail=1").sr_unet
  sr.update(convert.unet_config(common.read_config(d)))
  sr.spatial_kernel_size = 5
  model = UNet3D.from_config(sr)
  inputs = _inputs(sr, batch=2, frames=2, height=8, width=8, text_len=5)
  abstract = common.nn_unbox(_abstract(model, inputs)["params"])
  state = common.read_state(d)
  params, report = convert.unet_params(state, abstract, network="sr_unet", source=str(d))
  assert report["new"] and all(convert.NEW_PARAMS.search(p) for p in report["new"])
  assert any(p.startswith("noise_level_embedding/") for p in report["new"])
  assert "conv_in/kernel" in report["widened"]
  k = params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
  src = np.asarray(state["down_blocks.0.resnets.0.conv1.weight"]).transpose(2, 3, 1, 0)
  assert k.shape[:2] == (5, 5)
  np.testing.assert_array_equal(k[1:4, 1:4], src)

  out = np.asarray(_apply_fn(model)({"params": params}, inputs))
  ref = diffusers_forward(torch, reference, inputs)
  assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-4


def test_unet_config_refuses_other_models():
  with pytest.raises(ConvertError, match="not a UNet3DConditionModel"):
    convert.unet_config({"_class_name": "UNet2DConditionModel"})
  with pytest.raises(ConvertError, match="one head width"):
    convert.unet_config({"_class_name": "UNet3DConditionModel",
                         "attention_head_dim": [5, 10, 20, 20]})
  with pytest.raises(ConvertError, match="not a UNet3DConditionModel"):
    convert.unet_config({"model_type": "clip"})
