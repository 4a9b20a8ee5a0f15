"""The user interface of claims 13-14 (``persvid_jax.ui.app``; ``python -m launch.app``)."""
