"""Thin command-line entry points: ``python -m launch.NAME`` (flags -> one library call)."""
