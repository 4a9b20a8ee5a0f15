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

Slot ``C - 1`` of the bank is reserved for ``<image>`` (the subject of a
target image given at generation time), so a database holds up to ``C - 1``
concepts. Features are tied to the model that made them: the manifest
records ``Model.feature_id`` and generation refuses a database of another model.
"""

from __future__ import annotations

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

from persvid_jax.concepts.bank import ConceptBank

MANIFEST_VERSION = 1
MAX_NAME_LENGTH = 32
# Names appear in prompts as <name>: letters, digits, '_' and '-', starting
# with a letter or digit. That rules out path separators, spaces, dots
# ('..'), and the angle brackets of the prompt syntax.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Reserved: <image> (target-image mode) and the raw placeholders <c0>...
_RESERVED_RE = re.compile(r"^(image|c[0-9]+)$", re.IGNORECASE)


class DatabaseError(ValueError):
  """A user-level problem with a database or a concept (message says what to do)."""


def validate_name(name: str) -> str:
  """Returns ``name`` if it is a valid concept name, else raises ``DatabaseError``."""
  if not isinstance(name, str) or not name:
    raise DatabaseError("concept name is empty; give a name like 'my_dog'")
  if len(name) > MAX_NAME_LENGTH:
    raise DatabaseError(f"concept name {name!r} is {len(name)} characters long; use at most "
                        f"{MAX_NAME_LENGTH}")
  if not _NAME_RE.match(name):
    raise DatabaseError(f"concept name {name!r} is invalid; use letters, digits, '_' and '-' "
                        "only (no spaces, path separators or brackets), starting with a "
                        "letter or digit")
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
    return dict(name=self.name, slot=self.slot, num_images=self.num_images,
                images=list(self.images), created=self.created)

  @classmethod
  def from_json(cls, d: dict) -> "ConceptRecord":
    return cls(name=d["name"], slot=int(d["slot"]), num_images=int(d["num_images"]),
               images=tuple(d["images"]), created=d["created"])


def _bank_to_numpy(bank: ConceptBank) -> dict[str, np.ndarray]:
  return {"ref_tokens": np.asarray(bank.ref_tokens, np.float32),
          "detail_tokens": np.asarray(bank.detail_tokens, np.float32),
          "valid": np.asarray(bank.valid, bool)}


class ConceptDatabase:
  """A concept database directory (see module docstring). Not thread-safe.

  Attributes:
    directory: the database directory.
    bank: the current ``ConceptBank`` (numpy leaves; pass it to jitted code as is).
    concepts: ``{name: ConceptRecord}`` in slot order.
    feature_id: the ``Model.feature_id`` the features were made with.
    step: the Orbax step this state was loaded from / last written.
  """

  def __init__(self, directory: pathlib.Path, bank: ConceptBank, concepts: dict,
               feature_id: str, step: int, keep: int):
    self.directory = directory
    self.bank = bank
    self.concepts = concepts
    self.feature_id = feature_id
    self.step = step
    self._keep = keep

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
      db._commit()
    return db

  @classmethod
  def open(cls, directory: str | os.PathLike, *, step: int | None = None,
           keep: int = 5) -> "ConceptDatabase":
    """Opens the latest (or a given) complete step of a database.

    Raises:
      DatabaseError: no database there, or the step does not exist.
    """
    directory = pathlib.Path(directory)
    if not cls.exists(directory):
      raise DatabaseError(f"{directory} is not a concept database; create one with "
                          "'python -m launch.concepts add --db DIR --name NAME --images ...'")
    manager = cls._manager(directory, keep, create=False)
    try:
      step = manager.latest_step() if step is None else step
      if step not in manager.all_steps():
        raise DatabaseError(f"{directory} has no step {step}; it has {manager.all_steps()}")
      restored = manager.restore(step, args=ocp.args.Composite(
          bank=ocp.args.StandardRestore(), manifest=ocp.args.JsonRestore()))
    finally:
      manager.close()
    m = restored["manifest"]
    if m.get("version") != MANIFEST_VERSION:
      raise DatabaseError(f"{directory} has manifest version {m.get('version')}; this code "
                          f"reads version {MANIFEST_VERSION}")
    b = restored["bank"]
    bank = ConceptBank(ref_tokens=np.asarray(b["ref_tokens"], np.float32),
                       detail_tokens=np.asarray(b["detail_tokens"], np.float32),
                       valid=np.asarray(b["valid"], bool))
    concepts = {c["name"]: ConceptRecord.from_json(c) for c in m["concepts"]}
    return cls(directory, bank, concepts, m["feature_id"], int(step), keep)

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
    """
    self.check_new_name(name)
    used = {c.slot for c in self.concepts.values()}
    slot = min(s for s in range(self.capacity) if s not in used)
    ref_tokens, detail_tokens = np.asarray(ref_tokens), np.asarray(detail_tokens)
    if not (np.all(np.isfinite(ref_tokens)) and np.all(np.isfinite(detail_tokens))):
      raise DatabaseError(f"the features of <{name}> are not finite; the model is broken")
    record = ConceptRecord(
        name=name, slot=slot, num_images=len(images), images=tuple(images),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    bank = jax.tree.map(jnp.asarray, self.bank).set_slot(
        slot, jnp.asarray(ref_tokens), jnp.asarray(detail_tokens))
    concepts = dict(sorted({**self.concepts, name: record}.items(), key=lambda kv: kv[1].slot))
    self._apply(bank, concepts)
    return record

  def remove(self, name: str) -> ConceptRecord:
    """Removes concept ``name`` (its slot is zeroed and freed) and commits a new step."""
    slot = self.slot_of(name)
    record = self.concepts[name]
    self._apply(jax.tree.map(jnp.asarray, self.bank).clear_slot(slot),
                {n: c for n, c in self.concepts.items() if n != name})
    return record

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
    finally:
      manager.close()
    self.step = step
    # The human-readable mirror, atomically replaced.
    mirror = self.directory / "concepts.json"
    tmp = mirror.with_name(mirror.name + ".tmp")
    tmp.write_text(json.dumps(dict(self.manifest(), step=step), indent=2))
    os.replace(tmp, mirror)


def describe(db: ConceptDatabase) -> list[dict[str, Any]]:
  """One row per concept for ``launch.concepts list`` (name, slot, images, created)."""
  return [dict(name=c.name, slot=c.slot, images=c.num_images, created=c.created)
          for c in db.concepts.values()]
