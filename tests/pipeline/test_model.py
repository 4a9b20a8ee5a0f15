"""Model export/load: exact round trip, strict validation, the shipped demo model."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from persvid_jax import params as params_lib
from persvid_jax.models.stack import NETWORKS
from persvid_jax.pipeline import model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _flat(tree):
  return params_lib.flatten(tree, leaf_fn=np.asarray)


def test_export_load_round_trip(micro_model_dir, micro_model, tmp_path):
  again = model_lib.load_model(micro_model_dir)
  assert set(again.params) == set(NETWORKS)
  for name in NETWORKS:
    a = _flat(micro_model.params[name])
    b = _flat(again.params[name])
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert again.feature_id == micro_model.feature_id
  info = json.loads((micro_model_dir / model_lib.INFO_FILE).read_text())
  assert info["parameters"] == sum(v.size for v in _flat(
      {n: micro_model.params[n] for n in NETWORKS}).values())


@pytest.mark.parametrize("damage", ["drop", "extra", "reshape"])
def test_strict_validation_names_the_problem(micro_model_dir, tmp_path, damage):
  bad = tmp_path / "bad"
  shutil.copytree(micro_model_dir, bad)
  flat = load_file(str(bad / model_lib.WEIGHTS_FILE))
  key = sorted(k for k in flat if k.startswith("unet/"))[0]
  if damage == "drop":
    del flat[key]
  elif damage == "extra":
    flat["unet/not_a_layer/kernel"] = np.zeros((2, 2), np.float32)
  else:
    flat[key] = np.zeros(flat[key].shape + (1,), np.float32)
  save_file(flat, str(bad / model_lib.WEIGHTS_FILE))
  expect = {"drop": "1 missing", "extra": "1 unexpected", "reshape": "1 wrong shape"}[damage]
  with pytest.raises(model_lib.ModelError, match=expect):
    model_lib.load_model(bad)


def test_missing_or_empty_model_dir(tmp_path):
  with pytest.raises(model_lib.ModelError, match="does not exist"):
    model_lib.load_model(tmp_path / "nope")
  with pytest.raises(model_lib.ModelError, match="not a training workdir"):
    model_lib.load_model(tmp_path)


def test_workdir_fine_tuned_from_an_exported_model(micro_model_dir, micro_model, tmp_path):
  """A stage's workdir started from an exported model (``init_from=MODEL``):
  loading it takes the stage's networks from its checkpoint and the rest
  from that model, and says so in the provenance."""
  import jax
  from persvid_jax import checkpoint as ckpt_lib
  config = micro_model.config.copy_and_resolve_references()
  config.train.stage = "sr"
  config.train.init_from = str(micro_model_dir)
  tuned = jax.tree.map(lambda a: a + 1.0, micro_model.params["sr_unet"])
  manager = ckpt_lib.make_manager(tmp_path / "sr" / "checkpoints", async_save=False)
  ckpt_lib.save(manager, 7, {"ema_params": {"sr_unet": tuned}}, config)
  manager.close()

  model = model_lib.load_model(tmp_path / "sr")
  for a, b in zip(jax.tree.leaves(model.params["sr_unet"]), jax.tree.leaves(tuned)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(model.params["unet"]),
                  jax.tree.leaves(micro_model.params["unet"])):
    np.testing.assert_array_equal(a, b)
  sources = model.info["sources"]
  assert sources[0] == dict(workdir=str((tmp_path / "sr").resolve()), step=7, stage="sr",
                            networks=["sr_unet"])
  assert sources[1]["model"] == str(micro_model_dir.resolve())
  assert sources[1]["from"] == micro_model.info["sources"]      # provenance kept, nested
  assert sorted(sources[1]["networks"]) == sorted(set(NETWORKS) - {"sr_unet"})


def test_shipped_demo_model_loads_strictly():
  """The model in the package matches the current code (or this fails: retrain/re-export)."""
  model = model_lib.load_model()          # default: persvid_jax/assets/demo
  assert model.config.name == "demo"
  weights = model_lib.DEMO_MODEL_DIR / model_lib.WEIGHTS_FILE
  assert weights.stat().st_size <= 30 * 2**20
  for leaf in _flat({n: model.params[n] for n in NETWORKS}).values():
    assert np.all(np.isfinite(leaf))
  info = json.loads((model_lib.DEMO_MODEL_DIR / model_lib.INFO_FILE).read_text())
  assert info["feature_id"] == model.feature_id
  def stages(sources):   # along nested provenance (a stage fine-tuned from an export)
    for s in sources:
      yield s.get("stage")
      yield from stages(s.get("from", []))
  assert {"personalize", "sr"} <= set(stages(info["sources"]))
  covered = {n for s in info["sources"] for n in s["networks"]}
  assert covered == set(NETWORKS)


def test_place_shards_params_over_the_mesh(micro_model):
  """``place``: host params -> device arrays sharded by logical axes, values unchanged."""
  import jax
  from persvid_jax import sharding
  placed = model_lib.place(micro_model, sharding.make_mesh(4, 2))
  kernel = placed.params["unet"]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
  assert isinstance(kernel, jax.Array) and "fsdp" in str(kernel.sharding.spec)
  assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 2
  for a, b in zip(jax.tree.leaves(micro_model.params), jax.tree.leaves(placed.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert placed.feature_id == micro_model.feature_id


def test_workdir_saved_on_other_devices_loads_on_the_host(tmp_path):
  """A checkpoint written with params sharded over devices this process lacks
  (a pod's, or the 2-process test's) still exports: the loader reads the
  EMA params to host numpy, not onto the saved shardings."""
  import subprocess
  import sys
  from persvid_jax import checkpoint as ckpt_lib
  from persvid_jax import config_lib
  config = config_lib.load_config("tiny:micro")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[6:8]), ("fsdp",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  w = jax.device_put(np.arange(8, dtype=np.float32), sharded)
  state = {"params": {"unet": {"w": w}}, "ema_params": {"unet": {"w": w * 2}}}
  manager = ckpt_lib.make_manager(tmp_path / "checkpoints", async_save=False)
  ckpt_lib.save(manager, 5, state, config)
  manager.close()
  code = ("import numpy as np; from persvid_jax.pipeline import model as m; "
          "config, params, step = m._workdir_params(__import__('pathlib').Path(%r)); "
          "w = params['unet']['w']; assert isinstance(w, np.ndarray), type(w); "
          "print(step, w.tolist())" % str(tmp_path))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split("\n")[0] == "5 " + str([2.0 * i for i in range(8)])
