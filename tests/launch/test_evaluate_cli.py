"""``launch.evaluate`` end to end as a subprocess on a tiny suite (micro model)."""

import json
import pathlib

import pytest

from tests.launch.test_concepts_generate_cli import _run, _start

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ablations_table(tmp_path, micro_model_dir):
  out = tmp_path / "ablations.json"
  r = _run("launch.evaluate", "--config", "configs/eval.py:size=tiny", "--model", micro_model_dir,
           "--out", out, "--ablations", "--config.suite.subjects=1", "--config.suite.seeds=(0, 1)",
           # A variant's own model: loaded from --variant-model, its row run.
           "--variant-model", f"sr_kernel5={micro_model_dir}")
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  table = out.with_suffix(".md").read_text()
  variants = result["variants"]
  ran = [n for n, v in variants.items() if v["status"] == "ok"]
  assert ran == ["method", "removed", "described", "detail_off", "target_stored",
                 "target_image", "target_fused", "no_cascade", "sr_kernel5"]
  assert "| sr_kernel5 | 0." in table
  assert variants["sr_kernel3"]["status"] == "not run"
  assert "sr_kernel=3" in variants["sr_kernel3"]["needs"]
  m = variants["method"]["metrics"]
  assert len(variants["method"]["per_seed"]["shape_iou"]) == 2
  assert 0.0 <= m["shape_iou"]["mean"] <= 1.0 and m["colour_error"]["std"] >= 0.0
  assert "personalization/colour_error" in result["comparison"]
  assert "cascade/single_instance" in result["comparison"]
  assert "| method |" in table and "| no_cascade |" in table and "±" in table
  # The scale rows at the generated size (tiny: 2 frames of 16 px); a one-subject suite
  # has no other subject to score against, so only the truth row.
  ref = result["reference"]
  assert ref["size"] == [2, 16, 16] and ref["truth"]["background_correct"] == 1.0
  assert ref["other_subject"] == {}
  assert "| *truth* |" in table and "| *other subject* |" not in table
  truth_line = [l for l in (r.stdout + r.stderr).splitlines() if "(truth)" in l]
  assert truth_line and "no other subject in the suite" in truth_line[0], truth_line
  assert "nan" not in truth_line[0], truth_line
  assert "wall" in table and result["wall_seconds"] > 0


def test_probe_table(tmp_path, micro_model_dir):
  out = tmp_path / "probe.json"
  r = _run("launch.evaluate", "--config", "configs/eval.py:size=tiny", "--model", micro_model_dir,
           "--out", out, "--probe", "--config.probe.timesteps=(500,)")
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["timesteps"] == [500] and set(result["subject"]) == set(
      ["matched", "shuffled", "ref_only", "detail_only", "none", "words"])
  assert "| shuffled |" in out.with_suffix(".md").read_text() and "reference gain" in r.stdout


@pytest.mark.slow
def test_dreambench_protocol(tmp_path, micro_model_dir):
  out = tmp_path / "db.json"
  r = _run("launch.evaluate", "--config", "configs/eval.py:size=tiny", "--model", micro_model_dir,
           "--out", out, "--dreambench", "--config.dreambench.subjects=('cat',)")
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [row["prompt"] for row in result["rows"]] == ["a <cat> cat in the jungle"]
  row = result["rows"][0]
  assert row["text"] == "a cat in the jungle"          # CLIP-T reads the class word
  for k in ("clip_t", "clip_i", "dino_i", "temporal_consistency"):
    assert -1.0 <= row[k] <= 1.0
  assert set(result["means"]) >= {"clip_t", "clip_i", "dino_i", "flow", "dynamic"}
  assert result["weights"] == "random"
  assert "random" in r.stdout and "| cat |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_bad_input_exits_2(tmp_path, micro_model_dir):
  cases = [
      (["--out", tmp_path / "missing" / "r.json"], "does not exist"),
      (["--out", tmp_path / "r.txt"], ".json"),
      (["--out", tmp_path / "r.json", "--variant-model", "nope=/x"], "no variant needs it"),
      (["--out", tmp_path / "r.json", "--variant-model", "sr_kernel3=/nonexistent"],
       "does not exist"),
      (["--out", tmp_path / "r.json", "--config.variants=('method', 'bogus')"], "bogus"),
      (["--out", tmp_path / "r.json", "--dreambench", "--config.dreambench.root=/nonexistent"],
       "not found"),
      (["--out", tmp_path / "r.json", "--dreambench", "--config.dreambench.subjects=('nope',)"],
       "unknown DreamBench subject"),
      (["--out", tmp_path / "r.json", "--probe", "--config.probe.examples=1"],
       "config.probe.examples=1 must be an integer >= 2"),
      (["--out", tmp_path / "r.json", "--probe", "--config.probe.draws=0"],
       "config.probe.draws=0 must be an integer >= 1"),
      (["--out", tmp_path / "r.json", "--dreambench", "--config.dreambench.photos=0"],
       "config.dreambench.photos=0 must be"),
      (["--out", tmp_path / "r.json", "--probe", "--dreambench"], "choose one"),
      (["--out", tmp_path / "r.json", "--config.suite.scale=middle"], "use one of final, base"),
  ]
  procs = [(_start("launch.evaluate", "--config", "configs/eval.py:size=tiny", "--model",
                   micro_model_dir, *args), args, match) for args, match in cases]
  for p, args, match in procs:
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 2, (args, stderr[-2000:])
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], (args, lines)
  assert not any(tmp_path.glob("*.json")) and not any(tmp_path.glob("*.md"))
