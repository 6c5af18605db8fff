"""Training objectives: what a step draws and aims at, picked by each family (DDPM now; flow matching next)."""
