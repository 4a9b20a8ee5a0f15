"""Applications, the package's top floor: the demo job (``demo``; ``python -m launch.demo``)
and the user interface (``ui``; ``python -m launch.app``)."""

import pathlib

# Here, not in ui.py: launch.app shows it in --help without importing jax.
DEFAULT_DB = pathlib.Path("outputs") / "concepts_db"   # what launch.demo builds
