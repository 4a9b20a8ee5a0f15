"""Serving the web UI: the checks before the model loads, then the page.

``serve`` is what ``python -m launch.app`` runs: a database that is a file,
an output directory that cannot be made, a host that is no address of this
machine or a port in use are each one ``GenerationError`` before the model
loads (the launcher prints it as one line); then ``app.Studio`` over the
model and ``app.launch``.
"""

from __future__ import annotations

import errno
import pathlib
import socket
import sys
from typing import Callable

from persvid_jax import config_lib
from persvid_jax.pipeline import model as model_lib
from persvid_jax.pipeline.generate import GenerationError
from persvid_jax.apps import ui as app

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def listen_problem(host: str, port: int) -> str | None:
  """Why the app could not listen on ``host:port`` (unknown host, port taken), or None.

  Tried with a socket before the model loads, as the server will bind it
  (``SO_REUSEADDR``, so a port left in TIME_WAIT is not mistaken for taken).
  """
  try:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
  except (socket.gaierror, UnicodeError) as e:
    return (f"--host {host}: not a known host name or address ({getattr(e, 'strerror', e)}); "
            "use e.g. 127.0.0.1, or 0.0.0.0 for every interface")
  with socket.socket(family, kind, proto) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(address)
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        return (f"--port {port} is in use on {host} (another server?); choose another "
                "--port")
      if e.errno == errno.EADDRNOTAVAIL:
        return (f"--host {host} is not an address of this machine; use e.g. 127.0.0.1, "
                "or 0.0.0.0 for every interface")
      return f"--host {host} --port {port}: cannot listen there ({e.strerror or e})"
  return None


def serve(db: str | pathlib.Path, *, model: str | None = None, host: str = "127.0.0.1",
          port: int = 7860, out_dir: str | None = None, steps: int | None = None,
          sr_steps: int | None = None, max_upload_mb: float = 10.0,
          log: Callable[[str], None] = print) -> None:
  """Checks the places, loads ``model``, serves the page until stopped (Ctrl-C).

  Args:
    db: the concept database directory (created by the first added concept).
    model: exported model or training workdir (default: the shipped demo model).
    host, port: where to listen (loopback by default).
    out_dir: where videos are written (default: a temp dir).
    steps, sr_steps: sampler steps (default: the model's config).
    max_upload_mb: per-file upload limit.
    log: where the address line goes (a warning for a non-loopback host goes
      to stderr).

  Raises:
    GenerationError: a place that cannot be used, found before the model loads.
    And the library's user errors (``ModelError``, ``DatabaseError``, ...).
  """
  db = pathlib.Path(db)
  if db.exists() and not db.is_dir():
    raise GenerationError(f"--db {db} is a file; give a database directory")
  problem = ((out_dir and config_lib.workdir_problem(pathlib.Path(out_dir), "--out-dir"))
             or listen_problem(host, port))
  if problem:
    raise GenerationError(problem)
  studio = app.Studio(model_lib.load_model(model), db, out_dir, steps=steps, sr_steps=sr_steps)
  if host not in LOOPBACK:
    print(f"warning: --host {host} serves the app beyond this machine", file=sys.stderr)
  log(f"persvid_jax UI on http://{host}:{port} (database {db}, {len(studio.names())} "
      "concept(s); Ctrl-C stops)")
  try:
    app.launch(studio, host=host, port=port, max_upload_mb=max_upload_mb)
  except OSError as e:
    # E.g. the port was taken between the check and now: Gradio's message, one line.
    raise GenerationError(f"cannot serve on {host}:{port}: " + " ".join(str(e).split())
                          ) from None
