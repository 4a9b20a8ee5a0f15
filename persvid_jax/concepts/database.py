"""The personalization database on disk: the ``ConceptBank`` + a manifest, in Orbax.

Layout of a database directory::

    DIR/steps/<n>/bank/      the ConceptBank arrays (Orbax StandardSave)
    DIR/steps/<n>/manifest/  names, slots, provenance (Orbax JsonSave)
    DIR/concepts.json        a human-readable copy of the latest manifest

Every change (add, remove) is a *new* Orbax step, written to a temporary
directory and renamed into place by Orbax when complete; the previous steps
stay (``keep`` of them), so an interrupted write leaves the last complete
version as the database, and older versions can be restored
(``ConceptDatabase.open(dir, step=n)``). The bank and its manifest are items
of the same step, so they can never disagree. ``concepts.json`` is only a
mirror for people and tools that read JSON; the steps are the truth.

**Several writers.** Every write (create, add, remove, restore) holds an
exclusive ``flock`` on ``DIR/.lock`` and first reloads the latest step, so
two processes adding at once both land (the second applies its change on
top of the first's); a writer that cannot get the lock within
``lock_timeout`` seconds is refused with ``DatabaseError`` naming the
holder's pid. Readers take no lock: a step appears only when complete.

**Damage.** ``open`` checks that the manifest and the bank agree (slots in
range and unique, names valid, ``valid`` flags exactly the manifest's slots,
shapes and capacity, finite features); a step that disagrees or cannot be
read is refused with the last good version and the command that makes it
the newest again (``python -m launch.concepts restore --db DIR --step N``).

Slot ``C - 1`` of the bank is reserved for ``<image>`` (the subject of a
target image given at generation time), so a database holds up to ``C - 1``
concepts. Features are tied to the model that made them: the manifest
records ``Model.feature_id`` and generation refuses a database of another model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from persvid_jax import atomic
from persvid_jax.concepts import dblock
from persvid_jax.concepts.bank import ConceptBank
from persvid_jax.concepts.dblock import LOCK_FILE, DatabaseError, check_writable

# Re-exported from dblock: callers use ``database`` alone (catch ``DatabaseError``,
# ``check_writable`` before loading a model).
__all__ = ["LOCK_FILE", "MAX_NAME_LENGTH", "ConceptDatabase", "ConceptRecord", "DatabaseError",
           "check_writable", "describe", "validate_name"]

MANIFEST_VERSION = 1
LOCK_TIMEOUT_S = 10.0     # a write takes ~1 s; a longer wait means a stuck writer
MAX_NAME_LENGTH = 32
# Names appear in prompts as <name>: ASCII letters, digits, '_' and '-',
# starting with a letter or digit. That rules out path separators, spaces,
# control characters, dots ('..'), and the angle brackets of the prompt
# syntax. Non-ASCII names are refused on purpose: look-alikes ('dog' with a
# Cyrillic 'о', fullwidth 'ｄｏｇ') and unnormalised accents would be
# different concepts that print the same. (fullmatch: '$' alone would accept
# a trailing newline.)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
# Reserved: <image> (target-image mode) and the raw placeholders <c0>...
_RESERVED_RE = re.compile(r"^(image|c[0-9]+)$", re.IGNORECASE)


def validate_name(name: str) -> str:
  """Returns ``name`` if it is a valid concept name, else raises ``DatabaseError``."""
  if not isinstance(name, str) or not name:
    raise DatabaseError("concept name is empty; give a name like 'my_dog'")
  if len(name) > MAX_NAME_LENGTH:
    raise DatabaseError(f"concept name {name!r} is {len(name)} characters long; use at most "
                        f"{MAX_NAME_LENGTH}")
  if not _NAME_RE.fullmatch(name):
    raise DatabaseError(f"concept name {name!r} is invalid; use ASCII letters, digits, '_' "
                        "and '-' only (no spaces, path separators, brackets or accents), "
                        "starting with a letter or digit")
  if _RESERVED_RE.match(name):
    raise DatabaseError(f"concept name {name!r} is reserved (<image> and <cN> have a meaning "
                        "in prompts); choose another name")
  return name


@dataclasses.dataclass(frozen=True)
class ConceptRecord:
  """One stored concept (a manifest entry)."""
  name: str
  slot: int
  num_images: int
  images: tuple            # ({'file': basename, 'sha256': hex, 'coverage': float}, ...)
  created: str             # ISO 8601, UTC

  def to_json(self) -> dict:
    """The manifest entry (a JSON-serialisable dict)."""
    return dict(name=self.name, slot=self.slot, num_images=self.num_images,
                images=list(self.images), created=self.created)

  @classmethod
  def from_json(cls, d: dict) -> "ConceptRecord":
    """Inverse of ``to_json``."""
    return cls(name=d["name"], slot=int(d["slot"]), num_images=int(d["num_images"]),
               images=tuple(d["images"]), created=d["created"])


def _bank_to_numpy(bank: ConceptBank) -> dict[str, np.ndarray]:
  return {"ref_tokens": np.asarray(bank.ref_tokens, np.float32),
          "detail_tokens": np.asarray(bank.detail_tokens, np.float32),
          "valid": np.asarray(bank.valid, bool)}


class _Damaged(Exception):
  """A step that cannot be read or whose manifest disagrees with its bank."""


def _check_consistent(bank: ConceptBank, manifest: dict) -> None:
  """Raises ``_Damaged`` saying how ``manifest`` and ``bank`` disagree."""
  c = bank.valid.shape[0]
  if bank.ref_tokens.shape[0] != c or bank.detail_tokens.shape[0] != c:
    raise _Damaged(f"bank arrays have {bank.ref_tokens.shape[0]} / "
                   f"{bank.detail_tokens.shape[0]} / {c} slots")
  if manifest.get("capacity") != c - 1:
    raise _Damaged(f"manifest capacity {manifest.get('capacity')} != bank capacity {c - 1}")
  slots, names = [], []
  for entry in manifest.get("concepts", []):
    name, slot = entry.get("name"), entry.get("slot")
    try:
      validate_name(name)
    except DatabaseError:
      raise _Damaged(f"manifest holds an invalid concept name {name!r}") from None
    if not isinstance(slot, int) or not 0 <= slot < c - 1:
      raise _Damaged(f"manifest puts <{name}> in slot {slot!r}, outside 0..{c - 2}")
    slots.append(slot)
    names.append(name)
  if len(set(slots)) != len(slots) or len(set(names)) != len(names):
    raise _Damaged("manifest has a slot or a name twice")
  valid = set(np.flatnonzero(bank.valid).tolist())
  if valid != set(slots):
    raise _Damaged(f"manifest names slots {sorted(slots)} but the bank holds concepts in "
                   f"slots {sorted(valid)}")
  if not (np.all(np.isfinite(bank.ref_tokens)) and np.all(np.isfinite(bank.detail_tokens))):
    raise _Damaged("the bank holds non-finite features")


class ConceptDatabase:
  """A concept database directory (see module docstring).

  Not thread-safe (one object per thread); several processes may write the
  same directory (the write lock serialises them).

  Attributes:
    directory: the database directory.
    bank: the current ``ConceptBank`` (numpy leaves; pass it to jitted code as is).
    concepts: ``{name: ConceptRecord}`` in slot order.
    feature_id: the ``Model.feature_id`` the features were made with.
    step: the Orbax step this state was loaded from / last written.
    lock_timeout: seconds a write waits for another process's write.
  """

  def __init__(self, directory: pathlib.Path, bank: ConceptBank, concepts: dict,
               feature_id: str, step: int, keep: int):
    self.directory = directory
    self.bank = bank
    self.concepts = concepts
    self.feature_id = feature_id
    self.step = step
    self._keep = keep
    self.lock_timeout = LOCK_TIMEOUT_S

  # ---- construction -----------------------------------------------------------

  @staticmethod
  def _manager(directory: pathlib.Path, keep: int, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager((directory / "steps").absolute(), options=options)

  @classmethod
  def exists(cls, directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a database (at least one complete step)."""
    steps = pathlib.Path(directory) / "steps"
    return steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir())

  @classmethod
  def create(cls, directory: str | os.PathLike, config, feature_id: str, *,
             keep: int = 5, commit: bool = True) -> "ConceptDatabase":
    """A new, empty database for a model with ``config``.

    ``commit=False`` writes nothing until the first ``add`` (so a failed
    first add leaves no directory behind); otherwise the empty state is step 0.

    Raises:
      DatabaseError: ``directory`` already holds a database.
    """
    directory = pathlib.Path(directory)
    if cls.exists(directory):
      raise DatabaseError(f"{directory} already holds a concept database; open it instead")
    bank = jax.tree.map(np.asarray, ConceptBank.from_config(config))
    db = cls(directory, bank, {}, feature_id, -1, keep)
    if commit:
      with dblock.write_lock(directory, db.lock_timeout):
        if cls.exists(directory):     # another process was quicker
          raise DatabaseError(f"{directory} already holds a concept database; open it "
                              "instead")
        db._commit()
    return db

  @classmethod
  def open(cls, directory: str | os.PathLike, *, step: int | None = None,
           keep: int = 5) -> "ConceptDatabase":
    """Opens the latest (or a given) complete step of a database.

    Raises:
      DatabaseError: no database there, the step does not exist, or it is
        damaged (unreadable, or its manifest disagrees with its bank): the
        message names the last good step and how to make it the newest.
    """
    directory = pathlib.Path(directory)
    if not cls.exists(directory):
      raise DatabaseError(f"{directory} is not a concept database; create one with "
                          "'python -m launch.concepts add --db DIR --name NAME --images ...'")
    steps = cls._steps(directory)
    step = steps[-1] if step is None else step
    if step not in steps:
      raise DatabaseError(f"{directory} has no version {step}; it has {steps}")
    try:
      return cls._load(directory, step, keep)
    except _Damaged as e:
      good = None
      for older in reversed([s for s in steps if s < step]):
        try:
          cls._load(directory, older, keep)
        except (_Damaged, DatabaseError):
          continue
        good = older
        break
      hint = (f"version {good} is good: make it the newest with 'python -m launch.concepts "
              f"restore --db {directory} --step {good}'" if good is not None else
              "no earlier version is readable; add the concepts to a new database")
      raise DatabaseError(f"{directory} version {step} is damaged ({e}); {hint}") from None

  @classmethod
  def _steps(cls, directory: pathlib.Path) -> list[int]:
    """The complete steps, oldest first. Orbax's listing of the finalized step
    directories: every write syncs with it, and a CheckpointManager built for it
    would read every step's metadata (a third of the time of adding a concept)."""
    steps = directory / "steps"
    return sorted(ocp.utils.checkpoint_steps(steps.absolute())) if steps.is_dir() else []

  @classmethod
  def _load(cls, directory: pathlib.Path, step: int, keep: int) -> "ConceptDatabase":
    """Step ``step`` as a database; ``_Damaged`` if unreadable or inconsistent."""
    manager = cls._manager(directory, keep, create=False)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          bank=ocp.args.StandardRestore(), manifest=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 -- any reader failure means a damaged step
      lines = str(e).strip().splitlines()
      raise _Damaged(f"unreadable: {type(e).__name__}: {lines[0] if lines else ''}"[:300]
                     ) from None
    finally:
      manager.close()
    m = restored["manifest"]
    if not isinstance(m, dict):
      raise _Damaged("the manifest is not a JSON object")
    if m.get("version") != MANIFEST_VERSION:
      raise DatabaseError(f"{directory} has manifest version {m.get('version')}; this code "
                          f"reads version {MANIFEST_VERSION}")
    b = restored["bank"]
    try:
      bank = ConceptBank(ref_tokens=np.asarray(b["ref_tokens"], np.float32),
                         detail_tokens=np.asarray(b["detail_tokens"], np.float32),
                         valid=np.asarray(b["valid"], bool))
      _check_consistent(bank, m)
      concepts = {c["name"]: ConceptRecord.from_json(c) for c in m["concepts"]}
      feature_id = m["feature_id"]
    except (KeyError, TypeError, ValueError) as e:
      raise _Damaged(f"incomplete: {type(e).__name__}: {e}") from None
    return cls(directory, bank, concepts, feature_id, int(step), keep)

  # ---- queries ----------------------------------------------------------------

  @property
  def capacity(self) -> int:
    """Concepts this database can hold (the bank's ``C`` minus the ``<image>`` slot)."""
    return self.bank.capacity - 1

  @property
  def image_slot(self) -> int:
    """The bank slot reserved for ``<image>``."""
    return self.bank.capacity - 1

  def slot_of(self, name: str) -> int:
    """The slot of concept ``name``; ``DatabaseError`` naming the known ones if absent."""
    if name not in self.concepts:
      known = ", ".join(f"<{n}>" for n in self.concepts) or "none yet"
      raise DatabaseError(f"unknown concept <{name}> (known: {known}); add it with "
                          "'python -m launch.concepts add --db DIR --name NAME --images ...'")
    return self.concepts[name].slot

  def manifest(self) -> dict:
    """The JSON manifest of the current state."""
    return dict(version=MANIFEST_VERSION, feature_id=self.feature_id,
                capacity=self.capacity, image_slot=self.image_slot,
                concepts=[c.to_json() for c in self.concepts.values()])

  # ---- changes (each one a new step) -----------------------------------------

  def check_new_name(self, name: str) -> None:
    """Raises ``DatabaseError`` unless ``name`` is valid, new, and there is a free slot."""
    validate_name(name)
    if name in self.concepts:
      raise DatabaseError(f"concept <{name}> already exists; remove it first or choose "
                          "another name")
    if len(self.concepts) >= self.capacity:
      raise DatabaseError(f"the database is full ({self.capacity} concepts); remove one first")

  def add(self, name: str, ref_tokens: np.ndarray, detail_tokens: np.ndarray,
          images: list[dict]) -> ConceptRecord:
    """Stores a concept in the lowest free slot and commits a new step.

    Args:
      name: a new, valid name.
      ref_tokens: ``[K, D]``; detail_tokens: ``[N, Dd]``.
      images: provenance, one ``{'file', 'sha256', 'coverage'}`` per source image.

    Raises:
      DatabaseError: the name is invalid or taken (also by another process
        since this state was loaded), the database is full, the features are
        not finite, or another process holds the write lock too long.
    """
    validate_name(name)
    if name in self.concepts or len(self.concepts) >= self.capacity:
      self._sync()                          # perhaps stale: fail on the latest version
    self.check_new_name(name)
    ref_tokens, detail_tokens = np.asarray(ref_tokens), np.asarray(detail_tokens)
    if not (np.all(np.isfinite(ref_tokens)) and np.all(np.isfinite(detail_tokens))):
      raise DatabaseError(f"the features of <{name}> are not finite; the model is broken")
    with self._writing():
      self.check_new_name(name)             # again, against the latest version
      used = {c.slot for c in self.concepts.values()}
      slot = min(s for s in range(self.capacity) if s not in used)
      record = ConceptRecord(
          name=name, slot=slot, num_images=len(images), images=tuple(images),
          created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
      bank = jax.tree.map(jnp.asarray, self.bank).set_slot(
          slot, jnp.asarray(ref_tokens), jnp.asarray(detail_tokens))
      concepts = dict(sorted({**self.concepts, name: record}.items(),
                             key=lambda kv: kv[1].slot))
      self._apply(bank, concepts)
    return record

  def remove(self, name: str) -> ConceptRecord:
    """Removes concept ``name`` (its slot is zeroed and freed) and commits a new step."""
    if name not in self.concepts:
      self._sync()                          # perhaps stale: fail on the latest version
    self.slot_of(name)
    with self._writing():
      slot = self.slot_of(name)             # again, against the latest version
      record = self.concepts[name]
      self._apply(jax.tree.map(jnp.asarray, self.bank).clear_slot(slot),
                  {n: c for n, c in self.concepts.items() if n != name})
    return record

  def restore_as_latest(self) -> int:
    """Commits this (older) version as the newest step, e.g. after a damaged one.

    Returns the new step. The versions after this one stay on disk until
    ``keep`` newer ones push them out.
    """
    with dblock.write_lock(self.directory, self.lock_timeout):
      self._commit()
    return self.step

  @contextlib.contextmanager
  def _writing(self):
    """The write lock, with this object brought up to the latest step first.

    Another process may have committed since this state was loaded; a change
    computed on the stale state would silently drop that process's work.
    """
    with dblock.write_lock(self.directory, self.lock_timeout):
      self._sync()
      yield

  def _sync(self) -> None:
    """Loads the latest step if it is not the one this object holds."""
    if not self.exists(self.directory):
      return
    latest = self._steps(self.directory)[-1]
    if latest == self.step:
      return
    fresh = self.open(self.directory, step=latest, keep=self._keep)
    if fresh.feature_id != self.feature_id:
      raise DatabaseError(f"{self.directory} was built with another model (feature id "
                          f"{fresh.feature_id}, this one {self.feature_id}); use that model "
                          "or a new database")
    self.bank, self.concepts, self.step = fresh.bank, fresh.concepts, fresh.step

  def _apply(self, bank: ConceptBank, concepts: dict) -> None:
    """Makes ``(bank, concepts)`` the state and commits it; on failure the old state stays."""
    old = (self.bank, self.concepts)
    self.bank, self.concepts = jax.tree.map(np.asarray, bank), concepts
    try:
      self._commit()
    except BaseException:
      self.bank, self.concepts = old
      raise

  def _commit(self) -> None:
    manager = self._manager(self.directory, self._keep, create=True)
    try:
      latest = manager.latest_step()
      step = 0 if latest is None else latest + 1
      manager.save(step, args=ocp.args.Composite(
          bank=ocp.args.StandardSave(_bank_to_numpy(self.bank)),
          manifest=ocp.args.JsonSave(self.manifest())))
      manager.wait_until_finished()
    except OSError as e:   # e.g. a read-only steps/: Orbax fails before its rename
      raise dblock.not_writable(self.directory, e) from None
    finally:
      manager.close()
    self.step = step
    # The human-readable mirror, atomically replaced.
    atomic.write_text(self.directory / "concepts.json",
                      json.dumps(dict(self.manifest(), step=step), indent=2))


def describe(db: ConceptDatabase) -> list[dict[str, Any]]:
  """One row per concept for ``launch.concepts list`` (name, slot, images, created)."""
  return [dict(name=c.name, slot=c.slot, images=c.num_images, created=c.created)
          for c in db.concepts.values()]
