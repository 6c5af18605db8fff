"""Command-line flag types: a number given on the command line is a value, 0 included, and one out of its range is an
error naming the flag (argparse adds it), the value and the range allowed; an empty name or folder is an error too,
never the default in disguise."""
from __future__ import annotations

import argparse
import math


def whole(low: int, high: int | None = None):
    """An argparse ``type``: a whole number from ``low`` to ``high`` (no upper bound when None)."""
    span = f"from {low} to {high}" if high is not None else f"of {low} or more"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: give one {span}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a whole number {span}")
        return value

    parse.__name__ = "whole number"
    return parse


def positive(text: str) -> float:
    """An argparse ``type``: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give one above 0") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a number above 0")
    return value


def named(text: str) -> str:
    """An argparse ``type``: a name or folder that is not empty."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty: give a name, or leave the flag out for its default")
    return text
