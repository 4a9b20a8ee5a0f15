"""Training: state, optimizer with per-stage trainable masks, the pure train step,
the three stages (base, SR, personalization) and the loop with Orbax checkpoints."""
