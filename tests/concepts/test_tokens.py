"""Prompt tokenizer: specials, K-expanded placeholders, errors, CLIP-dir loading."""

import json
import pathlib
import re

import numpy as np
import pytest
import transformers
from hypothesis import given, settings, strategies as st

from persvid_jax.concepts import tokens

DREAMBENCH = pathlib.Path(__file__).resolve().parents[3] / "shared/dreambench/prompts_and_classes.txt"


@pytest.fixture(scope="module")
def tok(tiny_config):
  return tokens.PromptTokenizer.from_config(tiny_config)


def _ph_ids(t):
  return set(t.placeholder_ids.tolist())


def test_default_tokenizer_fits_tiny_vocab(tiny_config, tok):
  c = tiny_config.concepts.capacity
  assert len(tok) == 3 + len(tokens.DEFAULT_WORDS) + c
  assert len(tok) <= tiny_config.text.vocab_size
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)   # CLIP-like: pad = EOS
  assert tok.num_placeholders == c and tok.ref_tokens == tiny_config.concepts.ref_tokens


def test_placeholder_ids_are_contiguous_and_last(tiny_config, tok):
  c = tiny_config.concepts.capacity
  names = [tokens.placeholder(i) for i in range(c)]
  ids = tok.tokenizer.convert_tokens_to_ids(names)
  assert ids == list(range(tok.placeholder_start, tok.placeholder_start + c))
  assert tok.placeholder_start + c == len(tok)
  np.testing.assert_array_equal(tok.placeholder_ids, ids)


def test_bos_eos_padding(tiny_config, tok):
  ids = tok.encode(["a red dog", "A  RED   dog ."])
  assert ids.dtype == np.int32 and ids.shape == (2, tiny_config.text.max_length)
  vocab = tok.tokenizer.get_vocab()
  body = [vocab["a"], vocab["red"], vocab["dog"]]
  np.testing.assert_array_equal(ids[0, :5], [tok.bos_id, *body, tok.eos_id])
  assert np.all(ids[0, 5:] == tok.pad_id)
  # Lowercased, whitespace-insensitive, punctuation is its own token.
  np.testing.assert_array_equal(ids[1, :6], [tok.bos_id, *body, vocab["."], tok.eos_id])


def test_round_trip(tok):
  prompts = ["a reddish striped star moving left over a dark blue background",
             "a <c0> rolling towards the camera",
             "a <c2> and a <c5> on the beach",
             "<c1><c1> dog", "a photo of a <c7> dog in the snow , wearing"]
  got = tok.decode(tok.encode(prompts))
  want = ["a reddish striped star moving left over a dark blue background",
          "a <c0> rolling towards the camera", "a <c2> and a <c5> on the beach",
          "<c1> <c1> dog", "a photo of a <c7> dog in the snow , wearing"]
  assert got == want


def test_placeholders_expand_to_k_positions(tok):
  k = tok.ref_tokens
  start = tok.placeholder_start
  ids = tok.encode(["a <c3> dog", "<c0><c1> and <c0>"])
  assert ids[0, 1] == tok.tokenizer.get_vocab()["a"]
  np.testing.assert_array_equal(ids[0, 2:2 + k], [start + 3] * k)
  assert ids[0, 2 + k] == tok.tokenizer.get_vocab()["dog"]
  # Adjacent different placeholders keep their own runs of K.
  np.testing.assert_array_equal(ids[1, 1:1 + 2 * k], [start] * k + [start + 1] * k)
  assert np.sum(ids[1] == start) == 2 * k and np.sum(ids[1] == start + 1) == k


def test_placeholder_slots(tok):
  assert tok.placeholder_slots("a <c4> and <c1> next to <c4>") == [4, 1]
  assert tok.placeholder_slots("a plain prompt") == []


def test_out_of_range_placeholder_is_an_error(tiny_config, tok):
  c = tiny_config.concepts.capacity
  with pytest.raises(ValueError, match=rf"<c{c}>.*{c} slots"):
    tok.encode([f"a <c{c}> dog"])
  with pytest.raises(ValueError, match="slots"):
    tok.placeholder_slots("<c99>")


def test_truncation_keeps_eos_and_refuses_to_cut_placeholders(tiny_config, tok):
  length = tiny_config.text.max_length
  long_words = " ".join(["red"] * (2 * length))
  ids = tok.encode(["a <c0> " + long_words])
  assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
  assert np.sum(ids[0] == tok.placeholder_start) == tok.ref_tokens
  with pytest.raises(ValueError, match="truncated"):
    tok.encode([long_words + " <c0>"])
  # A placeholder whose K-run would be cut in half is refused too.
  body = length - 2
  head = " ".join(["red"] * (body - tok.ref_tokens + 1))
  with pytest.raises(ValueError, match="truncated"):
    tok.encode([head + " <c1>"])
  tok.encode([" ".join(["red"] * (body - tok.ref_tokens)) + " <c1>"])   # just fits


