"""The six modes from one graph, detail fusion, no recompilation (random micro model)."""

import jax
import numpy as np
import pytest

from persvid_jax.concepts import build
from persvid_jax.concepts.bank import ConceptBank
from persvid_jax.data import synthetic
from persvid_jax.pipeline import generate as gen


def _photo(i=0, size=64):
  cfg = synthetic.CONFIGS["tiny"].replace(reference_size=size)
  return synthetic.render_example(cfg, "test", i)["reference"]


@pytest.fixture(scope="module")
def bank_and_concepts(micro_model):
  features = build.encode_concept(micro_model, [(_photo(0), None), (_photo(1), None)])
  bank = ConceptBank.from_config(micro_model.config).set_slot(
      0, features.ref_tokens, features.detail_tokens)
  return bank, {"dog": 0}


MODE_CASES = [
    (gen.Request("a <dog> moving left"), "concept"),
    (gen.Request("a <dog> moving left", image=_photo(2)), "concept+target"),
    (gen.Request("a <image> moving up", image=_photo(2)), "target"),
    (gen.Request("a <dog> on grass", image=_photo(3), image_role="scene"), "concept+scene"),
    (gen.Request("a red star"), "text"),
    (gen.Request("a red star", image=_photo(3), image_role="scene"), "text+scene"),
    (gen.Request("a red star", image=_photo(3)), "text+scene"),
]


@pytest.mark.parametrize("request_, mode", MODE_CASES)
def test_mode_mapping(micro_model, request_, mode):
  c = micro_model.config
  r = gen.resolve(request_, {"dog": 0}, c.concepts.capacity - 1, c)
  assert r.mode == mode
  assert "<dog>" not in r.text and "<image>" not in r.text
  assert (r.reference is not None) == (request_.image is not None)


@pytest.mark.parametrize("request_, match", [
    (gen.Request("a <cat> moving"), "unknown concept <cat>"),
    (gen.Request("a <image> moving"), "no image"),
    (gen.Request("a <image> moving", image=_photo(), image_role="scene"), "target"),
    (gen.Request("a <dog> and <image>", image=_photo()), "either"),
    (gen.Request("a red star", mode="concept"), "needs a prompt naming a stored"),
    (gen.Request("a <dog>", mode="text"), "needs a prompt without"),
])
def test_bad_requests(micro_model, request_, match):
  c = micro_model.config
  with pytest.raises(gen.GenerationError, match=match):
    gen.resolve(request_, {"dog": 0}, c.concepts.capacity - 1, c)


def test_too_many_concepts_for_the_prompt(micro_model):
  c = micro_model.config
  names = {f"n{i}": i for i in range(c.concepts.capacity - 1)}
  prompt = "a toy with " + " ".join(f"<n{i}>" for i in range(c.concepts.capacity - 1))
  r = gen.resolve(gen.Request(prompt), names, c.concepts.capacity - 1, c)
  with pytest.raises(gen.GenerationError, match="too long"):
    gen.make_inputs([r], micro_model.tokenizer, c, c.concepts.capacity - 1)


def test_six_modes_one_graph_no_recompile(micro_model, bank_and_concepts):
  bank, concepts = bank_and_concepts
  c = micro_model.config
  slot = c.concepts.capacity - 1
  g = gen.Generator(micro_model, steps=2, sr_steps=1)
  resolved = [gen.resolve(r, concepts, slot, c) for r, _ in MODE_CASES[:6]]
  out = g(bank, resolved, image_slot=slot, seed=0, progress=False)
  v = c.video
  assert out.video.shape == (6, v.frames, v.height * 2, v.width * 2, 3)
  assert out.base.shape == (6, v.frames, v.height, v.width, 3)
  assert np.all(np.isfinite(out.video)) and np.abs(out.video).max() <= 1.0
  assert out.modes == tuple(m for _, m in MODE_CASES[:6])

  # More concepts (2nd..Cth), another mode mix: the same compiled programs.
  from persvid_jax.diffusion import samplers
  sizes = (g._conditions._cache_size(), samplers._jit_scan_sample._cache_size())
  for i in range(1, slot):
    bank = bank.set_slot(i, bank.ref_tokens[0] * (1 + i), bank.detail_tokens[0] - i)
  concepts = {**concepts, **{f"x{i}": i for i in range(1, slot)}}
  mixed = [gen.resolve(gen.Request(f"a <x{i}> moving"), concepts, slot, c) for i in range(1, 4)]
  mixed += resolved[3:]
  again = g(bank, mixed, image_slot=slot, seed=1, progress=False)
  assert (g._conditions._cache_size(), samplers._jit_scan_sample._cache_size()) == sizes
  assert np.all(np.isfinite(again.video))


