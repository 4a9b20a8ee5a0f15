"""Atomic writes: a reader sees the old file or directory or the new one, never half of one.

Everything is written under a hidden temporary name beside its target (the
same filesystem, so the final ``os.replace`` is a rename) and renamed into
place only when complete; on any error the temporary is deleted, so no
``.*.tmp`` is left behind and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def file(path: str | os.PathLike, *, suffix: str = "") -> Iterator[pathlib.Path]:
  """Yields a temporary path beside ``path`` that replaces ``path`` when the block succeeds.

  Args:
    path: the file to write.
    suffix: appended to the temporary name, for writers that choose the
      format by extension (ffmpeg: ``".mp4"``).
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp{suffix}")
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    try:
      tmp.unlink(missing_ok=True)
    except OSError:
      pass       # the original error is the one to report
    raise


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes ``text`` to ``path`` atomically; returns ``path``."""
  with file(path) as tmp:
    tmp.write_text(text)
  return pathlib.Path(path)


@contextlib.contextmanager
def directory(out_dir: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields an empty temporary directory that becomes ``out_dir`` when the block succeeds.

  An existing ``out_dir`` is replaced: moved aside, the new one moved in, the
  old one deleted, so that at every moment one complete directory exists
  (``out_dir``, or the old one beside it if the swap is cut), never a
  half-deleted one. The caller decides whether ``out_dir`` may be replaced,
  and makes its parent.
  """
  out_dir = pathlib.Path(out_dir)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  old = None
  try:
    yield tmp
    # mkdtemp makes a private (0700) directory; what is published is meant to be shared.
    os.chmod(tmp, 0o755)
    if out_dir.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
      os.replace(out_dir, old)
      try:
        os.replace(tmp, out_dir)
      except BaseException:
        os.replace(old, out_dir)
        old = None
        raise
    else:
      os.replace(tmp, out_dir)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
    if old is not None and old.exists():
      shutil.rmtree(old)
