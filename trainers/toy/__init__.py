"""The built-in toy world: synthetic shapes, a toy Stable Diffusion, a toy CLIP scorer and a judge."""
