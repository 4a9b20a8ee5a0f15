"""Tests of persvid_jax.diffusion."""
