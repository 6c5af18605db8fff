"""Helpers every node module uses: input specs with tooltips and ranges, and the call wrapper.

Node modules import only the standard library at import time; torch and the library load on first use.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

ROOT_CATEGORY = "finetune"
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


def INT(default: int, min: int, max: int, tooltip: str, step: int = 1, **extra) -> tuple:
    return ("INT", {"default": default, "min": min, "max": max, "step": step, "tooltip": tooltip, **extra})


def FLOAT(default: float, min: float, max: float, tooltip: str, step: float = 0.01, **extra) -> tuple:
    return ("FLOAT", {"default": default, "min": min, "max": max, "step": step, "tooltip": tooltip, **extra})


def STRING(default: str, tooltip: str, multiline: bool = False, **extra) -> tuple:
    return ("STRING", {"default": default, "multiline": multiline, "tooltip": tooltip, **extra})


def BOOLEAN(default: bool, tooltip: str, **extra) -> tuple:
    return ("BOOLEAN", {"default": default, "tooltip": tooltip, **extra})


def COMBO(options: list[str], tooltip: str, default: str | None = None) -> tuple:
    opts = list(options)
    return (opts, {"default": default if default is not None else (opts[0] if opts else ""), "tooltip": tooltip})


def LINK(type_name: str, tooltip: str, **extra) -> tuple:
    return (type_name, {"tooltip": tooltip, **extra})


def SEED(tooltip: str = "Random seed: the same seed gives the same result.") -> tuple:
    return INT(0, 0, MAX_SEED, tooltip, control_after_generate=True)


def check_numbers(cls, args: tuple, kwargs: dict) -> None:
    """Every INT / FLOAT input of node ``cls`` against its declaration: finite, whole where it is an INT, within
    min / max. ComfyUI checks ranges itself but lets NaN through (every comparison with NaN is false), and Python
    callers and the runner check nothing: the error names the input, the value and the range."""
    import math

    spec = cls.INPUT_TYPES()
    declared = {**spec.get("required", {}), **spec.get("optional", {})}
    given = {**dict(zip(declared, args)), **kwargs}
    for name, value in given.items():
        kind = declared.get(name, ("",))[0]
        if kind not in ("INT", "FLOAT") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        opts = declared[name][1] if len(declared[name]) > 1 else {}
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        if kind == "INT" and not float(value).is_integer():
            raise ValueError(f"{name} must be a whole number, got {value}")
        low, high = opts.get("min"), opts.get("max")
        if low is not None and value < low:
            raise ValueError(f"{name} must be at least {low:g}, got {value:g}")
        if high is not None and value > high:
            raise ValueError(f"{name} must be at most {high:g}, got {value:g}")


def checked(fn: Callable) -> Callable:
    """A node function whose numeric inputs are checked first (:func:`check_numbers`); :func:`torch_call` does the
    same for the nodes that run torch."""

    @functools.wraps(fn)
    def wrapper(self, *args: Any, **kwargs: Any):
        check_numbers(type(self), args, kwargs)
        return fn(self, *args, **kwargs)

    return wrapper


def torch_call(fn: Callable) -> Callable:
    """Run a node function outside ComfyUI's inference mode, so models loaded or trained in it stay trainable,
    and with the unique node id registered for progress events; its numeric inputs are checked first. Inside
    ComfyUI, a Cancel leaves it as ComfyUI's own exception (:func:`host.cancels_for_comfyui`)."""

    @functools.wraps(fn)
    def wrapper(self, *args: Any, unique_id: str | None = None, **kwargs: Any):
        import torch

        from . import host

        check_numbers(type(self), args, kwargs)
        with torch.inference_mode(False), host.executing_node(unique_id), host.cancels_for_comfyui():
            return fn(self, *args, **kwargs)

    return wrapper


HIDDEN = {"unique_id": "UNIQUE_ID"}


def recipe_input(recipe: type, name: str) -> tuple:
    """The ComfyUI input spec of one recipe field: its type, default, range, choices and tooltip, as declared."""
    spec = _recipe_input(recipe, name)
    if name in getattr(recipe, "advanced", ()):
        spec[1]["advanced"] = True  # folded away by the front end until "Show Advanced"; its value is kept
    return spec


def _recipe_input(recipe: type, name: str) -> tuple:
    from ..trainers.config.recipes import choices_of

    f = recipe.options()[name]
    m, default = f.metadata, f.default
    if m["choices"] is not None:
        return COMBO(choices_of(m["choices"]), m["help"], default)
    if isinstance(default, bool):
        return BOOLEAN(default, m["help"])
    if isinstance(default, int):
        if m["seed"]:
            return INT(default, m["min"], m["max"], m["help"], control_after_generate=True)
        return INT(default, m["min"], m["max"], m["help"], **({"step": m["step"]} if m["step"] else {}))
    if isinstance(default, float):
        extra = {"round": m["round"]} if m["round"] is not None else {}
        return FLOAT(default, m["min"], m["max"], m["help"], step=m["step"] or 0.01, **extra)
    return STRING(default, m["help"], multiline=m["multiline"])


def recipe_inputs(recipe: type, required_links: dict | None = None, optional_links: dict | None = None,
                  hidden: dict | None = None) -> dict:
    """A training node's INPUT_TYPES: its links, then the recipe's fields in the recipe's order."""
    out = {"required": {**(required_links or {}), **{n: recipe_input(recipe, n) for n in recipe.required}},
           "optional": {**(optional_links or {}), **{n: recipe_input(recipe, n) for n in recipe.optional}}}
    if hidden:
        out["hidden"] = dict(hidden)
    return out
