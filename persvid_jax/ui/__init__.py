"""The user interface of claims 13-14 (``persvid_jax.ui.app``; ``python -m launch.app``)."""

import pathlib

# Here, not in app.py: launch.app shows it in --help without importing jax.
DEFAULT_DB = pathlib.Path("outputs") / "concepts_db"   # what launch.demo builds
