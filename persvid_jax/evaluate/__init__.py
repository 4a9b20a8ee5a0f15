"""Evaluation: subject fidelity against references (more metrics: issue 5)."""
