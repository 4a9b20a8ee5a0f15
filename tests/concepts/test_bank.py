"""ConceptBank updates, the gather/select swap, and encode_prompt through the TextEncoder."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import flax.linen as nn

from persvid_jax import sharding
from persvid_jax.concepts import bank as bank_lib
from persvid_jax.concepts import tokens
from persvid_jax.concepts.bank import ConceptBank, encode_prompt, swap_embeddings
from persvid_jax.models.text_encoder import TextEncoder

# ---------------------------------------------------------------------------
# Reference implementation (Python loops, the definition of the swap).
# ---------------------------------------------------------------------------


def _reference_swap(embeds, ids, refs, valid, start):
  out = np.array(embeds, copy=True)
  capacity, k_tokens = refs.shape[-3], refs.shape[-2]
  for b in range(ids.shape[0]):
    k = 0
    for pos in range(ids.shape[1]):
      k = k + 1 if pos > 0 and ids[b, pos] == ids[b, pos - 1] else 0
      slot = int(ids[b, pos]) - start
      row_refs = refs[b] if refs.ndim == 4 else refs
      row_valid = valid[b] if valid.ndim == 2 else valid
      if 0 <= slot < capacity and row_valid[slot]:
        out[b, pos] = row_refs[slot, k % k_tokens].astype(out.dtype)
  return out


_swap_jit = jax.jit(swap_embeddings, static_argnames="placeholder_start")

# ---------------------------------------------------------------------------
# ConceptBank
# ---------------------------------------------------------------------------


def _bank(c=4, k=2, d=3, n=2, dd=5):
  return ConceptBank.empty(c, k, d, n, dd)


def test_empty_and_from_config(tiny_config):
  bank = ConceptBank.from_config(tiny_config)
  c, k, n = (tiny_config.concepts.capacity, tiny_config.concepts.ref_tokens,
             tiny_config.concepts.detail_tokens)
  assert bank.ref_tokens.shape == (c, k, tiny_config.text.width)
  assert bank.detail_tokens.shape == (c, n, tiny_config.extractor.detail_dim)
  assert bank.valid.shape == (c,) and bank.valid.dtype == jnp.bool_
  assert int(bank.num_valid) == 0 and bank.capacity == c and bank.num_ref_tokens == k
  assert len(jax.tree.leaves(bank)) == 3          # a pytree of three arrays


def test_set_and_clear_are_pure():
  bank = _bank()
  ref, detail = jnp.full((2, 3), 7.0), jnp.full((2, 5), 9.0)
  b1 = bank.set_slot(2, ref, detail)
  assert int(bank.num_valid) == 0                   # the original is unchanged
  assert int(b1.num_valid) == 1 and bool(b1.valid[2])
  np.testing.assert_array_equal(b1.ref_tokens[2], ref)
  np.testing.assert_array_equal(b1.detail_tokens[2], detail)
  assert np.all(np.asarray(b1.ref_tokens)[[0, 1, 3]] == 0)
  b2 = b1.set_slot(0, ref + 1, detail).clear_slot(2)
  assert b2.valid.tolist() == [True, False, False, False]
  assert np.all(np.asarray(b2.ref_tokens[2]) == 0) and np.all(np.asarray(b2.detail_tokens[2]) == 0)
  with pytest.raises(IndexError):
    bank.set_slot(4, ref, detail)
  with pytest.raises(IndexError):
    bank.clear_slot(-1)


def test_slot_updates_under_jit_trace_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def put(bank, slot, ref, detail):
    return bank.set_slot(slot, ref, detail)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def drop(bank, slot):
    return bank.clear_slot(slot)

  bank = _bank()
  for i in range(4):
    bank = put(bank, jnp.int32(i), jnp.full((2, 3), float(i + 1)), jnp.ones((2, 5)))
  assert int(bank.num_valid) == 4
  np.testing.assert_array_equal(bank.ref_tokens[:, 0, 0], [1, 2, 3, 4])
  bank = drop(bank, jnp.int32(1))
  bank = drop(bank, jnp.int32(3))
  assert bank.valid.tolist() == [True, False, True, False]


# ---------------------------------------------------------------------------
# swap_embeddings on plain arrays
# ---------------------------------------------------------------------------

START = 20          # placeholder_start of the plain-array tests


def _plain_case():
  """B=2, L=10, C=4, K=2, D=3: several concepts per row, different per row."""
  ids = np.array([[0, 5, 22, 22, 7, 21, 21, 1, 1, 1],         # <c2> x K, <c1> x K
                  [0, 23, 23, 23, 23, 24, 22, 22, 9, 1]],     # <c3> x 2K, 24 = not a slot
                 np.int32)
  rng = np.random.default_rng(0)
  embeds = rng.normal(size=(2, 10, 3)).astype(np.float32)
  refs = rng.normal(size=(4, 2, 3)).astype(np.float32)
  return ids, embeds, refs


def test_swap_writes_slot_tokens_in_order_and_nothing_else():
  ids, embeds, refs = _plain_case()
  valid = np.array([True, True, True, True])
  out = np.asarray(_swap_jit(embeds, ids, refs, valid, placeholder_start=START))
  np.testing.assert_array_equal(out[0, 2:4], refs[2])         # k = 0, 1
  np.testing.assert_array_equal(out[0, 5:7], refs[1])
  np.testing.assert_array_equal(out[1, 1:5], np.concatenate([refs[3], refs[3]]))  # k mod K
  np.testing.assert_array_equal(out[1, 6:8], refs[2])
  is_ph = (ids >= START) & (ids < START + 4)
  assert np.array_equal(out[~is_ph], embeds[~is_ph])          # bit-identical elsewhere
  np.testing.assert_array_equal(out, _reference_swap(embeds, ids, refs, valid, START))


def test_swap_leaves_invalid_slots_untouched():
  ids, embeds, refs = _plain_case()
  valid = np.array([True, False, True, False])
  out = np.asarray(_swap_jit(embeds, ids, refs, valid, placeholder_start=START))
  np.testing.assert_array_equal(out[0, 2:4], refs[2])
  assert np.array_equal(out[0, 5:7], embeds[0, 5:7])          # <c1> invalid
  assert np.array_equal(out[1, 1:5], embeds[1, 1:5])          # <c3> invalid


def test_swap_per_example_refs_and_valid():
  ids, embeds, refs = _plain_case()
  refs_b = np.stack([refs, -refs])                            # [B, C, K, D]
  valid_b = np.array([[False, True, True, True], [True, True, False, True]])
  out = np.asarray(_swap_jit(embeds, ids, refs_b, valid_b, placeholder_start=START))
  np.testing.assert_array_equal(out[0, 2:4], refs[2])
  np.testing.assert_array_equal(out[1, 1:3], -refs[3])
  assert np.array_equal(out[1, 6:8], embeds[1, 6:8])          # <c2> invalid in row 1
  np.testing.assert_array_equal(out, _reference_swap(embeds, ids, refs_b, valid_b, START))


def test_swap_keeps_embeds_dtype_bf16():
  ids, embeds, refs = _plain_case()
  e16 = jnp.asarray(embeds, jnp.bfloat16)
  out = _swap_jit(e16, ids, refs, np.ones(4, bool), placeholder_start=START)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out[0, 2:4]), np.asarray(jnp.asarray(refs[2], jnp.bfloat16)))


def test_swap_batch_sharded_over_mesh():
  mesh = sharding.make_mesh()
  b = jax.device_count()
  rng = np.random.default_rng(1)
  ids = np.where(rng.random((b, 10)) < 0.3, START + rng.integers(0, 4, (b, 10)),
                 rng.integers(0, START, (b, 10))).astype(np.int32)
  embeds = rng.normal(size=(b, 10, 3)).astype(np.float32)
  refs = rng.normal(size=(4, 2, 3)).astype(np.float32)
  valid = np.array([True, False, True, True])
  batch3, batch2 = sharding.batch_sharding(mesh, 3), sharding.batch_sharding(mesh, 2)
  rep = NamedSharding(mesh, P())
  fn = jax.jit(lambda e, i, r, v: swap_embeddings(e, i, r, v, placeholder_start=START),
               in_shardings=(batch3, batch2, rep, rep), out_shardings=batch3)
  out = fn(jax.device_put(embeds, batch3), jax.device_put(ids, batch2), refs, valid)
  np.testing.assert_array_equal(np.asarray(out), _reference_swap(embeds, ids, refs, valid, START))


# Shapes (B, L, C, K, D) drawn from a small set: one compile per shape/variant.
_SHAPES = [(2, 12, 4, 2, 8), (3, 16, 8, 3, 4)]


@st.composite
def _swap_case(draw):
  b, length, c, k, d = draw(st.sampled_from(_SHAPES))
  other_ids = st.one_of(st.integers(0, START - 1), st.integers(START + c, START + c + 3))
  segment = st.one_of(
      other_ids.map(lambda t: [t]),
      st.tuples(st.integers(0, c - 1), st.integers(1, 2 * k + 1)).map(
          lambda sr: [START + sr[0]] * sr[1]))
  rows = []
  for _ in range(b):
    flat = sum(draw(st.lists(segment, max_size=length)), [])
    rows.append((flat + [1] * length)[:length])
  per_example = draw(st.booleans())
  vshape = (b, c) if per_example else (c,)
  valid = np.array(draw(st.lists(st.booleans(), min_size=int(np.prod(vshape)),
                                 max_size=int(np.prod(vshape))))).reshape(vshape)
  seed = draw(st.integers(0, 2**16))
  dtype = draw(st.sampled_from([np.float32, jnp.bfloat16]))
  rng = np.random.default_rng(seed)
  embeds = rng.normal(size=(b, length, d)).astype(dtype)
  refs = rng.normal(size=((b,) if per_example else ()) + (c, k, d)).astype(np.float32)
  return np.array(rows, np.int32), embeds, refs, valid


@settings(max_examples=60, deadline=None)
@given(case=_swap_case())
def test_swap_matches_reference(case):
  ids, embeds, refs, valid = case
  out = np.asarray(_swap_jit(embeds, ids, refs, valid, placeholder_start=START))
  want = _reference_swap(embeds, ids, refs, valid, START)
  assert out.dtype == embeds.dtype
  assert np.array_equal(out, want)
  # Every position that is not a valid placeholder is bit-identical.
  c = refs.shape[-3]
  slot = ids - START
  in_range = (slot >= 0) & (slot < c)
  v = valid if valid.ndim == 2 else np.broadcast_to(valid, (ids.shape[0], c))
  ok = in_range & np.take_along_axis(v, np.clip(slot, 0, c - 1), axis=1)
  assert np.array_equal(out[~ok], embeds[~ok])


# ---------------------------------------------------------------------------
# encode_prompt through the real TextEncoder
# ---------------------------------------------------------------------------

_PROMPTS = ["a <c1> dog on the beach",           # valid slot
            "a <c3> and a <c1> moving left",     # two concepts
            "a red striped star",                # no concept
            "a <c6> rolling up"]                 # slot 6 left empty: untouched


def _random_params(encoder, ids):
  """Random parameters from the abstract init: no compile of ``init`` (slow on CPU)."""
  abstract = nn.meta.unbox(jax.eval_shape(encoder.init, jax.random.key(0), ids))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda x: jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype), abstract)


@pytest.fixture(scope="module")
def encoder_setup(tiny_config):
  """Tokenizer, encoder, params, ids [4, L], a bank with slots 1, 3, 5 valid,
  and one jitted ``encode_prompt`` per ``swap_at`` shared by the tests below
  (compiles dominate the CPU test time; sharing them is also what the
  no-recompilation test checks)."""
  tok = tokens.PromptTokenizer.from_config(tiny_config)
  encoder = TextEncoder.from_config(tiny_config.text, eos_token_id=tok.eos_id)
  ids = jnp.asarray(tok.encode(_PROMPTS))
  params = _random_params(encoder, ids)
  rng = np.random.default_rng(1)
  bank = ConceptBank.from_config(tiny_config)
  for slot in (1, 3, 5):
    bank = bank.set_slot(slot, rng.normal(size=bank.ref_tokens.shape[1:]).astype(np.float32),
                         rng.normal(size=bank.detail_tokens.shape[1:]).astype(np.float32))
  encode = {swap_at: _encode_fn(encoder, tok, swap_at) for swap_at in bank_lib.SWAP_AT}
  return tok, encoder, params, ids, bank, encode


def _encode_fn(encoder, tok, swap_at):
  return jax.jit(lambda p, i, b: encode_prompt(
      encoder, p, i, b, swap_at=swap_at, placeholder_start=tok.placeholder_start))


def test_grad_reaches_used_valid_slots_only(encoder_setup):
  tok, encoder, params, ids, bank, _ = encoder_setup
  weights = jax.random.normal(jax.random.key(1), ids.shape + (encoder.width,))

  def loss(ref_tokens, swap_at):
    states, pooled = encode_prompt(encoder, params, ids, bank.replace(ref_tokens=ref_tokens),
                                   swap_at=swap_at, placeholder_start=tok.placeholder_start)
    return jnp.sum(states * weights) + jnp.sum(pooled)

  # One compile for both settings.
  grads = jax.jit(lambda r: [jax.grad(loss)(r, s) for s in bank_lib.SWAP_AT])(bank.ref_tokens)
  used = [1, 3]                      # slot 5: valid, unused; slot 6: used, invalid
  unused = [s for s in range(bank.capacity) if s not in used]
  for grad in map(np.asarray, grads):
    assert np.all(np.abs(grad[used]).sum(-1) > 0)   # every (slot, k) token gets gradient
    assert np.all(grad[unused] == 0)


def test_swap_at_input_and_output_differ_and_match_plain_where_expected(encoder_setup):
  tok, encoder, params, ids, bank, encode = encoder_setup
  plain_states, plain_pooled = jax.jit(encoder.apply)({"params": params}, ids)
  s_in, p_in = encode["input"](params, ids, bank)
  s_out, p_out = encode["output"](params, ids, bank)
  plain_states, s_in, s_out = map(np.asarray, (plain_states, s_in, s_out))
  ids = np.asarray(ids)
  swapped = np.isin(ids, tok.placeholder_ids[np.asarray(bank.valid)])   # [B, L]
  assert swapped[0].any() and swapped[1].any() and not swapped[2:].any()

  # Output: exactly the bank tokens at placeholders, the plain encoder elsewhere.
  assert np.array_equal(s_out[~swapped], plain_states[~swapped])
  k = tok.ref_tokens
  first = int(np.argmax(swapped[0]))
  np.testing.assert_array_equal(s_out[0, first:first + k], bank.ref_tokens[1])
  np.testing.assert_array_equal(p_out, plain_pooled)

  # Input: the concept is contextualised; causal attention keeps every
  # position before the first swapped one (and rows without one) as plain.
  assert not np.allclose(s_in, s_out)
  for row in range(len(_PROMPTS)):
    cut = int(np.argmax(swapped[row])) if swapped[row].any() else ids.shape[1]
    np.testing.assert_allclose(s_in[row, :cut], plain_states[row, :cut], rtol=1e-5, atol=1e-5)
    if cut < ids.shape[1]:
      assert not np.allclose(s_in[row, cut:], plain_states[row, cut:])
      assert not np.allclose(p_in[row], plain_pooled[row])


@pytest.mark.parametrize("swap_at", bank_lib.SWAP_AT)
def test_encode_prompt_never_recompiles_for_bank_contents(encoder_setup, swap_at):
  tok, encoder, params, ids, bank, encode = encoder_setup
  encode = encode[swap_at]
  ref = jnp.ones(bank.ref_tokens.shape[1:])
  detail = jnp.ones(bank.detail_tokens.shape[1:])
  empty = ConceptBank.empty(bank.capacity, bank.num_ref_tokens, encoder.width,
                            *bank.detail_tokens.shape[1:])
  banks = [empty, bank, bank.set_slot(6, ref, detail), bank.clear_slot(1).clear_slot(3),
           bank.replace(ref_tokens=bank.ref_tokens * 2),
           jax.jit(ConceptBank.set_slot)(empty, jnp.int32(1), ref, detail)]
  outs = [np.asarray(encode(params, ids, b)[0]) for b in banks]
  assert encode._cache_size() == 1
  assert [int(b.num_valid) for b in banks] == [0, 3, 4, 1, 3, 1]
  assert not np.array_equal(outs[1], outs[2])    # slot 6 now swapped into row 3
  assert not np.array_equal(outs[1], outs[4])
  assert np.array_equal(outs[0], outs[3])        # nothing used is valid in either


def test_ref_override_rows_and_slots(encoder_setup):
  tok, encoder, params, ids, bank, _ = encoder_setup
  b, k, d = ids.shape[0], tok.ref_tokens, encoder.width
  override = jnp.asarray(np.random.default_rng(3).normal(size=(b, k, d)), jnp.float32)
  ids_np = np.asarray(ids)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def encode(i, bk, ov, mask, slot):
    return encode_prompt(encoder, params, i, bk, swap_at="output",
                         placeholder_start=tok.placeholder_start,
                         ref_override=ov, override_mask=mask, override_slot=slot)

  def rows_of(slot, row):
    return np.flatnonzero(ids_np[row] == tok.placeholder_start + slot)

  # Row 0 overrides slot 1, row 3 slot 6 (empty in the bank: an overridden
  # slot counts as valid); rows 1, 2 are masked off and use the bank.
  mask = jnp.array([True, False, False, True])
  states, _ = encode(ids, bank, override, mask, jnp.array([1, 1, 1, 6], jnp.int32))
  states = np.asarray(states)
  np.testing.assert_array_equal(states[0, rows_of(1, 0)], override[0])
  np.testing.assert_array_equal(states[3, rows_of(6, 3)], override[3])
  np.testing.assert_array_equal(states[1, rows_of(1, 1)], bank.ref_tokens[1])
  np.testing.assert_array_equal(states[1, rows_of(3, 1)], bank.ref_tokens[3])
  # Another mask and other slots: same graph. Row 1 overrides only <c3>.
  states, _ = encode(ids, bank, override, jnp.array([False, True, False, False]),
                     jnp.array([0, 3, 0, 0], jnp.int32))
  states = np.asarray(states)
  np.testing.assert_array_equal(states[1, rows_of(3, 1)], override[1])
  np.testing.assert_array_equal(states[1, rows_of(1, 1)], bank.ref_tokens[1])
  np.testing.assert_array_equal(states[0, rows_of(1, 0)], bank.ref_tokens[1])
  assert encode._cache_size() == 1



def test_override_without_slot_covers_every_slot_of_the_row():
  bank = _bank().set_slot(0, jnp.ones((2, 3)), jnp.ones((2, 5)))
  override = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3)
  refs, valid = bank_lib._batch_refs(bank, 2, override, jnp.array([True, False]), None)
  assert refs.shape == (2, 4, 2, 3) and valid.shape == (2, 4)
  np.testing.assert_array_equal(refs[0], jnp.broadcast_to(override[0], (4, 2, 3)))
  np.testing.assert_array_equal(refs[1], bank.ref_tokens)
  assert valid.tolist() == [[True] * 4, [True, False, False, False]]
  refs, valid = bank_lib._batch_refs(bank, 2, override, None, jnp.array([2, 3]))
  np.testing.assert_array_equal(refs[0, 2], override[0])
  np.testing.assert_array_equal(refs[1, 3], override[1])
  np.testing.assert_array_equal(refs[0, 0], bank.ref_tokens[0])
  assert valid.tolist() == [[True, False, True, False], [True, False, False, True]]


def test_swap_at_is_checked(encoder_setup):
  tok, encoder, params, ids, bank, _ = encoder_setup
  with pytest.raises(ValueError, match="swap_at"):
    encode_prompt(encoder, params, ids, bank, swap_at="middle",
                  placeholder_start=tok.placeholder_start)
  assert bank_lib.SWAP_AT == ("input", "output")
