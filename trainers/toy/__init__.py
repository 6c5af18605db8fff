"""The built-in toy world: synthetic shapes, a toy Stable Diffusion, a toy CLIP scorer and a judge."""
from pathlib import Path

#: the shipped weights (the toy model, its CLIP scorer, judge and ControlNet)
WEIGHTS = Path(__file__).with_name("weights")  # == families.TOY_WEIGHTS (tested)
