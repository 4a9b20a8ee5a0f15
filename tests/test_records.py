"""Run records: collected from the real tree and devices, kept with history, compared on resume."""

import json
import logging
import pathlib
import subprocess

import jax

from persvid_jax import config_lib, records

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(*overrides):
  return config_lib.apply_overrides(config_lib.load_config("tiny:micro"), list(overrides))


def test_record_holds_what_decides_a_run():
  record = records.collect(_config("seed=3"), seeds={"seed": 3}, extra={"kind": "train"})
  json.dumps(record)                                    # JSON all the way down
  assert record["config"]["train"]["batch_size"] == 4 and record["config"]["seed"] == 3
  head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
  if head:   # a checkout: the commit of the tree the package was imported from
    assert record["git"]["commit"] == head and isinstance(record["git"]["dirty"], bool)
  assert record["packages"]["jax"] == jax.__version__ and "numpy" in record["packages"]
  assert record["packages"]["python"].count(".") == 2
  assert record["devices"] == {"platform": "cpu", "kind": jax.devices()[0].device_kind,
                               "count": jax.device_count(), "local_count": jax.local_device_count(),
                               "process_count": 1, "process_index": 0,
                               "cudnn_attention": False}
  assert record["seeds"] == {"seed": 3}
  assert record["data"]["source"] == "renderer" and record["data"]["builder_version"] == "1.0.0"
  assert len(record["data"]["renderer_sha256"]) == 64
  # The evaluation config's seeds are found by name; its data is the renderer.
  eval_config = config_lib.load_config("eval:size=tiny")
  assert records.config_seeds(eval_config) == {"suite.seeds": [0, 1], "suite.world_seed": 0,
                                               "dreambench.seeds": [0]}
  assert records.data_info(eval_config)["name"] == "persvid_synthetic"


def test_outside_git_the_commit_is_unknown(tmp_path):
  pkg = tmp_path / "persvid_jax"
  pkg.mkdir()
  assert records.git_state(pkg) == {"commit": "unknown", "dirty": "unknown",
                                    "diff_sha256": "unknown"}


def test_resume_with_a_changed_config_warns_and_keeps_history(tmp_path, caplog):
  assert records.record_run(tmp_path, _config(), extra={"kind": "train"}) == []
  first = records.read(tmp_path)
  # Extending the run (total_steps) is a normal resume: no warning for it.
  assert records.record_run(tmp_path, _config("train.total_steps=400"),
                            extra={"kind": "train"}) == []
  with caplog.at_level(logging.WARNING, logger="persvid_jax.records"):
    diffs = records.record_run(tmp_path, _config("train.total_steps=400",
                                                 "train.learning_rate=0.003", "seed=1"),
                                 extra={"kind": "train"})
  assert diffs == ["config.seed: 0 -> 1", "config.train.learning_rate: 0.001 -> 0.003"]
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 2 and "config.train.learning_rate: 0.001 -> 0.003" in warned[1]
  assert sorted(p.name for p in (tmp_path / "run_records").iterdir()) == [
      "000.json", "001.json", "002.json"]
  assert json.loads((tmp_path / "run_records" / "000.json").read_text()) == first
  assert records.read(tmp_path)["config"]["seed"] == 1
  # Another machine: packages and devices differ, one line each.
  n, kind = first["devices"]["count"], first["devices"]["kind"]
  moved = dict(first, packages=dict(first["packages"], jax="0.0.1"),
               devices=dict(first["devices"], kind="NVIDIA H100", count=n + 1))
  assert records.compare(first, moved) == [
      f"devices.count: {n} -> {n + 1}", f"devices.kind: {kind} -> NVIDIA H100",
      f"packages.jax: {jax.__version__} -> 0.0.1"]
