"""Datasets: pictures, captions and masks, augmentation, and ControlNet condition images."""