def test_conditions_follow_the_switches(micro_model, bank_and_concepts):
  """Each mode's semantic/detail features come from where the claims say."""
  bank, concepts = bank_and_concepts
  c = micro_model.config
  slot = c.concepts.capacity - 1
  g = gen.Generator(micro_model, steps=1)
  reqs = [r for r, _ in MODE_CASES[:6]]
  resolved = [gen.resolve(r, concepts, slot, c) for r in reqs]
  inputs = jax.tree.map(np.asarray, gen.make_inputs(resolved, micro_model.tokenizer, c, slot))
  base, _ = jax.device_get(g._conditions(micro_model.params, bank, inputs))
  detail, null = base["cond"]["detail_tokens"], base["uncond"]["detail_tokens"]
  n = c.concepts.detail_tokens
  stored = np.asarray(bank.detail_tokens[0])
  # concept: [stored; stored]; text: [null; null] (concat fusion).
  np.testing.assert_allclose(detail[0, :n], stored, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(detail[0, n:], stored, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(detail[4], null[4], rtol=1e-6)
  # concept+target: stored then extracted; target: extracted twice.
  np.testing.assert_allclose(detail[1, :n], stored, rtol=1e-5, atol=1e-5)
  assert not np.allclose(detail[1, n:], stored, atol=1e-3)
  np.testing.assert_allclose(detail[2, :n], detail[2, n:], rtol=1e-6)
  # Reference tokens: the concept row differs from the text-only context
  # only through the swap; target rows use the image's tokens.
  ctx = base["cond"]["context"]
  assert not np.allclose(ctx[0], ctx[1], atol=1e-5)       # bank vs image tokens, same text


@pytest.mark.parametrize("fusion", gen.FUSIONS)
def test_fusion_strategies(micro_model, bank_and_concepts, fusion):
  bank, concepts = bank_and_concepts
  c = micro_model.config
  slot = c.concepts.capacity - 1
  g = gen.Generator(micro_model, steps=1, fusion=fusion)
  resolved = [gen.resolve(MODE_CASES[i][0], concepts, slot, c) for i in (0, 1, 2)]
  inputs = gen.make_inputs(resolved, micro_model.tokenizer, c, slot)
  base, _ = jax.device_get(g._conditions(micro_model.params, bank, inputs))
  detail = base["cond"]["detail_tokens"]
  n = c.concepts.detail_tokens
  stored = np.asarray(bank.detail_tokens[0])
  if fusion == "concat":
    assert detail.shape[1] == 2 * n
    fused = np.concatenate([stored, detail[2, :n] * 0 + detail[1, n:]])
    np.testing.assert_allclose(detail[1], fused, rtol=1e-6)
  else:
    assert detail.shape[1] == n
    w = 0.5 if fusion == "mean" else c.concepts.get("fusion_weight", 0.5)
    np.testing.assert_allclose(detail[0], stored, rtol=1e-5, atol=1e-5)
    # extracted(target image of row 1) == row 2's tokens? different images; check the mix:
    extracted_1 = (detail[1] - w * stored) / (1 - w)
    assert np.all(np.isfinite(extracted_1))


def test_duplicated_detail_tokens_equal_attention_to_one_copy(micro_model):
  """Why 'concat' may give a one-source row its tokens twice: attention is unchanged."""
  c, stack, p = micro_model.config, micro_model.stack, micro_model.params
  v = c.video
  x = np.random.default_rng(0).normal(size=(1, v.frames, v.height, v.width, 3)).astype(np.float32)
  ctx = np.random.default_rng(1).normal(size=(1, c.text.max_length, c.text.width)).astype(np.float32)
  d = np.random.default_rng(2).normal(size=(1, c.concepts.detail_tokens, c.extractor.detail_dim))
  d = d.astype(np.float32)
  t = np.array([500], np.int32)
  one = stack.unet.apply({"params": p["unet"]}, x, t, ctx, detail_tokens=d)
  two = stack.unet.apply({"params": p["unet"]}, x, t, ctx,
                         detail_tokens=np.concatenate([d, d], 1))
  np.testing.assert_allclose(np.asarray(one), np.asarray(two), rtol=1e-4, atol=1e-5)


def test_detail_sources_restrict_the_detail_tokens(micro_model, bank_and_concepts):
  """Ablation switches: the concept+target row gets stored / image / null tokens."""
  bank, concepts = bank_and_concepts
  c = micro_model.config
  slot = c.concepts.capacity - 1
  g = gen.Generator(micro_model, steps=1)
  r = [gen.resolve(MODE_CASES[1][0], concepts, slot, c)]          # concept+target
  n = c.concepts.detail_tokens
  stored = np.asarray(bank.detail_tokens[0])
  got = {}
  for source in gen.DETAIL_SOURCES:
    inputs = gen.make_inputs(r, micro_model.tokenizer, c, slot, source)
    base, _ = jax.device_get(g._conditions(micro_model.params, bank, inputs))
    got[source] = base["cond"]["detail_tokens"][0]
    null = base["uncond"]["detail_tokens"][0]
  np.testing.assert_allclose(got["stored"], np.concatenate([stored, stored]), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(got["image"][:n], got["image"][n:], rtol=1e-6)
  np.testing.assert_allclose(got["image"][:n], got["auto"][n:], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["off"], null, rtol=1e-6)
  with pytest.raises(gen.GenerationError, match="detail source"):
    gen.Generator(micro_model, steps=1, detail_source="both")


def test_no_cascade_samples_the_base_network_at_high_res(micro_model, bank_and_concepts):
  bank, concepts = bank_and_concepts
  c = micro_model.config
  slot = c.concepts.capacity - 1
  g = gen.Generator(micro_model, steps=1, sr_steps=1)
  r = [gen.resolve(gen.Request("a <dog> moving left"), concepts, slot, c)]
  out = g(bank, r, image_slot=slot, seed=0, progress=False, cascade=False)
  v = c.video
  assert out.video.shape == (1, v.frames, v.height * v.sr_factor, v.width * v.sr_factor, 3)
  assert np.all(np.abs(out.video) <= 1.0) and np.array_equal(out.video, out.base)


def test_an_empty_slot_gives_null_detail(micro_model, bank_and_concepts):
  """A concept whose slot is empty conditions like the dropped reference of training."""
  bank, concepts = bank_and_concepts
  c = micro_model.config
  slot = c.concepts.capacity - 1
  g = gen.Generator(micro_model, steps=1)
  r = [gen.resolve(MODE_CASES[0][0], concepts, slot, c)]          # concept mode, slot 0
  inputs = gen.make_inputs(r, micro_model.tokenizer, c, slot)
  empty = ConceptBank.from_config(c)
  base, _ = jax.device_get(g._conditions(micro_model.params, empty, inputs))
  np.testing.assert_allclose(base["cond"]["detail_tokens"], base["uncond"]["detail_tokens"],
                             rtol=1e-6)


@pytest.mark.parametrize("cascade", [True, False])
def test_cross_attention_cache_gives_the_same_videos(micro_model, bank_and_concepts, cascade):
  """Keys and values once per video (the default) or at every step: the same videos."""
  bank, concepts = bank_and_concepts
  c = micro_model.config
  slot = c.concepts.capacity - 1
  resolved = [gen.resolve(MODE_CASES[i][0], concepts, slot, c) for i in (0, 1)]
  outs = [gen.Generator(micro_model, steps=2, sr_steps=1, kv_cache=kv, cascade=cascade)(
      bank, resolved, image_slot=slot, seed=3, progress=False) for kv in (True, False)]
  np.testing.assert_allclose(outs[0].video, outs[1].video, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[0].base, outs[1].base, rtol=1e-5, atol=1e-5)
