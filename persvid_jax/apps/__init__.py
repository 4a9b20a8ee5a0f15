"""Applications, the package's top floor: the demo job (``demo``; ``python -m launch.demo``)
and the user interface of claims 13-14 (``ui``; ``python -m launch.app``)."""
