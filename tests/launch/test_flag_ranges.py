"""Numeric flags out of their range: one line on stderr, exit status 2, no traceback.

Every numeric flag of the launchers is parsed by a ``_common.Range``, so the
refusal comes from argparse while the flags are parsed, before any model is
loaded or program compiled (each case here finishes in seconds; the ones
whose launcher imports no jax before parsing, well under one). ``--help``
shows each range.
"""

import argparse
import subprocess
import sys
import time

import pytest

from launch import _common
from tests.launch.test_concepts_generate_cli import ROOT, _env, _start

# (launcher, argv, the flag and value the one line must name)
CASES = [
    ("launch.app", ["--port", "0"], "--port: 0 must be an integer in [1, 65535]"),
    ("launch.app", ["--port", "70000"], "--port: 70000 must be"),
    ("launch.app", ["--max-upload-mb", "-1"], "--max-upload-mb: -1 must be a finite number > 0"),
    ("launch.app", ["--steps", "0"], "--steps: 0 must be an integer >= 1"),
    ("launch.demo", ["--seed", "-1"], "--seed: -1 must be an integer in [0, 4294967295]"),
    ("launch.demo", ["--sr-steps", "0"], "--sr-steps: 0 must be"),
    ("launch.generate", ["--prompt", "a cat", "--out", "v.gif", "--guidance", "-0.5"],
     "--guidance: -0.5 must be a finite number >= 0"),
    ("launch.generate", ["--prompt", "a cat", "--out", "v.gif", "--scale", "0"],
     "--scale: 0 must be an integer >= 1"),
    ("launch.generate", ["--prompt", "a cat", "--out", "v.gif", "--seed", "4294967296"],
     "--seed: 4294967296 must be"),
    ("launch.bench", ["--config", "tiny", "--batch", "0"], "--batch: 0 must be an integer >= 1"),
    ("launch.bench", ["--config", "tiny", "--peak-tflops", "inf"], "--peak-tflops: inf must be"),
    ("launch.bench", ["--aot", "h200", "--gpus", "0"], "--gpus: 0 must be"),
    ("launch.concepts", ["restore", "--db", "nowhere", "--step", "-1"],
     "--step: -1 must be an integer >= 0"),
    ("launch.demo", ["--steps", "many"], "--steps: 'many' is not an integer >= 1"),
]


def test_out_of_range_flags_exit_2_with_one_line():
  t0 = time.perf_counter()
  procs = [(_start(module, *argv), module, argv, words) for module, argv, words in CASES]
  for p, module, argv, words in procs:
    out, err = p.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert p.returncode == 2, (module, argv, p.returncode, err[-2000:])
    assert "Traceback" not in err and out == "", (module, argv, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: argument "), (module, argv, lines)
    assert words in lines[0] and f"(see python -m {module}" in lines[0], (module, lines)
  # Before any model or compilation: the whole batch in well under a minute.
  assert time.perf_counter() - t0 < 60


def test_help_shows_the_ranges():
  r = subprocess.run([sys.executable, "-m", "launch.app", "--help"], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  text = " ".join(r.stdout.split())
  assert "[an integer in [1, 65535]]" in text and "[a finite number > 0]" in text


@pytest.mark.parametrize("kind, text, value", [
    (_common.int_range(1), "3", 3), (_common.int_range(0, 5), "5", 5),
    (_common.float_range(0), "0", 0.0), (_common.float_range(0, 1), "0.25", 0.25),
])
def test_range_accepts_values_inside(kind, text, value):
  assert kind(text) == value and type(kind(text)) is type(value)


@pytest.mark.parametrize("kind, text, words", [
    (_common.int_range(1), "0", "0 must be an integer >= 1"),
    (_common.int_range(1), "1.5", "'1.5' is not an integer >= 1"),
    (_common.int_range(0, 5), "6", "6 must be an integer in [0, 5]"),
    (_common.float_range(0), "nan", "nan must be a finite number >= 0"),
    (_common.float_range(0, lo_open=True), "0", "0 must be a finite number > 0"),
    (_common.float_range(0, 1), "1.01", "must be a finite number in [0, 1]"),
])
def test_range_refuses_values_outside(kind, text, words):
  with pytest.raises(argparse.ArgumentTypeError, match=None) as info:
    kind(text)
  assert words in str(info.value)
