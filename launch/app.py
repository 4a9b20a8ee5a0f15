"""The web UI (claims 13-14): one button per stored concept, a text box, Generate.

  python -m launch.app [--host 127.0.0.1] [--port 7860] [--db DIR] [--model DIR]
      [--steps N] [--sr-steps N] [--max-upload-mb 10] [--out-dir DIR]

Serves ``persvid_jax.apps.ui`` (Gradio) on loopback unless ``--host`` says
otherwise. ``--db`` defaults to the database ``launch.demo`` builds
(``outputs/concepts_db``); concepts added in the page land there. Bad flags
or a database built by another model exit with status 2 and one line.
"""

from __future__ import annotations

import pathlib
import sys

from launch import _common

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _parse(argv):
  from persvid_jax.apps.ui import DEFAULT_DB
  p = _common.ArgumentParser(prog="python -m launch.app", description="persvid_jax web UI.")
  p.add_argument("--host", default="127.0.0.1",
                 help="interface to bind (default loopback; 0.0.0.0 exposes it to the network)")
  p.add_argument("--port", type=int, default=7860)
  p.add_argument("--db", default=str(DEFAULT_DB), help="concept database directory")
  p.add_argument("--model", help="exported model or training workdir (default: demo)")
  p.add_argument("--steps", type=int, help="base sampler steps (default: model config)")
  p.add_argument("--sr-steps", type=int, help="SR sampler steps (default: model config)")
  p.add_argument("--max-upload-mb", type=float, default=10.0, help="per-file upload limit")
  p.add_argument("--out-dir", help="where videos are written (default: a temp dir)")
  return p.parse_args(argv)


def _listen_problem(host: str, port: int) -> str | None:
  """Why the app could not listen on ``host:port`` (unknown host, port taken), or None.

  Tried with a socket before the model loads, as the server will bind it
  (``SO_REUSEADDR``, so a port left in TIME_WAIT is not mistaken for taken).
  """
  import errno
  import socket
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


def main(argv=None) -> int:
  _common.quiet()
  args = _parse(sys.argv[1:] if argv is None else argv)

  def body() -> int:
    from persvid_jax.pipeline.generate import GenerationError
    if not 0 < args.port < 65536:
      raise GenerationError(f"--port {args.port}: use 1-65535")
    if args.steps is not None and args.steps < 1 or args.sr_steps is not None and args.sr_steps < 1:
      raise GenerationError("--steps and --sr-steps must be >= 1")
    if not args.max_upload_mb > 0:
      raise GenerationError(f"--max-upload-mb {args.max_upload_mb}: must be > 0")
    db = pathlib.Path(args.db)
    if db.exists() and not db.is_dir():
      raise GenerationError(f"--db {db} is a file; give a database directory")
    problem = args.out_dir and _common.dir_problem(pathlib.Path(args.out_dir), "--out-dir")
    if problem:
      raise GenerationError(problem)
    problem = _listen_problem(args.host, args.port)
    if problem:
      raise GenerationError(problem)
    _common.compilation_cache()
    from persvid_jax.pipeline import model as model_lib
    from persvid_jax.apps import ui
    studio = ui.Studio(model_lib.load_model(args.model), db, args.out_dir,
                        steps=args.steps, sr_steps=args.sr_steps)
    if args.host not in _LOOPBACK:
      print(f"warning: --host {args.host} serves the app beyond this machine", file=sys.stderr)
    print(f"persvid_jax UI on http://{args.host}:{args.port} (database {db}, "
          f"{len(studio.names())} concept(s); Ctrl-C stops)", flush=True)
    try:
      ui.launch(studio, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb)
    except OSError as e:
      # E.g. the port was taken between the check and now: Gradio's message, one line.
      raise GenerationError(f"cannot serve on {args.host}:{args.port}: "
                            + " ".join(str(e).split())) from None
    return 0

  return _common.run(body)


if __name__ == "__main__":
  sys.exit(main())
