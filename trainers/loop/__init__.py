"""The training loop every method shares, and what it needs: objective, batches, optimizers, precision, EMA, checkpoint state, DDP, validation."""
