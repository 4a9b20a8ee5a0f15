"""Text encoder, image encoder, reference mapper and detail extractor at the tiny config."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persvid_jax.models.extractor import DetailExtractor
from persvid_jax.models.image_encoder import ImageEncoder, ImageFeatures
from persvid_jax.models.mapper import ReferenceMapper
from persvid_jax.models.text_encoder import TextEncoder

EOS = 1


def _ids(batch=2, length=16, seed=0, vocab=512):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
  ids[:, 0] = 0
  ids[0, 9:] = EOS   # EOS then EOS-padding, as the tokenizer emits
  ids[1, 5:] = EOS
  return jnp.asarray(ids)


def _images(batch=2, size=32, seed=0):
  rng = np.random.default_rng(seed)
  img = rng.uniform(-1, 1, size=(batch, size, size, 3)).astype(np.float32)
  mask = (rng.uniform(size=(batch, size, size, 1)) > 0.5).astype(np.float32)
  return jnp.asarray(img), jnp.asarray(mask)


def _params_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_text_encoder_shapes_and_dtypes(tiny_config, dtype):
  c = tiny_config.text
  model = TextEncoder.from_config(c, eos_token_id=EOS, dtype=dtype)
  ids = _ids()
  params = jax.jit(model.init)(jax.random.key(0), ids)
  states, pooled = jax.jit(model.apply)(params, ids)
  assert states.shape == (2, 16, c.width) and pooled.shape == (2, c.width)
  assert states.dtype == jnp.dtype(dtype) and pooled.dtype == jnp.dtype(dtype)
  for leaf in jax.tree.leaves(nn.meta.unbox(params)):
    assert leaf.dtype == jnp.float32   # params stay float32 under bf16 compute
  assert np.isfinite(np.asarray(states, np.float32)).all()


def test_text_encoder_deterministic_init(tiny_config):
  model = TextEncoder.from_config(tiny_config.text, eos_token_id=EOS)
  ids = _ids()
  p1 = jax.jit(model.init)(jax.random.key(0), ids)
  p2 = jax.jit(model.init)(jax.random.key(0), ids)
  p3 = jax.jit(model.init)(jax.random.key(1), ids)
  assert _params_equal(p1, p2)
  assert not _params_equal(p1, p3)


def test_text_encoder_is_causal_and_pools_at_eos(tiny_config):
  model = TextEncoder.from_config(tiny_config.text, eos_token_id=EOS)
  ids = _ids()
  params = jax.jit(model.init)(jax.random.key(0), ids)
  apply = jax.jit(model.apply)
  states, pooled = apply(params, ids)
  # Changing token 12 changes no state before position 12 (causal mask).
  changed = ids.at[:, 12].set(7)
  states2, _ = apply(params, changed)
  np.testing.assert_array_equal(np.asarray(states[:, :12]), np.asarray(states2[:, :12]))
  assert not np.allclose(states[:, 12:], states2[:, 12:])
  # Pooled = state at the first EOS (positions 9 and 5).
  np.testing.assert_array_equal(np.asarray(pooled[0]), np.asarray(states[0, 9]))
  np.testing.assert_array_equal(np.asarray(pooled[1]), np.asarray(states[1, 5]))


def test_text_encoder_inputs_embeds_equals_lookup(tiny_config):
  model = TextEncoder.from_config(tiny_config.text, eos_token_id=EOS)
  ids = _ids()
  params = jax.jit(model.init)(jax.random.key(0), ids)
  embeds = jax.jit(functools.partial(model.apply, method=model.embed_tokens))(params, ids)
  apply = jax.jit(model.apply)
  a, _ = apply(params, ids)
  b, _ = apply(params, ids, inputs_embeds=embeds)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_image_encoder_and_mapper(tiny_config, dtype):
  img, _ = _images()
  enc = ImageEncoder.from_config(tiny_config.image, dtype=dtype)
  params = jax.jit(enc.init)(jax.random.key(0), img)
  feats = jax.jit(enc.apply)(params, img)
  n_patches = (tiny_config.image.image_size // tiny_config.image.patch_size) ** 2
  assert feats.pooled.shape == (2, tiny_config.image.width)
  assert feats.patch_tokens.shape == (2, n_patches, tiny_config.image.width)
  assert feats.pooled.dtype == jnp.dtype(dtype)
  assert feats.image_embeds is None
  # Other input sizes are resized to image_size, and batch rows are independent.
  big, _ = _images(size=48, seed=1)
  feats_big = jax.jit(enc.apply)(params, big)
  assert feats_big.patch_tokens.shape == feats.patch_tokens.shape
  one = jax.jit(enc.apply)(params, img[:1])
  np.testing.assert_allclose(np.asarray(one.pooled, np.float32),
                             np.asarray(feats.pooled[:1], np.float32), rtol=2e-2, atol=2e-2)

  mapper = ReferenceMapper.from_config(tiny_config, dtype=dtype)
  mparams = jax.jit(mapper.init)(jax.random.key(1), feats)
  ref = jax.jit(mapper.apply)(mparams, feats)
  assert ref.shape == (2, tiny_config.concepts.ref_tokens, tiny_config.text.width)
  assert ref.dtype == jnp.dtype(dtype)
  assert not np.allclose(np.asarray(ref[0], np.float32), np.asarray(ref[1], np.float32))


def test_image_encoder_projection(tiny_config):
  cfg = tiny_config.image.copy_and_resolve_references()
  cfg.projection_dim = 24
  enc = ImageEncoder.from_config(cfg)
  img, _ = _images()
  feats = jax.jit(enc.apply)(jax.jit(enc.init)(jax.random.key(0), img), img)
  assert isinstance(feats, ImageFeatures) and feats.image_embeds.shape == (2, 24)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_extractor_detail_and_null_tokens(tiny_config, dtype):
  img, mask = _images()
  ext = DetailExtractor.from_config(tiny_config, dtype=dtype)
  has = jnp.array([True, False])
  params = jax.jit(ext.init)(jax.random.key(0), img, mask, has)
  apply = jax.jit(ext.apply)
  out = apply(params, img, mask, has)
  n, dd = tiny_config.concepts.detail_tokens, tiny_config.extractor.detail_dim
  assert out.shape == (2, n, dd) and out.dtype == jnp.dtype(dtype)
  null = ext.apply(params, 2, method=ext.null_tokens)
  # Row without an image = the learned null tokens, exactly.
  np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(null[1]))
  assert not np.array_equal(np.asarray(out[0]), np.asarray(null[0]))
  # The mask matters: pixels outside the subject do not leak in.
  noisy = img + (1 - mask) * 0.7
  out_noisy = apply(params, noisy, mask, has)
  np.testing.assert_allclose(np.asarray(out_noisy[0], np.float32),
                             np.asarray(out[0], np.float32), atol=1e-6)
  # Gradients reach the null tokens through the False row only.
  def loss(p):
    return jnp.sum(ext.apply(p, img, mask, has).astype(jnp.float32) ** 2)
  g = jax.jit(jax.grad(loss))(params)
  g_null = nn.meta.unbox(g)["params"]["null_detail_tokens"]
  assert float(jnp.abs(g_null).sum()) > 0


def test_extractor_deterministic_init(tiny_config):
  img, mask = _images()
  ext = DetailExtractor.from_config(tiny_config)
  a = jax.jit(ext.init)(jax.random.key(3), img, mask)
  b = jax.jit(ext.init)(jax.random.key(3), img, mask)
  assert _params_equal(a, b)
