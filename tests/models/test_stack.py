"""The model stack as a whole: logical axis names on every parameter, counts."""

import flax.linen as nn
import jax
import pytest

from persvid_jax import config_lib
from persvid_jax.models import stack


@pytest.fixture(scope="module")
def abstract_tiny(tiny_config):
  return stack.ModelStack.from_config(tiny_config).abstract_variables()


@pytest.mark.parametrize("name", stack.NETWORKS)
def test_every_param_has_logical_axis_names(abstract_tiny, name):
  boxed = jax.tree.leaves(abstract_tiny[name],
                          is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert boxed
  paths = jax.tree_util.tree_leaves_with_path(
      abstract_tiny[name], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  for path, leaf in paths:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{name}{where} has no logical axes"
    assert len(leaf.names) == leaf.value.ndim, (where, leaf.names, leaf.value.shape)
    assert all(isinstance(n, str) for n in leaf.names), (where, leaf.names)
    # flax refuses a logical name twice in one array (logical_to_mesh raises).
    assert len(set(leaf.names)) == len(leaf.names), (where, leaf.names)


@pytest.mark.parametrize("name", stack.NETWORKS)
def test_every_network_shards_on_a_mesh(abstract_tiny, name):
  from persvid_jax import sharding as sh
  shards = sh.param_shardings(abstract_tiny[name], sh.make_mesh(4, 2))
  assert jax.tree.leaves(shards)


def test_params_are_float32_under_bf16(tiny_bf16_config):
  abstract = stack.ModelStack.from_config(tiny_bf16_config).abstract_variables()
  for name, variables in abstract.items():
    for leaf in jax.tree.leaves(nn.meta.unbox(variables)):
      assert leaf.dtype == "float32", name


@pytest.mark.slow
def test_modelscope_generator_counts():
  """Base generator = diffusers' default UNet3DConditionModel (1411.23386 M)."""
  config = config_lib.load_config("configs/modelscope.py:detail=0")
  counts = stack.param_counts(config, names=("unet",))
  assert counts["unet"] == 1_411_233_860
