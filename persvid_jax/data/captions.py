"""The captions of ``persvid_synthetic``: coarse words for a subject, and the oracle's precise ones.

Captions name a subject only coarsely ("a reddish star with bluish stripes"):
the exact colours, pattern geometry and aspect are what a concept must carry
beyond words (docs/design.md, "concept swap"). ``oracle_phrase`` says
everything in vocabulary words, for the oracle-text ablation.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

from persvid_jax.data.scenes import BACKGROUNDS
from persvid_jax.data.subjects import (ASPECT_RANGE, PATTERN_SCALE_RANGE, PATTERNS, SHAPES,
                                       SIZE_RANGE, Subject)

# The noun for the secondary colour's role ("a reddish star with bluish stripes").
_PATTERN_NOUNS = {"striped": "stripes", "dotted": "dots", "checkered": "checkerboard"}
# Caption words of ``subjects.DIRECTIONS``, in the same order.
DIRECTION_PHRASES = ("moving left", "moving right", "moving up", "moving down",
                     "moving towards the camera", "moving away from the camera")

# Bank slot 0's placeholder, as ``persvid_jax.concepts.tokens.placeholder(0)``
# writes it (not imported: that module pulls in transformers).
PLACEHOLDER = "<c0>"

# Hue bins in degrees -> coarse words.
_HUES = ((15, "reddish"), (40, "orangish"), (70, "yellowish"), (165, "greenish"),
         (195, "teal"), (255, "bluish"), (290, "purplish"), (345, "pinkish"), (360, "reddish"))


def colour_name(rgb, detailed: bool = True) -> str:
  """Coarse words for a colour: ``'reddish'``, ``'light bluish'``, ``'grayish'``.

  Deliberately lossy (the concept carries the rest): many colours share a name.
  """
  h, s, v = colorsys.rgb_to_hsv(*[float(c) for c in rgb])
  if s < 0.2:
    return "whitish" if v > 0.8 else "blackish" if v < 0.25 else "grayish"
  word = next(name for edge, name in _HUES if h * 360 < edge)
  if not detailed:
    return word
  if v < 0.5:
    return f"dark {word}"
  if v > 0.8 and s < 0.6:
    return f"light {word}"
  return word


def _subject_phrases(subject: Subject) -> list[str]:
  """The subject's words, most detailed first (both colours with modifiers,
  both colours, the main colour only)."""
  shape, pattern = SHAPES[subject.shape], PATTERNS[subject.pattern]
  out = []
  for detailed in (True, False):
    c1 = colour_name(subject.primary_rgb, detailed)
    c2 = colour_name(subject.secondary_rgb, detailed)
    if pattern == "plain":
      out.append(f"a plain {c1} {shape}")
    elif pattern == "checkered":
      out.append(f"a {c1} and {c2} checkered {shape}")
    else:
      out.append(f"a {c1} {shape} with {c2} {_PATTERN_NOUNS[pattern]}")
  c1 = colour_name(subject.primary_rgb, False)
  out.append(f"a plain {c1} {shape}" if pattern == "plain" else f"a {c1} {pattern} {shape}")
  return out


def _fit(phrases: list[str], rest: str, max_words: int) -> str:
  for p in phrases:
    text = f"{p} {rest}".strip()
    if len(text.split()) <= max_words:
      return text
  return f"{phrases[-1]} {rest}".strip()


def _digit(x: float, lo: float, hi: float) -> str:
  """``x`` quantised to one of ten bins of ``[lo, hi]``, written as a digit word."""
  return str(int(np.clip(math.floor((x - lo) / (hi - lo) * 10), 0, 9)))


def oracle_phrase(subject: Subject) -> str:
  """The subject with precise attributes, in vocabulary words (digits are words).

  ``a star colored R G B size S A with stripes colored R G B F O P`` — each
  continuous value quantised to 10 bins (rgb channels, size, log-aspect,
  pattern frequency, angle/pi, phase). The "oracle text" ablation: how far
  text alone gets when it says everything.
  """
  def rgb(c):
    return " ".join(_digit(x, 0, 1) for x in c)
  shape, pattern = SHAPES[subject.shape], PATTERNS[subject.pattern]
  size = (f"size {_digit(subject.size, *SIZE_RANGE)} "
          f"{_digit(math.log(subject.aspect), *np.log(ASPECT_RANGE))}")
  head = f"a {'plain ' if pattern == 'plain' else ''}{shape} colored {rgb(subject.primary_rgb)} {size}"
  if pattern == "plain":
    return head
  geometry = " ".join((_digit(subject.pattern_scale, *PATTERN_SCALE_RANGE),
                       _digit(subject.pattern_angle, 0, math.pi),
                       _digit(subject.pattern_phase, 0, 1)))
  return (f"{head} with {_PATTERN_NOUNS[pattern]} colored {rgb(subject.secondary_rgb)} "
          f"{geometry}")


def captions(subject: Subject, direction: int, background: int,
             max_words: int = 14) -> dict[str, str]:
  """The six captions of an example.

  ``caption`` / ``placeholder_caption`` / ``oracle_caption`` describe the
  video; the ``still_*`` ones the same without motion, for when one frame is
  used as an image (``image_fraction`` in the pipeline). In the placeholder
  captions the subject's words are replaced by ``<c0>``. ``caption`` drops
  colour detail until it has at most ``max_words`` words; the oracle captions
  are longer (up to ~30 words) and need a longer ``text.max_length``.
  """
  motion, scene = DIRECTION_PHRASES[direction], BACKGROUNDS[background].phrase
  phrases = _subject_phrases(subject)
  oracle = oracle_phrase(subject)
  return {
      "caption": _fit(phrases, f"{motion} {scene}", max_words),
      "placeholder_caption": f"a {PLACEHOLDER} {motion} {scene}",
      "oracle_caption": f"{oracle} {motion} {scene}",
      "still_caption": _fit(phrases, scene, max_words),
      "still_placeholder_caption": f"a {PLACEHOLDER} {scene}",
      "still_oracle_caption": f"{oracle} {scene}",
  }


CAPTION_KEYS = ("caption", "placeholder_caption", "oracle_caption",
                "still_caption", "still_placeholder_caption", "still_oracle_caption")
