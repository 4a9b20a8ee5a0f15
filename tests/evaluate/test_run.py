"""``evaluate.run`` as a library: its refusals come before the model loads.

The evaluations themselves run end to end in ``tests/launch/test_evaluate_cli.py``.
"""

import pytest

from persvid_jax import config_lib
from persvid_jax.evaluate import run


@pytest.fixture
def eval_config():
  return config_lib.load_config("configs/eval.py:size=tiny")


@pytest.mark.parametrize("overrides, flags, words", [
    (["probe.draws=0"], dict(run_probe=True), "config.probe.draws=0 must be an integer >= 1"),
    (["probe.examples=1"], dict(run_probe=True), "config.probe.examples=1 must be"),
    (["probe.timesteps=(100, -1)"], dict(run_probe=True), "config.probe.timesteps[i]=-1"),
    (["dreambench.photos=0"], dict(run_dreambench=True), "config.dreambench.photos=0"),
    (["dreambench.prompts=-1"], dict(run_dreambench=True), "config.dreambench.prompts=-1"),
    (["dreambench.seeds=(0, -2)"], dict(run_dreambench=True), "[0, 4294967295]"),
    (["suite.scale='middle'"], {}, "config.suite"),
])
def test_check_config_names_the_field(eval_config, overrides, flags, words):
  config = config_lib.apply_overrides(eval_config, overrides)
  with pytest.raises(config_lib.ConfigError) as info:
    run.check_config(config, **flags)
  assert words in str(info.value)


def test_check_config_leaves_the_modes_not_run_alone(eval_config):
  config = config_lib.apply_overrides(eval_config, ["probe.draws=0", "dreambench.photos=0"])
  run.check_config(config)                              # the suite: fine


@pytest.mark.parametrize("kwargs, words", [
    (dict(run_probe=True, run_dreambench=True), "choose one"),
    (dict(variant_models={"bogus": ["/x"]}), "no variant needs it"),
    (dict(run_probe=True, overrides=["probe.draws=0"]), "probe.draws=0"),
])
def test_evaluate_refuses_before_loading_the_model(eval_config, tmp_path, kwargs, words):
  config = config_lib.apply_overrides(eval_config, kwargs.pop("overrides", []))
  with pytest.raises(config_lib.ConfigError, match=None) as info:
    # A model that does not exist: reaching the loader would be a ModelError instead.
    run.evaluate(config, tmp_path / "r.json", model=[str(tmp_path / "no_model")], **kwargs)
  assert words in str(info.value)
  assert list(tmp_path.iterdir()) == []                 # nothing written
