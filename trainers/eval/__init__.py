"""Evaluation: CLIP metrics, labelled grids and plots."""
