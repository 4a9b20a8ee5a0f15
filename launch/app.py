"""The web UI: one button per stored concept, a text box, Generate.

  python -m launch.app [--host 127.0.0.1] [--port 7860] [--db DIR] [--model DIR]
      [--steps N] [--sr-steps N] [--max-upload-mb 10] [--out-dir DIR]

Serves ``persvid_jax.apps.ui`` (Gradio) on loopback unless ``--host`` says
otherwise (``persvid_jax/apps/serve.py``). ``--db`` defaults to the database
``launch.demo`` builds (``outputs/concepts_db``); concepts added in the page
land there. Bad flags, a port in use or a database built by another model
exit with status 2 and one line.
"""

from __future__ import annotations

import sys

from launch import _common
from persvid_jax.apps import DEFAULT_DB


def _parse(argv):
  p = _common.ArgumentParser(prog="python -m launch.app", description="persvid_jax web UI.")
  p.add_argument("--host", default="127.0.0.1",
                 help="interface to bind (default loopback; 0.0.0.0 exposes it to the network)")
  p.add_argument("--port", type=_common.PORT, default=7860)
  p.add_argument("--db", default=str(DEFAULT_DB), help="concept database directory")
  p.add_argument("--model", help="exported model or training workdir (default: demo)")
  p.add_argument("--steps", type=_common.int_range(1),
                 help="base sampler steps (default: model config)")
  p.add_argument("--sr-steps", type=_common.int_range(1),
                 help="SR sampler steps (default: model config)")
  p.add_argument("--max-upload-mb", type=_common.float_range(0, lo_open=True), default=10.0,
                 help="per-file upload limit")
  p.add_argument("--out-dir", help="where videos are written (default: a temp dir)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  """``python -m launch.app`` (see the module docstring); returns the exit status."""
  _common.quiet()
  args = _parse(sys.argv[1:] if argv is None else argv)

  def body() -> int:
    _common.compilation_cache()
    # After the flags are checked: importing jax, the models and gradio takes seconds.
    from persvid_jax.apps import serve
    serve.serve(args.db, model=args.model, host=args.host, port=args.port,
                out_dir=args.out_dir, steps=args.steps, sr_steps=args.sr_steps,
                max_upload_mb=args.max_upload_mb, log=lambda s: print(s, flush=True))
    return 0

  return _common.run(body)


if __name__ == "__main__":
  sys.exit(main())
