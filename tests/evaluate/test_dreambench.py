"""The DreamBench runner: the real folder parses; the protocol runs end to end."""

import pathlib

import pytest

from persvid_jax.evaluate import dreambench, protocol

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


def test_run_end_to_end(micro_model):
  tok = micro_model.tokenizer
  scorer = protocol.random_scorer(tok.encode, len(tok), tok.max_length, eos_token_id=tok.eos_id)
  bench = dreambench.load(ROOT)
  res = dreambench.run(micro_model, scorer, bench, subjects=["backpack_dog"], num_prompts=2,
                       seeds=(0,), max_photos=2, steps=2, sr_steps=1)
  assert len(res["rows"]) == 2
  row = res["rows"][0]
  assert row["prompt"] == "a <backpack_dog> backpack in the jungle"
  assert row["text"] == "a backpack in the jungle"
  for k in ("clip_t", "clip_i", "dino_i", "temporal_consistency"):
    assert -1.0 <= row[k] <= 1.0
  assert set(res["means"]) >= {"clip_t", "clip_i", "dino_i", "flow", "dynamic"}
  assert res["weights"] == "random"
  with pytest.raises(dreambench.DreamBenchError, match="unknown DreamBench subject"):
    dreambench.run(micro_model, scorer, bench, subjects=["nope"])
