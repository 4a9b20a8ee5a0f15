"""Property-based tests (hypothesis) of what user text goes through: concept names
and the prompt parsing that maps ``<name>`` to bank placeholders.

(Tokenization with placeholders and the swap have theirs in
``tests/concepts/test_tokens.py`` and ``test_bank.py``.)
"""

import itertools
import re

import pytest
from hypothesis import given, settings, strategies as st

from persvid_jax.concepts import database as db_lib
from persvid_jax.concepts.tokens import PromptTokenizer
from persvid_jax.pipeline import generate as gen

_ASCII_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")


@settings(max_examples=300, deadline=None)
@given(name=st.one_of(st.text(max_size=40), st.from_regex(_ASCII_NAME, fullmatch=True)))
def test_validate_name_accepts_exactly_the_documented_names(name):
  reserved = re.fullmatch(r"(image|c[0-9]+)", name, re.IGNORECASE) is not None
  want = _ASCII_NAME.fullmatch(name) is not None and not reserved
  try:
    db_lib.validate_name(name)
    accepted = True
  except db_lib.DatabaseError as e:
    accepted = False
    assert "\n" not in str(e).replace(repr(name), "")      # one line (the name is repr'd)
  assert accepted == want, name
  if accepted:      # what the rule is for: safe in paths, prompts and terminals
    assert not set(name) & set("/\\<> .\0\n\r\t") and name.isascii() and name.isprintable()


_WORDS = ["a", "red", "star", "moving", "left", "on", "grass", ",", "the"]
_NAMES = ["dog", "my_toy", "Cat-2", "x9"]


@st.composite
def _request(draw):
  """(prompt, {name: slot}): words and <name>s, some names maybe not stored."""
  slots = draw(st.permutations(range(6)))
  stored = {n: s for n, s in zip(_NAMES, slots) if draw(st.booleans())}
  items = draw(st.lists(st.one_of(st.sampled_from(_WORDS),
                                  st.sampled_from(_NAMES).map(lambda n: f"<{n}>")),
                        max_size=8))
  return " ".join(items), stored


@settings(max_examples=150, deadline=None)
@given(case=_request())
def test_prompt_parsing_maps_names_to_their_slots(tiny_config, case):
  prompt, stored = case
  image_slot = tiny_config.concepts.capacity - 1
  named = re.findall(r"<([^<>\s]*)>", prompt)
  unknown = [n for n in named if n not in stored]
  if unknown:
    with pytest.raises(gen.GenerationError, match=f"unknown concept <{unknown[0]}>"):
      gen.resolve(gen.Request(prompt=prompt), stored, image_slot, tiny_config)
    return
  r = gen.resolve(gen.Request(prompt=prompt), stored, image_slot, tiny_config)
  assert r.mode == ("concept" if named else "text")
  assert r.slots == tuple(dict.fromkeys(stored[n] for n in named))   # first appearance
  want = re.sub(r"<([^<>\s]*)>", lambda m: f"<c{stored[m.group(1)]}>", prompt)
  assert r.text == want and r.prompt == prompt


@settings(max_examples=100, deadline=None)
@given(case=_request())
def test_parsed_prompts_tokenize_with_one_block_per_concept(tiny_config, case):
  prompt, stored = case
  stored = {n: s for n, s in zip(_NAMES, range(4))}                  # every name stored
  r = gen.resolve(gen.Request(prompt=prompt), stored, tiny_config.concepts.capacity - 1,
                  tiny_config)
  tok = _tokenizer(tiny_config)
  try:
    ids = tok.encode(r.text)[0]
  except ValueError as e:                 # only a concept cut by the length limit is refused
    assert "truncated" in str(e)
    return
  k, start = tok.ref_tokens, tok.placeholder_start
  got = [(int(t) - start, len(list(g))) for t, g in itertools.groupby(ids)
         if start <= t < start + tok.num_placeholders]
  # Every mention is K copies of its slot's id (no placeholder is ever cut: that
  # is an error above); repeated mentions side by side make one longer run.
  items = [int(m.group(1)) if (m := re.fullmatch(r"<c(\d+)>", w)) else None
           for w in r.text.split()]            # (each of _WORDS is one token)
  want = [(s, k * len(list(g))) for s, g in itertools.groupby(items) if s is not None]
  assert got == want, (r.text, ids)


_TOKENIZERS = {}


def _tokenizer(config):
  if "tok" not in _TOKENIZERS:
    _TOKENIZERS["tok"] = PromptTokenizer.from_config(config)
  return _TOKENIZERS["tok"]
