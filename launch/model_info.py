"""Parameter counts of every network of a config, computed abstractly.

  python -m launch.model_info --config configs/modelscope.py:detail=0 [--json]

No weights are created (``jax.eval_shape``), so the full-size configs run in
seconds on a laptop.
"""

from __future__ import annotations

import json
import sys

from launch import _common
from persvid_jax import config_lib


def main(argv=None) -> int:
  """``python -m launch.model_info`` (see the module docstring); returns the exit status."""
  parser = _common.ArgumentParser(
      prog="python -m launch.model_info", description=__doc__.strip().splitlines()[0])
  parser.add_argument("--config", default="configs/tiny.py",
                      help="configs/NAME.py[:variant] (default: %(default)s)")
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
  args = parser.parse_args(argv)
  try:
    config = config_lib.load_config(args.config)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from persvid_jax.models import stack  # after arg parsing: importing jax is slow
  try:
    counts = stack.param_counts(config)
  except ValueError as e:
    # The networks' own checks (unet: ..., shapes that do not divide) on a config
    # that loaded: still the config's fault, so one line and not a traceback.
    print(f"error: {args.config}: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps({"config": args.config, "params": counts}, indent=2))
    return 0
  print(f"config: {args.config}  (compute {config.dtype}, params {config.param_dtype})")
  print(f"{'network':<16}{'parameters':>16}")
  for name, n in counts.items():
    print(f"{name:<16}{n:>16,}")
  print(f"{'total':<16}{sum(counts.values()):>16,}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
