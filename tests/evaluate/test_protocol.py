"""The standard protocol's mathematical properties on random-weight encoders."""

import numpy as np
import pytest

from persvid_jax import config_lib
from persvid_jax.concepts import tokens
from persvid_jax.evaluate import protocol


@pytest.fixture(scope="module")
def scorer():
  tok = tokens.PromptTokenizer.from_config(config_lib.load_config("tiny:micro"))
  return protocol.random_scorer(tok.encode, len(tok), tok.max_length, eos_token_id=tok.eos_id,
                                seed=0)


def _video(seed, t=4, size=32):
  return np.random.default_rng(seed).integers(0, 256, (t, size, size, 3), dtype=np.uint8)


def test_cosine_properties():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(5, 7)), rng.normal(size=(3, 7))
  np.testing.assert_allclose(np.diag(protocol.cosine_matrix(a, a)), 1.0, atol=1e-12)
  np.testing.assert_allclose(protocol.cosine_matrix(a, b), protocol.cosine_matrix(b, a).T)
  np.testing.assert_allclose(protocol.cosine_matrix(3.0 * a, b), protocol.cosine_matrix(a, b))
  assert np.all(np.abs(protocol.cosine_matrix(a, b)) <= 1.0 + 1e-12)
  assert protocol.image_similarity(a, a[:1]) == pytest.approx(
      np.mean(protocol.cosine_matrix(a, a[:1])))


def test_identical_inputs_similarity_one(scorer):
  frame = _video(1, t=1)
  video = np.repeat(frame, 4, axis=0)
  s = scorer.score(video, "a red circle", references=frame)
  assert s["clip_i"] == pytest.approx(1.0, abs=1e-5)
  assert s["dino_i"] == pytest.approx(1.0, abs=1e-5)
  assert s["temporal_consistency"] == pytest.approx(1.0, abs=1e-5)
  assert s["flow"] == pytest.approx(0.0, abs=1e-3) and s["dynamic"] == 0.0
  text = scorer.clip_text(["a red circle", "a red circle"])
  assert protocol.clip_t(text[:1], text[1]) == pytest.approx(1.0, abs=1e-6)


def test_symmetry(scorer):
  a, b = _video(2), _video(3)
  ea, eb = scorer.clip_image(a), scorer.clip_image(b)
  assert protocol.image_similarity(ea, eb) == pytest.approx(protocol.image_similarity(eb, ea))
  assert scorer.score(a, "x", b)["clip_i"] == pytest.approx(scorer.score(b, "x", a)["clip_i"],
                                                          abs=1e-6)


def test_batching_invariance(scorer):
  frames = _video(4, t=5)
  together = scorer.clip_image(frames)
  alone = np.concatenate([scorer.clip_image(f[None]) for f in frames])
  np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
  texts = ["a red circle", "a blue star on snow", "a green square"]
  np.testing.assert_allclose(scorer.clip_text(texts),
                             np.concatenate([scorer.clip_text([t]) for t in texts]),
                             rtol=1e-4, atol=1e-5)
  # Scores of a video do not depend on what else is scored.
  v = _video(5)
  assert scorer.score(v, "a red circle") == scorer.score(v, "a red circle")


def test_dynamic_degree_measures_motion():
  size, t, shift = 32, 5, 2
  rng = np.random.default_rng(0)
  texture = (rng.random((size, size * 2)) * 255).astype(np.uint8)
  texture = np.asarray(__import__("cv2").GaussianBlur(texture, (5, 5), 1.5))
  frames = np.stack([np.repeat(texture[:, k * shift:k * shift + size, None], 3, -1)
                     for k in range(t)])
  d = protocol.dynamic_degree(frames)
  assert d["dynamic"] == 1.0
  # The top-5% flow is about the true shift (2 px of 32).
  assert 0.5 * shift / size < d["flow"] < 2.0 * shift / size
  assert protocol.dynamic_degree(frames[:1]) == dict(flow=0.0, dynamic=0.0)


def test_clip_model_parameter_names():
  """transformers CLIPModel's top-level names, so converted checkpoints map 1:1."""
  tok = tokens.PromptTokenizer.from_config(config_lib.load_config("tiny:micro"))
  import jax
  import jax.numpy as jnp
  from persvid_jax.models.image_encoder import ImageEncoder
  from persvid_jax.models.text_encoder import TextEncoder
  model = protocol.ClipModel(
      text_model=TextEncoder(vocab_size=len(tok), max_length=8, width=16, layers=1, heads=2,
                       mlp_dim=32),
      vision_model=ImageEncoder(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_dim=32),
      projection_dim=12)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                      jnp.zeros((1, 8), jnp.int32))["params"]
  assert set(params) == {"text_model", "vision_model", "text_projection", "visual_projection"}
  assert params["text_projection"]["kernel"].shape == (16, 12)
