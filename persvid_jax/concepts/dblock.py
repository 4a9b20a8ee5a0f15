"""A concept database directory's write side: its error type, writability checks and write lock.

Every write of ``database.ConceptDatabase`` (create, add, remove, restore)
holds ``write_lock``; launchers call ``check_writable`` before loading a model
so that a bad ``--db`` is refused before any photo is encoded.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import time

from persvid_jax import config_lib

LOCK_FILE = ".lock"


class DatabaseError(ValueError):
  """A user-level problem with a database or a concept (message says what to do)."""


def not_writable(directory: pathlib.Path, error: OSError) -> DatabaseError:
  """The one-line ``DatabaseError`` for an ``OSError`` while writing ``directory``."""
  where = f" ({error.filename})" if error.filename else ""
  reason = error.strerror or type(error).__name__
  return DatabaseError(f"database {directory} is not writable: {reason}{where}; use a "
                       "writable directory for --db, or fix its permissions")


def check_writable(directory: str | os.PathLike) -> None:
  """Raises ``DatabaseError`` unless a database can be written at ``directory``.

  Cheap and writes nothing: callers run it before loading a model, so a
  ``--db`` that is a file, lies under a file, or is read-only (``chmod``,
  ``chattr +i``) is refused at once rather than after the photos are encoded.
  The write lock repeats the check for real (``write_lock``).
  """
  directory = pathlib.Path(directory)
  if directory.exists():
    if not directory.is_dir():
      raise DatabaseError(f"database {directory} is a file, not a directory; give a "
                          "directory for the database (it is created if absent)")
    # What a write touches: the lock file, the directory (concepts.json is
    # replaced there) and steps/ (Orbax renames each new step into it).
    for path in (directory / LOCK_FILE, directory, directory / "steps"):
      if path.exists() and not os.access(path, os.W_OK):
        raise DatabaseError(f"database {directory} is not writable ({path}); use a "
                            "writable directory for --db, or fix its permissions")
    return
  # A new database: its nearest existing ancestor must be a writable directory.
  parent = config_lib.nearest_existing(directory.parent)
  if not parent.is_dir():
    raise DatabaseError(f"database {directory} cannot be created: {parent} is a file, not "
                        "a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise DatabaseError(f"database {directory} cannot be created: {parent} is not "
                        "writable")


@contextlib.contextmanager
def write_lock(directory: pathlib.Path, timeout: float):
  """Holds the database's write lock: an exclusive ``flock`` on ``DIR/.lock``.

  Non-blocking attempts every 50 ms for ``timeout`` seconds, then
  ``DatabaseError`` naming the holder's pid (written into the file by each
  holder). The lock dies with its process, so a killed writer cannot leave
  the database locked. A directory or lock file that cannot be written is a
  ``DatabaseError`` too (nothing has been written at that point).
  """
  try:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  except FileExistsError:     # mkdir: a file where the directory belongs
    raise DatabaseError(f"database {directory} is a file, not a directory; give a "
                        "directory for the database (it is created if absent)") from None
  except NotADirectoryError:  # mkdir: a file where a parent directory belongs
    raise DatabaseError(f"database {directory} cannot be created: a part of its path is a "
                        "file, not a directory") from None
  except OSError as e:
    raise not_writable(directory, e) from None
  try:
    deadline = time.monotonic() + timeout
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() >= deadline:
          holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
          raise DatabaseError(f"database {directory} is being written by another process "
                              f"(pid {holder}); retry when it has finished") from None
        time.sleep(0.05)
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
      raise not_writable(directory, e) from None
    yield
  finally:
    os.close(fd)          # releases the lock
