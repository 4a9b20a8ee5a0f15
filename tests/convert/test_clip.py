"""CLIP import: transformers' CLIP towers (random weights, saved with save_pretrained)
convert to our encoders with outputs equal to torch's; bad checkpoints fail by name."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from persvid_jax.convert import ConvertError, clip, common
from persvid_jax.models.image_encoder import ImageEncoder, clip_normalize
from persvid_jax.models.text_encoder import TextEncoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EOS = 5
PLACEHOLDERS = 3


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(
      vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
      eos_token_id=EOS, bos_token_id=1, pad_token_id=0, projection_dim=8)
  model = transformers.CLIPTextModelWithProjection(cfg).eval()
  d = tmp_path_factory.mktemp("clip_text")
  model.save_pretrained(d)
  return d, model


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory):
  torch.manual_seed(1)
  cfg = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      image_size=24, patch_size=8, projection_dim=16, hidden_act="quick_gelu")
  model = transformers.CLIPVisionModelWithProjection(cfg).eval()
  d = tmp_path_factory.mktemp("clip_vision")
  model.save_pretrained(d)
  return d, model


def _text_model(d):
  t = clip.text_config(common.read_config(d), num_placeholders=PLACEHOLDERS)
  enc = TextEncoder(vocab_size=t["vocab_size"], max_length=t["max_length"], width=t["width"],
                    layers=t["layers"], heads=t["heads"], mlp_dim=t["mlp_dim"], act=t["act"],
                    layer_norm_eps=t["layer_norm_eps"], eos_token_id=EOS)
  ids = np.zeros((1, 4), np.int32)
  abstract = jax.eval_shape(lambda: enc.init(jax.random.key(0), ids))["params"]
  return enc, common.nn_unbox(abstract)


def test_text_tower_matches_transformers(text_dir):
  d, model = text_dir
  assert list(d.glob("*.safetensors")), "save_pretrained wrote no safetensors"
  enc, abstract = _text_model(d)
  params = clip.text_encoder_params(common.read_state(d), abstract, source=str(d))
  rng = np.random.default_rng(0)
  ids = rng.integers(6, 99, size=(3, 12)).astype(np.int32)
  ids[:, 0] = 1
  ids[0, 5], ids[1, 11], ids[2, 8] = EOS, EOS, EOS     # EOS at different places
  states, pooled = enc.apply({"params": params}, ids)
  with torch.no_grad():
    ref = model.text_model(torch.from_numpy(ids.astype(np.int64)))
  errors = dict(states=_rel(states, ref.last_hidden_state.numpy()),
                pooled=_rel(pooled, ref.pooler_output.numpy()))
  print("parity clip text:", {k: f"{v:.1e}" for k, v in errors.items()})   # README
  assert max(errors.values()) <= 1e-4, errors
  # Placeholder rows: appended after the vocabulary, at the mean embedding.
  table = params["token_embedding"]["embedding"]
  assert table.shape == (99 + PLACEHOLDERS, 32)
  np.testing.assert_allclose(table[99:], np.broadcast_to(table[:99].mean(0), (3, 32)),
                             rtol=1e-6)


def test_vision_tower_matches_transformers(vision_dir):
  d, model = vision_dir
  v = clip.image_config(common.read_config(d))
  enc = ImageEncoder(**v)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)
  abstract = common.nn_unbox(
      jax.eval_shape(lambda: enc.init(jax.random.key(0), images))["params"])
  params = clip.image_encoder_params(common.read_state(d), abstract, source=str(d))
  feats = enc.apply({"params": params}, images)
  pixels = np.array(clip_normalize(images)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(pixels))
  with torch.no_grad():
    pooled = model.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output
  errors = dict(image_embeds=_rel(feats.image_embeds, ref.image_embeds.numpy()),
                patch_tokens=_rel(feats.patch_tokens, ref.last_hidden_state[:, 1:].numpy()),
                pooled=_rel(feats.pooled, pooled.numpy()))
  print("parity clip vision:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) <= 1e-4, errors


def _damaged(d, tmp_path, edit):
  state = {k: np.array(v) for k, v in common.read_state(d).items()}
  edit(state)
  from safetensors.numpy import save_file
  out = tmp_path / "damaged"
  out.mkdir()
  save_file(state, str(out / "model.safetensors"))
  (out / "config.json").write_text((d / "config.json").read_text())
  return out


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("text_model.encoder.layers.1.mlp.fc2.bias"),
     "1 missing: encoder/layers_1/mlp/fc2/bias"),
    (lambda s: s.update({"text_model.encoder.layers.0.mlp.fc1.weight":
                         np.zeros((63, 32), np.float32)}),
     "wrong shape: text_model.encoder.layers.0.mlp.fc1.weight -> encoder/layers_0/mlp/fc1/kernel"),
    (lambda s: s.update({"text_model.final_layer_norm.bias": np.zeros((32,), np.int32)}),
     "'text_model.final_layer_norm.bias' has dtype int32"),
    (lambda s: s.update({"text_model.encoder.layers.2.mlp.fc1.bias": np.zeros(64, np.float32)}),
     "1 unexpected: text_model.encoder.layers.2.mlp.fc1.bias"),
])
def test_bad_text_checkpoint_names_the_tensor(text_dir, tmp_path, edit, match):
  d, _ = text_dir
  bad = _damaged(d, tmp_path, edit)
  _, abstract = _text_model(d)
  with pytest.raises(ConvertError, match=match.replace("(", r"\(").replace(")", r"\)")):
    clip.text_encoder_params(common.read_state(bad), abstract, source=str(bad))


def test_not_safetensors_and_pickle_are_refused(text_dir, tmp_path):
  d, _ = text_dir
  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
  with pytest.raises(ConvertError, match="not a safetensors file"):
    common.read_state(junk)
  truncated = tmp_path / "truncated"
  truncated.mkdir()
  data = next(d.glob("*.safetensors")).read_bytes()
  (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(ConvertError, match="truncated or corrupt"):
    common.read_state(truncated)
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "pytorch_model.bin").write_bytes(b"anything")
  with pytest.raises(ConvertError, match="pickle"):
    common.read_state(pickled)
  with pytest.raises(ConvertError, match="not a clip_text_model config"):
    clip.text_config(json.loads('{"model_type": "bert"}'))


def test_bf16_and_fp16_checkpoints_read(text_dir, tmp_path):
  """Half-precision checkpoints (the common download) convert: bf16 parsed without torch."""
  d, model = text_dir
  for dtype in (torch.bfloat16, torch.float16):
    out = tmp_path / str(dtype).split(".")[-1]
    model.to(dtype).save_pretrained(out)
    state = common.read_state(out)
    w = state["text_model.final_layer_norm.weight"]
    ref = model.text_model.final_layer_norm.weight.float().detach().numpy()
    np.testing.assert_array_equal(np.asarray(w, np.float32), ref)
  model.to(torch.float32)


def test_single_tower_layouts_without_prefix(tmp_path):
  """transformers >= 5 saves CLIPTextModel / CLIPVisionModel without ``text_model.`` /
  ``vision_model.``; both layouts convert to the same outputs."""
  torch.manual_seed(2)
  cfg = transformers.CLIPTextConfig(
      vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, eos_token_id=EOS, bos_token_id=1,
      pad_token_id=0)
  model = transformers.CLIPTextModel(cfg).eval()
  model.save_pretrained(tmp_path / "text")
  state = common.read_state(tmp_path / "text")
  enc, abstract = _text_model(tmp_path / "text")
  params = clip.text_encoder_params(state, abstract)
  prefixed = clip.text_encoder_params({f"text_model.{k}": v for k, v in state.items()},
                                      abstract)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, prefixed))
  ids = np.array([[1, 7, 8, EOS, 0, 0]], np.int32)
  states, _ = enc.apply({"params": params}, ids)
  with torch.no_grad():
    ref = model(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  assert _rel(states, ref) <= 1e-4
