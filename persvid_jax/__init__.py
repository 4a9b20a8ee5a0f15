"""persvid_jax: personalized text-to-video generation in JAX/Flax.

Data flows one way: ``data -> train -> checkpoint``, ``photos -> concepts ->
database``, ``prompt + database (+ image) -> pipeline -> media``. Nothing in
``models/`` imports from ``train/``, ``pipeline/`` or ``launch/``.
"""

__version__ = "0.1.0"
