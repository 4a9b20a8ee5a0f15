"""The DreamBench folder parses (the protocol run is tests/launch/test_evaluate_cli.py)."""

import pathlib

import pytest

from persvid_jax.evaluate import dreambench

ROOT = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "dreambench"


def test_load_real_folder():
  bench = dreambench.load(ROOT)
  assert len(bench.subjects) == 30
  assert len(bench.object_prompts) == 25 and len(bench.live_prompts) == 25
  assert bench.object_prompts[0] == "a {0} {1} in the jungle"
  live = {s.name for s in bench.subjects if s.live}
  assert {"cat", "cat2", "dog", "dog8"} <= live and "backpack" not in live
  assert all(len(s.photos) >= 4 for s in bench.subjects)
  cat = next(s for s in bench.subjects if s.name == "cat")
  assert "wearing a red hat" in " ".join(bench.prompts_for(cat))


def test_load_errors(tmp_path):
  with pytest.raises(dreambench.DreamBenchError, match="not found"):
    dreambench.load(tmp_path)
  (tmp_path / "prompts_and_classes.txt").write_text("subject_name,class\nfoo,bar\n")
  with pytest.raises(dreambench.DreamBenchError, match="no photos"):
    dreambench.load(tmp_path)
