"""configs/: siblings built on configs/common.py, found without the library knowing the folder."""

import pathlib

import pytest

from persvid_jax import config_lib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_configs_load_by_path_with_no_search_path(monkeypatch, tmp_path):
  """A config imports its siblings relative to its own file, wherever the folder lies."""
  monkeypatch.setattr(config_lib, "_search_path", [])
  copy = tmp_path / "elsewhere"
  copy.mkdir()
  for f in CONFIGS.glob("*.py"):
    (copy / f.name).write_text(f.read_text())
  for name in ("tiny", "demo", "modelscope", "eval"):
    here = config_lib.load_config(str(copy / f"{name}.py"))
    assert here.to_dict() == config_lib.load_config(str(CONFIGS / f"{name}.py")).to_dict()
  with pytest.raises(config_lib.ConfigError, match="no configs folder is set"):
    config_lib.load_config("tiny")
  config_lib.set_search_path(copy)
  assert config_lib.load_config("demo:stage=sr").train.stage == "sr"


def test_common_is_the_schema_not_a_config():
  """tiny, demo and modelscope share common.py's fields; common itself is no config."""
  assert "common" not in config_lib.known_configs()
  assert {"tiny", "demo", "modelscope", "eval"} <= set(config_lib.known_configs())
  with pytest.raises(config_lib.ConfigError, match="no get_config"):
    config_lib.load_config("common")
  fields = {name: set(config_lib.load_config(name).to_dict())
            for name in ("tiny", "demo", "modelscope")}
  assert fields["tiny"] == fields["demo"] == fields["modelscope"]
