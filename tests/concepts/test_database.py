"""The concept database: names, add/list/remove, versions, atomicity (real Orbax)."""

import json

import numpy as np
import pytest

from persvid_jax.concepts import database as db_lib


def _features(config, value):
  k, d = config.concepts.ref_tokens, config.text.width
  n, dd = config.concepts.detail_tokens, config.extractor.detail_dim
  return np.full((k, d), value, np.float32), np.full((n, dd), -value, np.float32)


@pytest.mark.parametrize("name", ["", "a/b", "..", "a b", "<dog>", "x" * 33, "image", "IMAGE",
                                  "c3", "-dash", "dog.jpg", "a\\b"])
def test_invalid_names_are_refused(name):
  with pytest.raises(db_lib.DatabaseError):
    db_lib.validate_name(name)


@pytest.mark.parametrize("name", ["dog", "my_dog", "Dog-2", "x" * 32, "c3po", "images"])
def test_valid_names(name):
  assert db_lib.validate_name(name) == name


def test_add_list_remove_reopen(tmp_path, tiny_config):
  d = tmp_path / "db"
  db = db_lib.ConceptDatabase.create(d, tiny_config, "abc", commit=False)
  assert not db_lib.ConceptDatabase.exists(d)       # nothing written before the first add
  db.add("dog", *_features(tiny_config, 1.0), [dict(file="a.jpg", sha256="0" * 64,
                                                    coverage=0.3)])
  db.add("cat", *_features(tiny_config, 2.0), [])
  again = db_lib.ConceptDatabase.open(d)
  assert list(again.concepts) == ["dog", "cat"] and again.feature_id == "abc"
  assert again.slot_of("dog") == 0 and again.slot_of("cat") == 1
  np.testing.assert_array_equal(again.bank.ref_tokens[1], 2.0)
  np.testing.assert_array_equal(again.bank.detail_tokens[0], -1.0)
  assert list(again.bank.valid) == [True, True] + [False] * (tiny_config.concepts.capacity - 2)
  assert again.capacity == tiny_config.concepts.capacity - 1      # <image> slot reserved

  again.remove("dog")
  third = db_lib.ConceptDatabase.open(d)
  assert list(third.concepts) == ["cat"] and not third.bank.valid[0]
  np.testing.assert_array_equal(third.bank.ref_tokens[0], 0.0)    # no stale features
  # The freed slot is reused; the previous versions are still restorable.
  third.add("bird", *_features(tiny_config, 3.0), [])
  assert third.slot_of("bird") == 0
  old = db_lib.ConceptDatabase.open(d, step=1)
  assert list(old.concepts) == ["dog", "cat"]
  mirror = json.loads((d / "concepts.json").read_text())
  assert [c["name"] for c in mirror["concepts"]] == ["bird", "cat"]


def test_duplicates_unknown_and_full(tmp_path, tiny_config):
  db = db_lib.ConceptDatabase.create(tmp_path / "db", tiny_config, "abc")
  db.add("dog", *_features(tiny_config, 1.0), [])
  with pytest.raises(db_lib.DatabaseError, match="already exists"):
    db.add("dog", *_features(tiny_config, 1.0), [])
  with pytest.raises(db_lib.DatabaseError, match="unknown concept <cat>.*<dog>"):
    db.remove("cat")
  for i in range(db.capacity - 1):
    db.add(f"c{i}x", *_features(tiny_config, 1.0), [])
  with pytest.raises(db_lib.DatabaseError, match="full"):
    db.add("one_more", *_features(tiny_config, 1.0), [])
  with pytest.raises(db_lib.DatabaseError, match="not finite"):
    db.remove("dog")
    db.add("nan", *_features(tiny_config, np.nan), [])


def test_interrupted_write_leaves_previous_version(tmp_path, tiny_config):
  d = tmp_path / "db"
  db = db_lib.ConceptDatabase.create(d, tiny_config, "abc")
  db.add("dog", *_features(tiny_config, 1.0), [])
  # What a process killed mid-save leaves: Orbax's temporary step directory.
  partial = d / "steps" / "2.orbax-checkpoint-tmp-1234567"
  (partial / "bank").mkdir(parents=True)
  (partial / "bank" / "garbage").write_bytes(b"\0" * 100)
  again = db_lib.ConceptDatabase.open(d)
  assert again.step == 1 and list(again.concepts) == ["dog"]
  again.add("cat", *_features(tiny_config, 2.0), [])
  assert list(db_lib.ConceptDatabase.open(d).concepts) == ["dog", "cat"]


def test_open_errors(tmp_path):
  with pytest.raises(db_lib.DatabaseError, match="not a concept database"):
    db_lib.ConceptDatabase.open(tmp_path / "nothing")
