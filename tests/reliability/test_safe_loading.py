"""Safe loading: reading a model, a concept database and a checkpoint never unpickles.

Watched with a Python audit hook on ``pickle.find_class``, the event every
unpickler raises before it resolves a class or function (the step that lets
a pickle run code), whichever library does the unpickling (torch.load,
numpy allow_pickle, joblib, ...).
"""

import pickle
import sys

import numpy as np

_WATCH = {"on": False, "seen": []}


def _hook(event, args):
  if _WATCH["on"] and event == "pickle.find_class":
    _WATCH["seen"].append(args)


sys.addaudithook(_hook)       # cannot be removed; inert unless _WATCH["on"]


class _Thing:
  pass


def test_loading_never_unpickles(tmp_path, tiny_config):
  from persvid_jax import checkpoint as ckpt_lib
  from persvid_jax.concepts import database as db_lib
  from persvid_jax.pipeline import model as model_lib
  db = db_lib.ConceptDatabase.create(tmp_path / "db", tiny_config, "abc")
  db.add("dog", np.ones(db.bank.ref_tokens.shape[1:], np.float32),
         np.ones(db.bank.detail_tokens.shape[1:], np.float32), [])
  manager = ckpt_lib.make_manager(tmp_path / "ck", async_save=False)
  ckpt_lib.save(manager, 1, {"w": np.ones(3, np.float32)}, tiny_config)
  manager.close()

  _WATCH["on"], _WATCH["seen"] = True, []
  try:
    pickle.loads(pickle.dumps(_Thing()))                 # the watch works ...
    assert _WATCH["seen"], "the audit hook saw no unpickling"
    _WATCH["seen"] = []
    # ... and sees none here: the shipped model's files (what load_model reads) ...
    config, params, _ = model_lib.read_exported(model_lib.DEMO_MODEL_DIR)
    assert db_lib.ConceptDatabase.open(tmp_path / "db").concepts["dog"].slot == 0
    manager = ckpt_lib.make_manager(tmp_path / "ck", async_save=False)
    restored = manager.restore(1)
    manager.close()
    assert ckpt_lib.config_from_json(restored["config"]).text.width == tiny_config.text.width
  finally:
    _WATCH["on"] = False
  assert params and config.text.width > 0 and _WATCH["seen"] == [], _WATCH["seen"]
