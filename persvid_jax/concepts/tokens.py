"""Prompt tokenization with reserved concept placeholders ``<c0>…<c{C-1}>``.

A prompt names a stored concept by its slot: ``"a <c3> rolling left on the
beach"``. Each placeholder is a reserved special token of the tokenizer, and
the placeholder ids are *contiguous* (``placeholder_start + slot``), so that the
swap (``concepts/bank.py``) turns a token id into a bank slot with one
subtraction, inside the jitted graph, with no lookup table.

A concept is ``K`` pseudo-words (``config.concepts.ref_tokens``): ``encode``
expands every ``<ci>`` into ``K`` consecutive ``<ci>`` tokens, so the text
encoder has ``K`` positions to receive the concept's ``K`` reference tokens.

Two tokenizers back this, both ``transformers`` fast tokenizers:
  * ``load_clip_tokenizer``: a pretrained CLIP tokenizer directory
    (``config.text.tokenizer_dir``), for imported CLIP text weights.
  * ``build_word_tokenizer``: a word-level tokenizer over ``DEFAULT_WORDS``,
    sized for the synthetic captions and the DreamBench prompts, so that the
    toy text encoders keep a table of a few hundred rows.
Both use CLIP's specials (``<|startoftext|>``, ``<|endoftext|>``) and pad with
``<|endoftext|>``; the text encoder pools at the *first* ``<|endoftext|>``.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Sequence

import numpy as np
import tokenizers
import transformers
from tokenizers import models, normalizers, pre_tokenizers, processors

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
UNK = "<unk>"

# Matches any placeholder-looking string, also out-of-range ones such as
# ``<c99>``: those are not tokens of the tokenizer (they would silently become
# ``<unk>`` pieces), so they are caught here and reported.
_PLACEHOLDER_RE = re.compile(r"<c(\d+)>")
# Truncated prompts are logged, the first few per tokenizer: a user's prompt
# is worth a warning, a corpus of long captions is not worth thousands.
_MAX_TRUNCATION_WARNINGS = 5

log = logging.getLogger(__name__)


def placeholder(slot: int) -> str:
  """The placeholder text of bank slot ``slot``: ``3 -> '<c3>'``."""
  return f"<c{slot}>"


def _words(text: str) -> tuple[str, ...]:
  return tuple(text.split())


# The default word list. Grouped so that additions land where a reader looks.
_SYNTHETIC_WORDS = (
    # colours and colour modifiers (captions are coarse on purpose: "a reddish
    # striped star", the exact colour lives in the concept)
    _words("red green blue yellow orange purple pink white black gray grey brown "
           "cyan magenta teal violet gold golden silver beige navy olive maroon "
           "turquoise lime indigo crimson colored coloured colorful colourful")
    + _words("reddish greenish bluish yellowish orangish orangey purplish pinkish "
             "grayish greyish brownish whitish blackish light dark pale bright deep "
             "pastel vivid dull muted neon saturated")
    # shapes
    + _words("circle disk disc square triangle star hexagon pentagon octagon diamond "
             "heart cross plus ring donut ellipse oval rectangle blob cube sphere "
             "ball crescent moon arrow shape object thing block box cylinder cone "
             "pyramid spiral")
    # patterns
    + _words("striped stripes stripe dotted dots spotted polka checkered checkerboard "
             "checked plain solid zigzag gradient textured patterned outlined "
             "speckled banded ringed horizontal vertical diagonal two tone")
    # sizes
    + _words("tiny small little medium big large huge giant")
    # motion
    + _words("left right up down towards toward away upward upwards downward "
             "downwards leftward leftwards rightward rightwards forward forwards "
             "backward backwards around across along from to camera viewer "
             "moving moves move moved slides sliding slide drifts drifting drift "
             "floats floating float rolls rolling roll travels traveling travelling "
             "goes going go bounces bouncing bounce flies flying fly falls falling "
             "rises rising spins spinning rotates rotating turns turning shrinks "
             "grows zooms zooming static still stationary steady slowly quickly "
             "slow fast gently smoothly")
    # backgrounds and scenes
    + _words("background backdrop scene setting sky grass sand desert water sea lake "
             "river ocean pond forest woods field meadow hill hills mountain "
             "mountains city town street road sidewalk room wall table floor "
             "ground night day morning evening sunset sunrise space stars clouds "
             "cloudy sunny snow snowy rain beach park garden kitchen studio blank "
             "empty noise noisy brick wood wooden marble concrete paper cloth fabric "
             "carpet rug tiles stone stones rocks indoors outdoors landscape "
             "horizon jungle")
    # articles, prepositions, pronouns, framing words, common verbs
    + _words("a an the of in on over under above below beneath with and or against "
             "at by into onto through behind front near next beside between "
             "inside outside is are was be being has have its it this that there "
             "here their his her my your our one two three some many few several "
             "photo photograph video picture image clip footage shot close closeup "
             "view frame top side bottom center centre middle corner edge shows "
             "showing shown featuring style painting drawing sketch render "
             "realistic high quality detailed animation animated cartoon "
             "person man woman people character subject "
             "walking walks running runs jumping jumps swimming swims sitting sits "
             "standing stands dancing dances playing plays looking looks holding "
             "holds eating eats sleeping sleeps riding rides driving drives "
             "lying lies resting rests appears appearing"))

# DreamBench (../shared/dreambench/prompts_and_classes.txt): subject classes,
# the words of the subject names, and every word of the prompt templates.
_DREAMBENCH_WORDS = (
    _words("backpack stuffed animal bowl can candle cat clock sneaker dog toy boot "
           "glasses teapot vase cartoon")
    + _words("bear plushie berry duck fancy sloth monster sunglasses poop emoji rc "
             "car robot shiny wolf")
    + _words("jungle snow beach cobblestone street top pink fabric wooden floor city "
             "background mountain blue house purple rug forest wheat field tree "
             "autumn leaves eiffel tower floating water ocean milk green grass "
             "sunflowers around mirror sidewalk crowded dirt road white wet cube "
             "shaped wearing hat santa rainbow scarf black monocle chef outfit "
             "firefighter police yellow shirt wizard"))

_PUNCTUATION = tuple(",.!?;:'\"-()/&")


def _dedupe(words: Iterable[str]) -> tuple[str, ...]:
  seen: dict[str, None] = {}
  for w in words:
    seen.setdefault(w.lower(), None)
  return tuple(seen)


# The oracle captions of persvid_synthetic (persvid_jax/data/synthetic.py)
# write each continuous attribute quantised to one digit word. Appended last
# so that the ids of the words above do not move.
_ORACLE_WORDS = _words("0 1 2 3 4 5 6 7 8 9 size")

#: The word tokenizer's default vocabulary (lowercase; specials excluded).
DEFAULT_WORDS: tuple[str, ...] = _dedupe(
    _SYNTHETIC_WORDS + _DREAMBENCH_WORDS + _PUNCTUATION + _ORACLE_WORDS)


def _placeholder_tokens(num_placeholders: int) -> list[transformers.AddedToken]:
  # special=True: never split, never lowercased, matched on the raw text;
  # normalized=False so that the lowercase normalizer cannot touch them.
  return [transformers.AddedToken(placeholder(i), special=True, normalized=False,
                                  lstrip=False, rstrip=False, single_word=False)
          for i in range(num_placeholders)]


def _add_placeholders(tokenizer: transformers.PreTrainedTokenizerBase,
                      num_placeholders: int) -> int:
  """Adds ``<c0>…<c{C-1}>`` and returns the first id; checks contiguity."""
  names = [placeholder(i) for i in range(num_placeholders)]
  if num_placeholders == 0:
    return len(tokenizer)
  present = [n for n in names if n in tokenizer.get_vocab()]
  if present:
    raise ValueError(f"the tokenizer already has tokens {present[:3]}...: placeholders "
                     "<cN> must be new tokens; use a tokenizer without them")
  tokenizer.add_tokens(_placeholder_tokens(num_placeholders), special_tokens=True)
  ids = tokenizer.convert_tokens_to_ids(names)
  start = ids[0]
  # The swap maps id -> slot by subtraction; that needs contiguous ids.
  assert ids == list(range(start, start + num_placeholders)), ids
  return start


def build_word_tokenizer(words: Sequence[str] = DEFAULT_WORDS,
                         num_placeholders: int = 0,
                         *, model_max_length: int = 77
                         ) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer with CLIP's specials and ``C`` placeholders.

  Ids: ``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1 (also the pad token, as
  in CLIP), ``<unk>`` = 2, then ``words`` in order, then ``<c0>…<c{C-1}>``
  (contiguous, at the end). Text is NFC-normalised and lowercased, split on
  whitespace, and every punctuation character is its own token.

  Args:
    words: the vocabulary (duplicates after lowercasing are dropped).
    num_placeholders: ``C``, the concept bank capacity.
    model_max_length: recorded on the HF tokenizer (``PromptTokenizer``
      enforces its own ``max_length``).

  Returns:
    A ``transformers.PreTrainedTokenizerFast`` (``tok(text)`` adds BOS/EOS).
  """
  vocab = {BOS: 0, EOS: 1, UNK: 2}
  for w in _dedupe(words):
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
      special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
  tok.add_special_tokens([BOS, EOS, UNK])
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
      pad_token=EOS, model_max_length=model_max_length)
  _add_placeholders(hf, num_placeholders)
  return hf


