"""Inference: generation over the concept bank (the six modes) and media writing."""
