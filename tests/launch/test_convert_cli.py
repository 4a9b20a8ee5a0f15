"""``launch.convert`` end to end: a tiny CLIPModel (with its tokenizer), a tiny diffusers
UNet3D and AutoencoderKL, saved by their libraries, converted in a chain; ``--model`` loads
the result and its networks compute what torch computes. Bad sources exit 2 with one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.concepts.test_tokens import _write_tiny_clip_dir
from tests.launch.test_concepts_generate_cli import _run, _start

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

VOCAB = 2 * 256 + 8        # the tiny CLIP tokenizer's size


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("sources")
  torch.manual_seed(0)
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=24, eos_token_id=VOCAB - 1,
              bos_token_id=VOCAB - 2, pad_token_id=VOCAB - 1)
  vision = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, image_size=32, patch_size=8)
  clip_model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=text, vision_config=vision, projection_dim=16)).eval()
  clip_model.save_pretrained(root / "clip")
  _write_tiny_clip_dir(root / "clip")
  from tests.models.test_unet3d import _tiny_diffusers_pair
  _, unet = _tiny_diffusers_pair(torch, diffusers)
  unet.save_pretrained(root / "unet")
  from tests.convert.test_vae import _tiny_diffusers_vae
  vae = _tiny_diffusers_vae(torch, diffusers)
  vae.save_pretrained(root / "vae", safe_serialization=True)
  return root, clip_model, unet, vae


@pytest.mark.slow
def test_convert_chain_loads_as_a_model(tmp_path, sources):
  root, clip_model, unet, vae = sources
  m1, m2, m3 = tmp_path / "m1", tmp_path / "m2", tmp_path / "m3"
  r = _run("launch.convert", "--kind", "clip", "--src", root / "clip", "--out", m1,
           "--config", "configs/tiny.py")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "converted image_encoder, text_encoder" in r.stdout
  r = _run("launch.convert", "--kind", "unet3d", "--src", root / "unet", "--out", m2,
           "--from", m1)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "new in persvid" in r.stdout          # the detail attention of the tiny config
  info = json.loads((m2 / "convert.json").read_text())
  assert info["networks"] == ["unet"] and info["from_model"] == str(m1.resolve())
  assert info["peak_host_memory_gib"] > 0 and all("detail" in p for p in info["new"])
  r = _run("launch.convert", "--kind", "vae", "--src", root / "vae", "--out", m3,
           "--from", m2)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "converted vae" in r.stdout

  from persvid_jax.pipeline import model as model_lib
  # The VAE sits beside the six networks: found along the chain when asked for.
  config, found, _ = model_lib.collect_networks([m3], networks=("vae",), fill_missing=False)
  assert tuple(config.vae.block_out_channels) == (32, 64) and config.vae.latent_channels == 4
  np.testing.assert_array_equal(found["vae"]["decoder"]["conv_in"]["kernel"],
                                vae.decoder.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0))
  model = model_lib.load_model(m3)
  assert model.config.vae.norm_num_groups == 8
  by_network = {n: s for s in model.info["sources"] for n in s["networks"]}
  assert by_network["unet"]["workdir"] == str(m2.resolve())
  assert by_network["text_encoder"]["workdir"] == str(m1.resolve())
  assert by_network["image_encoder"]["workdir"] == str(m1.resolve())
  assert set(by_network["sr_unet"]) >= {"init_seed"}
  # The model's tokenizer is the CLIP one from --src, placeholders after its vocabulary.
  assert model.tokenizer.placeholder_start == VOCAB
  ids = model.tokenizer.encode(["a red dog"])
  states, _ = model.stack.text_encoder.apply({"params": model.params["text_encoder"]}, ids)
  with torch.no_grad():
    ref = clip_model.text_model(torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state
  rel = np.abs(np.asarray(states) - ref.numpy()).max() / np.abs(ref.numpy()).max()
  assert rel <= 1e-4, rel
  k = model.params["unet"]["conv_in"]["kernel"]
  np.testing.assert_array_equal(k, unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0))


def test_bad_sources_exit_2(tmp_path, sources):
  root = sources[0]
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "config.json").write_text('{"model_type": "clip_text_model"}')
  (pickled / "pytorch_model.bin").write_bytes(b"x")
  (tmp_path / "taken").mkdir()
  cases = [
      (["--kind", "clip", "--src", pickled, "--out", tmp_path / "a"], "pickle"),
      (["--kind", "clip", "--src", root / "clip", "--out", tmp_path / "taken"], "exists"),
      (["--kind", "unet3d", "--src", root / "clip", "--out", tmp_path / "b"],
       "not a UNet3DConditionModel"),
      (["--kind", "vae", "--src", root / "unet", "--out", tmp_path / "d"],
       "not an AutoencoderKL"),
      (["--kind", "clip", "--src", tmp_path / "nope", "--out", tmp_path / "c"],
       "not a directory"),
  ]
  procs = [(_start("launch.convert", *args, "--config", "configs/tiny.py"), args, match)
           for args, match in cases]
  for p, args, match in procs:
    _, stderr = p.communicate(timeout=600)
    lines = stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and match in lines[0], (args, stderr[-2000:])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["pickled", "taken"]