def load_clip_tokenizer(directory: str, num_placeholders: int = 0
                        ) -> transformers.PreTrainedTokenizerFast:
  """A pretrained CLIP tokenizer from a local directory, plus ``C`` placeholders.

  Args:
    directory: holds ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``),
      e.g. the ``tokenizer/`` folder of a diffusers checkpoint. Never fetched
      from the hub: a missing directory is an error.
    num_placeholders: ``C``.

  Returns:
    The ``transformers.CLIPTokenizer`` (a fast tokenizer in transformers 5)
    with ``<c0>…<c{C-1}>`` appended after the original vocabulary.
  """
  try:
    tok = transformers.CLIPTokenizer.from_pretrained(directory, local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot load a CLIP tokenizer from {directory!r} ({e}); "
                     "point config.text.tokenizer_dir at a folder with vocab.json "
                     "and merges.txt") from e
  _add_placeholders(tok, num_placeholders)
  return tok


class PromptTokenizer:
  """Prompts -> fixed-length token ids with ``K``-expanded concept placeholders.

  Attributes:
    tokenizer: the HF fast tokenizer (placeholders included).
    max_length: ``L`` of every encoded row (BOS and EOS included).
    num_placeholders: ``C``.
    ref_tokens: ``K``, token positions per placeholder.
    placeholder_start: id of ``<c0>``; ``<ci>`` is ``placeholder_start + i``.
    bos_id, eos_id, pad_id: special ids (``pad_id == eos_id``, as in CLIP).
  """

  def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase, *,
               max_length: int, num_placeholders: int, ref_tokens: int):
    if max_length < 2:
      raise ValueError(f"max_length must hold BOS and EOS, got {max_length}")
    if ref_tokens < 1:
      raise ValueError(f"ref_tokens (K) must be >= 1, got {ref_tokens}")
    self.tokenizer = tokenizer
    self.max_length = int(max_length)
    self.num_placeholders = int(num_placeholders)
    self.ref_tokens = int(ref_tokens)
    names = [placeholder(i) for i in range(self.num_placeholders)]
    ids = tokenizer.convert_tokens_to_ids(names)
    if self.num_placeholders and (None in ids or tokenizer.unk_token_id in ids or ids != list(
        range(ids[0], ids[0] + self.num_placeholders))):
      raise ValueError("the tokenizer lacks contiguous placeholder tokens <c0>..<c"
                       f"{self.num_placeholders - 1}>; build it with "
                       "build_word_tokenizer/load_clip_tokenizer(num_placeholders=C)")
    self.placeholder_start = ids[0] if ids else len(tokenizer)
    self.bos_id = int(tokenizer.bos_token_id)
    self.eos_id = int(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id
    self.pad_id = int(self.eos_id if pad is None else pad)
    self.truncated = 0        # prompts cut to max_length so far (see encode)

  @classmethod
  def from_config(cls, config) -> "PromptTokenizer":
    """From the full config: ``config.text`` and ``config.concepts``.

    Uses the CLIP tokenizer in ``config.text.tokenizer_dir`` when set, else
    the word tokenizer over ``DEFAULT_WORDS``; raises when the tokenizer
    (placeholders included) does not fit ``config.text.vocab_size``.
    """
    capacity = config.concepts.capacity
    directory = config.text.get("tokenizer_dir")
    if directory:
      tok = load_clip_tokenizer(directory, capacity)
    else:
      tok = build_word_tokenizer(DEFAULT_WORDS, capacity,
                                 model_max_length=config.text.max_length)
    if len(tok) > config.text.vocab_size:
      raise ValueError(
          f"the tokenizer has {len(tok)} tokens ({capacity} concept placeholders "
          f"included) but config.text.vocab_size is {config.text.vocab_size}; raise "
          "config.text.vocab_size or lower config.concepts.capacity")
    return cls(tok, max_length=config.text.max_length, num_placeholders=capacity,
               ref_tokens=config.concepts.ref_tokens)

  def __len__(self) -> int:
    return len(self.tokenizer)

  @property
  def placeholder_ids(self) -> np.ndarray:
    """``[C]`` int32 ids of ``<c0>…<c{C-1}>``."""
    return np.arange(self.placeholder_start,
                     self.placeholder_start + self.num_placeholders, dtype=np.int32)

  def placeholder_slots(self, text: str) -> list[int]:
    """Bank slots named in ``text``, in order of first appearance, no repeats.

    Raises:
      ValueError: a placeholder ``<ci>`` with ``i >= C``.
    """
    slots: list[int] = []
    for match in _PLACEHOLDER_RE.finditer(text):
      slot = int(match.group(1))
      if slot >= self.num_placeholders:
        raise ValueError(
            f"prompt {text!r} names concept slot {match.group(0)} but the bank has "
            f"{self.num_placeholders} slots (<c0>..<c{self.num_placeholders - 1}>)")
      if slot not in slots:
        slots.append(slot)
    return slots

  def encode(self, prompts: Sequence[str] | str) -> np.ndarray:
    """Tokenizes a batch: ``B`` prompts -> ``[B, L]`` int32.

    Each row is ``BOS, tokens…, EOS, pad…`` with ``L = max_length``; every
    placeholder becomes ``K`` consecutive copies of its id. A prompt longer
    than ``L`` is truncated *before* EOS (EOS always ends the text, the text
    encoder pools there) with a logged warning (the first few times; all
    are counted in ``self.truncated``) — unless that would cut a
    placeholder token, which is an error, since the concept would then
    vanish silently.

    Raises:
      ValueError: a placeholder index ``>= C``, or a placeholder truncated away.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    for p in prompts:
      self.placeholder_slots(p)            # validates the slot indices
    body_len = self.max_length - 2
    pieces = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
    start, end = self.placeholder_start, self.placeholder_start + self.num_placeholders
    for row, (prompt, ids) in enumerate(zip(prompts, pieces)):
      ids = np.asarray(ids, dtype=np.int64)
      is_ph = (ids >= start) & (ids < end)
      ids = np.repeat(ids, np.where(is_ph, self.ref_tokens, 1))   # K-expansion
      if len(ids) > body_len:
        cut = ids[body_len:]
        if np.any((cut >= start) & (cut < end)):
          raise ValueError(
              f"prompt {prompt!r} is too long: its concept placeholder would be "
              f"truncated ({len(ids) + 2} tokens with each placeholder x"
              f"{self.ref_tokens}, max_length {self.max_length}); shorten the "
              "prompt or move the concept earlier")
        self.truncated += 1
        if self.truncated <= _MAX_TRUNCATION_WARNINGS:
          dropped = self.tokenizer.decode([int(t) for t in cut]).strip()
          log.warning("prompt %r has %d tokens, over the text encoder's %d: truncated, "
                      "dropping %r%s", prompt, len(ids) + 2, self.max_length, dropped,
                      "" if self.truncated < _MAX_TRUNCATION_WARNINGS else
                      " (further truncations are not reported)")
        ids = ids[:body_len]
      out[row, 0] = self.bos_id
      out[row, 1:1 + len(ids)] = ids
      out[row, 1 + len(ids)] = self.eos_id
    return out

  def decode(self, token_ids: np.ndarray) -> list[str]:
    """``[B, L]`` ids -> prompts (the inverse of ``encode`` up to normalisation).

    Each run of a placeholder id becomes ``run_length / K`` (rounded up)
    placeholders, text between placeholders is decoded by the tokenizer, and
    everything from the first EOS on is dropped.
    """
    token_ids = np.atleast_2d(np.asarray(token_ids))
    start, end = self.placeholder_start, self.placeholder_start + self.num_placeholders
    texts = []
    for row in token_ids:
      row = [int(t) for t in row]
      if row and row[0] == self.bos_id:
        row = row[1:]
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      parts: list[str] = []
      i = 0
      while i < len(row):
        j = i
        if start <= row[i] < end:
          while j < len(row) and row[j] == row[i]:
            j += 1
          n = -(-(j - i) // self.ref_tokens)
          parts.extend([placeholder(row[i] - start)] * n)
        else:
          while j < len(row) and not start <= row[j] < end:
            j += 1
          parts.append(self.tokenizer.decode(row[i:j]))
        i = j
      texts.append(" ".join(" ".join(parts).split()))
    return texts
