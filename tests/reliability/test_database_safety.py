"""The concept database under concurrent writers and damage (real Orbax, real flock).

Two processes adding at once must both land; a writer that cannot get the
lock is refused naming the holder; a step whose manifest disagrees with its
bank (or cannot be read) is refused on open with the last good version and
the command that restores it.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from launch import concepts as concepts_cli
from persvid_jax.concepts import database as db_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _features(db, value):
  """Constant ``(ref [K, D], detail [N, Dd])`` of the bank's shapes."""
  return (np.full(db.bank.ref_tokens.shape[1:], value, np.float32),
          np.full(db.bank.detail_tokens.shape[1:], -value, np.float32))


def _steps(directory):
  return sorted(int(p.name) for p in (directory / "steps").iterdir() if p.name.isdigit())


# A writer process: opens the database, waits for the word, adds its concept.
_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from persvid_jax.concepts import database as db_lib
    directory, prefix, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
    db = db_lib.ConceptDatabase.open(directory)
    print("ready", db.step, flush=True)
    sys.stdin.readline()
    shape_r, shape_d = db.bank.ref_tokens.shape[1:], db.bank.detail_tokens.shape[1:]
    db.add(prefix, np.full(shape_r, value, np.float32), np.full(shape_d, -value, np.float32),
           [])
    print("done", db.step, flush=True)
    """)


def test_two_processes_adding_at_once_both_land(tmp_path, tiny_config):
  d = tmp_path / "db"
  db_lib.ConceptDatabase.create(d, tiny_config, "abc")            # step 0, empty
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(d), prefix, str(value)],
                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for prefix, value in (("a", 10.0), ("b", 20.0))]
  try:
    for p in procs:     # both hold version 0 before either writes: the lost-update case
      assert p.stdout.readline().split() == ["ready", "0"], p.communicate()[1][-3000:]
    for p in procs:
      p.stdin.write("go\n")
      p.stdin.flush()
    for p in procs:
      out, err = p.communicate(timeout=300)
      assert p.returncode == 0, err[-3000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  db = db_lib.ConceptDatabase.open(d)
  assert sorted(db.concepts) == ["a", "b"]
  assert sorted(c.slot for c in db.concepts.values()) == [0, 1]
  assert _steps(d) == [0, 1, 2] and db.step == 2                  # two commits, in turn
  for name, value in (("a", 10.0), ("b", 20.0)):
    slot = db.slot_of(name)
    np.testing.assert_array_equal(db.bank.ref_tokens[slot], value)
    np.testing.assert_array_equal(db.bank.detail_tokens[slot], -value)
  for step in _steps(d):                                          # every version is whole
    db_lib.ConceptDatabase.open(d, step=step)


def test_a_stale_object_writes_on_top_of_the_latest_version(tmp_path, tiny_config):
  d = tmp_path / "db"
  db_lib.ConceptDatabase.create(d, tiny_config, "abc")
  first, second = db_lib.ConceptDatabase.open(d), db_lib.ConceptDatabase.open(d)
  first.add("dog", *_features(first, 1.0), [])
  with pytest.raises(db_lib.DatabaseError, match="<dog> already exists"):
    second.add("dog", *_features(second, 2.0), [])
  second.add("cat", *_features(second, 2.0), [])
  assert list(db_lib.ConceptDatabase.open(d).concepts) == ["dog", "cat"]
  first.remove("cat")                                   # first is stale too: cat is known
  assert list(db_lib.ConceptDatabase.open(d).concepts) == ["dog"]


def test_a_held_lock_refuses_the_write_naming_the_holder(tmp_path, tiny_config):
  import fcntl
  d = tmp_path / "db"
  db = db_lib.ConceptDatabase.create(d, tiny_config, "abc")
  db.lock_timeout = 0.3
  fd = os.open(d / db_lib.LOCK_FILE, os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)      # another open file: a rival writer
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"4242\n", 0)
    with pytest.raises(db_lib.DatabaseError,
                       match=r"being written by another process \(pid 4242\); retry"):
      db.add("dog", *_features(db, 1.0), [])
  finally:
    os.close(fd)
  assert _steps(d) == [0] and db.concepts == {}        # nothing written, state unchanged
  db.add("dog", *_features(db, 1.0), [])               # the lock died with its holder
  assert _steps(d) == [0, 1]


def _damage(d: pathlib.Path, how: str) -> None:
  step = d / "steps" / str(_steps(d)[-1])
  if how == "manifest_slot":                            # claims a slot the bank has empty
    path = step / "manifest" / "metadata"
    m = json.loads(path.read_text())
    m["concepts"][-1]["slot"] = 5
    path.write_text(json.dumps(m))
  elif how == "manifest_extra":                         # a concept the bank does not hold
    path = step / "manifest" / "metadata"
    m = json.loads(path.read_text())
    m["concepts"].append(dict(m["concepts"][0], name="ghost", slot=3))
    path.write_text(json.dumps(m))
  elif how == "bank_bytes":                             # the bank's data files overwritten
    for f in (step / "bank").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        f.write_bytes(b"\0" * f.stat().st_size)
  elif how == "manifest_garbage":
    (step / "manifest" / "metadata").write_bytes(b"{not json")
  else:
    raise ValueError(how)


@pytest.mark.parametrize("how, words", [
    ("manifest_slot", "manifest names slots [0, 5] but the bank holds concepts in slots "
                      "[0, 1]"),
    ("manifest_extra", "manifest names slots [0, 1, 3]"),
    ("bank_bytes", "unreadable"),
    ("manifest_garbage", "unreadable"),
])
def test_damage_is_detected_on_open_with_the_last_good_version(tmp_path, tiny_config, capsys,
                                                                how, words):
  d = tmp_path / "db"
  db = db_lib.ConceptDatabase.create(d, tiny_config, "abc")
  db.add("dog", *_features(db, 1.0), [])
  db.add("cat", *_features(db, 2.0), [])
  _damage(d, how)
  with pytest.raises(db_lib.DatabaseError) as info:
    db_lib.ConceptDatabase.open(d)
  message = str(info.value)
  assert "version 2 is damaged" in message and words in message, message
  assert f"restore --db {d} --step 1" in message and "\n" not in message
  # A writer that loaded an older version refuses too (it reloads the latest first).
  older = db_lib.ConceptDatabase.open(d, step=1)
  with pytest.raises(db_lib.DatabaseError, match="version 2 is damaged"):
    older.add("bird", *_features(older, 3.0), [])
  assert _steps(d) == [0, 1, 2]

  # The CLI: list says the same in one line; restore makes version 1 the newest.
  assert concepts_cli.main(["list", "--db", str(d)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "version 2 is damaged" in err[0]
  assert concepts_cli.main(["list", "--db", str(d), "--step", "1", "--json"]) == 0
  assert [c["name"] for c in json.loads(capsys.readouterr().out)["concepts"]] == ["dog"]
  assert concepts_cli.main(["restore", "--db", str(d), "--step", "1"]) == 0
  assert "as version 3" in capsys.readouterr().out
  again = db_lib.ConceptDatabase.open(d)
  assert again.step == 3 and list(again.concepts) == ["dog"]
  np.testing.assert_array_equal(again.bank.ref_tokens[0], 1.0)
  again.add("cat", *_features(again, 2.0), [])        # and it takes writes again
  assert list(db_lib.ConceptDatabase.open(d).concepts) == ["dog", "cat"]
