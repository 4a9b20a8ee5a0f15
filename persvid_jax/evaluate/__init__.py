"""Evaluation: subject fidelity against references (metrics and ablations: docs/evaluation.md)."""