def test_vocab_size_check(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.text.vocab_size = 100
  with pytest.raises(ValueError, match="vocab_size"):
    tokens.PromptTokenizer.from_config(config)


def test_dreambench_prompts_have_no_unknown_words(tok):
  if not DREAMBENCH.exists():
    pytest.skip(f"{DREAMBENCH} not present")
  text = DREAMBENCH.read_text()
  templates = re.findall(r"'(a [^']*)'\.format", text)
  rows = re.findall(r"^(\w+),([a-z ]+)$", text, flags=re.M)[1:]   # skip the header
  classes = [cls for _, cls in rows]
  name_words = [re.sub(r"\d+$", "", w) for name, _ in rows for w in name.split("_")]
  assert len(templates) >= 25 and len(classes) >= 30
  for phrase in templates + classes + name_words:
    prompt = phrase.replace("{0} {1}", "<c0> dog")
    ids = tok.encode([prompt])
    assert tok.tokenizer.unk_token_id not in ids, prompt


def test_word_tokenizer_survives_save_and_load(tmp_path, tok):
  tok.tokenizer.save_pretrained(tmp_path)
  loaded = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
  again = tokens.PromptTokenizer(loaded, max_length=tok.max_length,
                                 num_placeholders=tok.num_placeholders,
                                 ref_tokens=tok.ref_tokens)
  prompts = ["a <c2> moving up over the grass"]
  np.testing.assert_array_equal(again.encode(prompts), tok.encode(prompts))


def _write_tiny_clip_dir(directory: pathlib.Path) -> None:
  """A byte-level BPE vocab in CLIP's format: 256 bytes (+ '</w>'), a few merges."""
  # GPT-2/CLIP byte -> printable unicode table.
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  chars = [chr(c) for c in cs]
  merges = ["d o", "do g</w>", "c a", "ca t</w>", "r e", "re d</w>"]
  vocab = chars + [c + "</w>" for c in chars] + ["do", "dog</w>", "ca", "cat</w>",
                                                 "re", "red</w>",
                                                 "<|startoftext|>", "<|endoftext|>"]
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_clip_tokenizer_from_local_dir(tmp_path, tiny_config):
  clip_dir = tmp_path / "clip"
  _write_tiny_clip_dir(clip_dir)
  c = tiny_config.concepts.capacity
  hf = tokens.load_clip_tokenizer(str(clip_dir), c)
  base = 2 * 256 + 8
  assert hf.convert_tokens_to_ids([tokens.placeholder(i) for i in range(c)]) == \
      list(range(base, base + c))

  config = tiny_config.copy_and_resolve_references()
  config.text.tokenizer_dir = str(clip_dir)
  config.text.vocab_size = 1024
  tok = tokens.PromptTokenizer.from_config(config)
  assert tok.placeholder_start == base
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (base - 2, base - 1, base - 1)
  ids = tok.encode(["A red <c1> dog"])[0]
  vocab = hf.get_vocab()
  k = tok.ref_tokens
  want = [tok.bos_id, vocab["a</w>"], vocab["red</w>"]] + [base + 1] * k + \
      [vocab["dog</w>"], tok.eos_id]
  np.testing.assert_array_equal(ids[:len(want)], want)
  assert np.all(ids[len(want):] == tok.pad_id)
  assert tok.decode(ids[None]) == ["a red <c1> dog"]

  config.text.vocab_size = 512     # 520 + C rows do not fit
  with pytest.raises(ValueError, match="vocab_size"):
    tokens.PromptTokenizer.from_config(config)


def test_missing_clip_dir_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="tokenizer_dir"):
    tokens.load_clip_tokenizer(str(tmp_path / "nope"), 4)


_WORDS = ["a", "red", "dog", "striped", "star", "left", "over", "the", "beach", ","]


@st.composite
def _prompts(draw, capacity):
  items = draw(st.lists(st.one_of(st.sampled_from(_WORDS),
                                  st.integers(0, capacity - 1).map(tokens.placeholder)),
                        min_size=0, max_size=8))
  return " ".join(items)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_encode_matches_a_reference(tok, data):
  """Oracle: words -> vocab ids, <ci> -> K x (start + i), BOS/EOS/pad, truncation."""
  prompt = data.draw(_prompts(tok.num_placeholders))
  vocab = tok.tokenizer.get_vocab()
  body = []
  for item in prompt.split():
    match = re.fullmatch(r"<c(\d+)>", item)
    body += ([tok.placeholder_start + int(match.group(1))] * tok.ref_tokens if match
             else [vocab[item]])
  keep = tok.max_length - 2
  if any(t in _ph_ids(tok) for t in body[keep:]):
    with pytest.raises(ValueError, match="truncated"):
      tok.encode([prompt])
    return
  body = body[:keep]
  want = [tok.bos_id] + body + [tok.eos_id]
  want += [tok.pad_id] * (tok.max_length - len(want))
  ids = tok.encode([prompt])[0]
  np.testing.assert_array_equal(ids, want)
  if len(prompt.split()) + 2 + (tok.ref_tokens - 1) * prompt.count("<c") <= tok.max_length:
    assert tok.decode(ids[None]) == [" ".join(prompt.split())]
