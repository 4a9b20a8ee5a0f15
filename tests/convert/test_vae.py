"""diffusers AutoencoderKL import: save_pretrained -> safetensors -> our VAE, encode and
decode equal to torch's (images, and videos frame by frame); bad checkpoints and
unsupported configs fail naming the tensor, file or option."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from persvid_jax.convert import ConvertError, common
from persvid_jax.convert import vae as convert
from persvid_jax.models.vae import AutoencoderKL, VAESpec

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _tiny_diffusers_vae(torch, diffusers, seed=0):
  """A random ``AutoencoderKL`` (2 blocks of 32/64, 1 layer, 8 groups, 4 latents).

  Norm scales/biases and every bias are perturbed too (diffusers inits them to
  1/0, which would hide a norm or bias that is dropped or swapped).
  """
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(
      block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
      latent_channels=4).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
  return model


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  reference = _tiny_diffusers_vae(torch, diffusers)
  d = tmp_path_factory.mktemp("vae")
  reference.save_pretrained(d, safe_serialization=True)
  return reference, d


def test_vae_matches_diffusers_through_safetensors(saved):
  reference, d = saved
  cfg = convert.vae_config(common.read_config(d))
  assert cfg["block_out_channels"] == (32, 64) and cfg["latent_channels"] == 4
  params = convert.vae_params(common.read_state(d), cfg, source=str(d))
  model = AutoencoderKL.from_config(cfg)
  assert model.spec.downsample_factor == 2

  @jax.jit
  def run(params, images, video, video_latents):
    apply = functools.partial(model.apply, {"params": params})
    mean, logvar = apply(images, method="encode")
    v_mean, v_logvar = apply(video, method="encode_video")
    return (mean, logvar, apply(mean, method="decode"), v_mean, v_logvar,
            apply(video_latents, method="decode_video"))

  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  video = rng.uniform(-1, 1, (1, 3, 32, 32, 3)).astype(np.float32)   # 3 frames
  video_latents = rng.standard_normal((1, 3, 16, 16, 4)).astype(np.float32)
  mean, logvar, recon, v_mean, v_logvar, v_decoded = run(params, images, video, video_latents)
  assert mean.shape == logvar.shape == (2, 16, 16, 4) and recon.shape == images.shape
  assert v_mean.shape == (1, 3, 16, 16, 4) and v_decoded.shape == (1, 3, 32, 32, 3)

  with torch.no_grad():
    post = reference.encode(_nchw(images)).latent_dist
    ref_recon = reference.decode(post.mean).sample
    # diffusers has no video API: per frame is the frames as a batch.
    v_post = reference.encode(_nchw(video[0])).latent_dist
    ref_v_decoded = reference.decode(_nchw(video_latents[0])).sample
  errors = dict(mean=_rel(mean, _nhwc(post.mean)), logvar=_rel(logvar, _nhwc(post.logvar)),
                decode=_rel(recon, _nhwc(ref_recon)),
                video_mean=_rel(v_mean[0], _nhwc(v_post.mean)),
                video_logvar=_rel(v_logvar[0], _nhwc(v_post.logvar)),
                video_decode=_rel(v_decoded[0], _nhwc(ref_v_decoded)))
  print("parity vae:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) <= 1e-4, errors


def test_legacy_attention_names_convert_the_same(saved):
  """Checkpoints from diffusers < 0.14 name the attention query/key/value/proj_attn."""
  _, d = saved
  cfg = convert.vae_config(common.read_config(d))
  state = common.read_state(d)
  legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
             .replace("to_out.0.", "proj_attn."): v for k, v in state.items()}
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  a = convert.vae_params(state, cfg)
  b = convert.vae_params(legacy, cfg)
  assert jax.tree.all(jax.tree.map(np.array_equal, a, b))


def _damaged(d, tmp_path, edit):
  state = {k: np.array(v) for k, v in common.read_state(d).items()}
  edit(state)
  from safetensors.numpy import save_file
  out = tmp_path / "damaged"
  out.mkdir()
  save_file(state, str(out / "diffusion_pytorch_model.safetensors"))
  (out / "config.json").write_text((d / "config.json").read_text())
  return out


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("decoder.up_blocks.1.resnets.0.conv_shortcut.bias"),
     "1 missing: decoder/up_blocks_1/resnets_0/conv_shortcut/bias"),
    (lambda s: s.update({"encoder.mid_block.attentions.0.to_k.weight":
                         np.zeros((64, 32), np.float32)}),
     "wrong shape: encoder.mid_block.attentions.0.to_k.weight -> "
     "encoder/mid_block/attentions_0/to_k/kernel: (32, 64) != (64, 64)"),
    (lambda s: s.update({"quant_conv.bias": np.zeros((8,), np.int64)}),
     "'quant_conv.bias' has dtype int64"),
    (lambda s: s.update({"encoder.down_blocks.2.resnets.0.norm1.weight":
                         np.ones(64, np.float32)}),
     "1 unexpected: encoder.down_blocks.2.resnets.0.norm1.weight"),
])
def test_bad_checkpoint_names_the_tensor(saved, tmp_path, edit, match):
  _, d = saved
  bad = _damaged(d, tmp_path, edit)
  cfg = convert.vae_config(common.read_config(bad))
  with pytest.raises(ConvertError, match=match.replace("(", r"\(").replace(")", r"\)")):
    convert.vae_params(common.read_state(bad, convert.WEIGHTS_FILES), cfg, source=str(bad))


def test_pickle_and_non_safetensors_are_refused(saved, tmp_path):
  _, d = saved
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text((d / "config.json").read_text())
  (pickled / "diffusion_pytorch_model.bin").write_bytes(b"anything")
  with pytest.raises(ConvertError, match="only pickle checkpoints "
                                         r"\(diffusion_pytorch_model.bin\)"):
    common.read_state(pickled, convert.WEIGHTS_FILES)
  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"no json!")
  with pytest.raises(ConvertError, match="diffusion_pytorch_model.safetensors is not a "
                                         "safetensors file"):
    common.read_state(junk, convert.WEIGHTS_FILES)


def test_vae_config_refuses_what_we_do_not_implement(saved):
  _, d = saved
  hf = json.loads((d / "config.json").read_text())
  with pytest.raises(ConvertError, match="not an AutoencoderKL"):
    convert.vae_config(dict(hf, _class_name="AutoencoderTiny"))
  with pytest.raises(ConvertError, match=r"up_block_types=.*AttnUpDecoderBlock2D"):
    convert.vae_config(dict(hf, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]))
  with pytest.raises(ConvertError, match="latents_mean .*; act_fn='gelu'|act_fn='gelu'.*"
                                         "latents_mean"):
    convert.vae_config(dict(hf, latents_mean=[0.0] * 4, act_fn="gelu"))
  with pytest.raises(ConvertError, match=r"unknown options \['norm_type'\]"):
    convert.vae_config(dict(hf, norm_type="spatial"))
  with pytest.raises(ConvertError, match="block width 32 must be divisible by norm_num_groups 5"):
    convert.vae_params({}, convert.vae_config(dict(hf, norm_num_groups=5)))


def test_latent_scaling_round_trips():
  """diffusion sees ``(z - shift) * scale``; SD3/Flux-style VAEs have a shift."""
  spec = VAESpec(block_out_channels=(32,), norm_num_groups=8, scaling_factor=1.5305,
                 shift_factor=0.0609)
  z = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
  np.testing.assert_allclose(spec.scale_latents(z), (z - 0.0609) * 1.5305, rtol=1e-6)
  np.testing.assert_allclose(spec.unscale_latents(spec.scale_latents(z)), z, atol=1e-6)
  assert VAESpec.from_config(dict(block_out_channels=[64], norm_num_groups=32)
                             ).scale_latents(1.0) == pytest.approx(0.18215)
