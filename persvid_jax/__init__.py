"""persvid_jax: personalized text-to-video generation in JAX/Flax.

Data flows one way: ``data -> train -> checkpoint``, ``photos -> concepts ->
database``, ``prompt + database (+ image) -> pipeline -> media``. Imports go
down the floors: base modules; ``models``, ``diffusion``; ``concepts``,
``data``, ``convert``, ``records``; ``pipeline``; ``train``; ``evaluate``;
``apps``, ``bench``, ``sweep`` (``tests/test_layers.py``). Nothing imports
``launch/``.
"""

__version__ = "0.1.0"
