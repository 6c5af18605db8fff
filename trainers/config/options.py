"""The machinery of typed recipes (:mod:`.recipes` declares them): :func:`option` declares one field with its
default, range, choices, help text and older spellings; :class:`Recipe` checks every value against its declaration
with errors that name the input, and reads recorded values back. Imports no torch.

Combo choices name a table of the library (``"loop.optimizers:OPTIMIZERS"``), read when first needed, so the lists are never
copied and ComfyUI lists the nodes without loading the library; :func:`library_object` reads such a name (methods'
train functions are named so too, in :data:`.recipes.METHODS`).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           step: float | None = None, choices: str | tuple[str, ...] | None = None, round: bool | None = None,
           multiline: bool = False, seed: bool = False, record: bool = True,
           legacy: dict | None = None) -> Any:
    """A recipe field. ``choices`` is a tuple or ``"module:TABLE"`` (a table of ``trainers.module``, whose keys are
    the choices); ``record=False`` keeps a field out of config.json (run control such as ``resume_run``);
    ``legacy`` maps values older workflows and config.json files hold to today's (a switch that became a combo:
    ``{True: "on", False: "off"}``)."""
    meta = {"help": help, "min": min, "max": max, "step": step, "choices": choices, "round": round,
            "multiline": multiline, "seed": seed, "record": record, "legacy": legacy}
    return field(default=default, metadata=meta)


def like(base: type, name: str, default: Any = MISSING, help: str | None = None, **changes) -> Any:
    """The field ``name`` of recipe ``base`` with another default or help text (ranges stay one declaration)."""
    f = base.__dataclass_fields__[name]
    meta = dict(f.metadata)
    if help is not None:
        meta["help"] = help
    meta.update(changes)
    return field(default=f.default if default is MISSING else default, metadata=meta)


def library_object(spec: str) -> Any:
    """``"module:name"``: the object ``name`` of the library's module ``trainers.module``, imported when asked (a
    choice table, a method's train function)."""
    module, _, name = spec.partition(":")
    library = __package__.rpartition(".")[0]  # the library (trainers/)
    return getattr(importlib.import_module(f"{library}.{module}"), name)


def choices_of(spec: str | tuple[str, ...] | None) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return list(library_object(spec))  # "module:TABLE" names a table of the library
    return list(spec)


def _fmt(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass
class Recipe:
    """Base of every recipe. ``method`` names the training method; ``required`` and ``optional`` give the order of
    the node's inputs (ComfyUI stores widget values by position, so the order is part of the saved workflow)."""

    method: ClassVar[str] = ""
    required: ClassVar[tuple[str, ...]] = ()
    optional: ClassVar[tuple[str, ...]] = ()
    #: the options that give the trained weights their shape: a resume must keep them
    shape: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for name, f in self.options().items():
            v = getattr(self, name)
            if self.legacy_ok(name, v):
                setattr(self, name, f.metadata["legacy"][v])
        self.check()

    @classmethod
    def legacy_ok(cls, name: str, value: Any) -> bool:
        """Whether ``value`` is an older spelling of option ``name`` that the recipe still reads."""
        old = cls.options()[name].metadata.get("legacy") or {}
        return any(type(value) is type(k) and value == k for k in old)

    @classmethod
    def options(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in fields(cls)}

    def check(self) -> None:
        """Every value against its declaration; errors name the input, the value and the range."""
        for name in self.options():
            problem = self.problem(name, getattr(self, name))
            if problem:
                raise ValueError(problem)
        self.check_more()

    @classmethod
    def problem(cls, name: str, v: Any) -> str | None:
        """What is wrong with ``v`` as option ``name`` (None: nothing), older spellings read as today's; a training
        node's ``VALIDATE_INPUTS`` asks this for the inputs it checks in ComfyUI's place."""
        f = cls.options()[name]
        m, kind = f.metadata, type(f.default)
        if cls.legacy_ok(name, v):
            v = m["legacy"][v]
        if kind is bool:
            return None if isinstance(v, bool) else f"{name} must be true or false, got {v!r}"
        if kind in (int, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"{name} must be a number, got {v!r}"
            if kind is int and not float(v).is_integer():
                return f"{name} must be a whole number, got {v!r}"
            if isinstance(v, float) and not math.isfinite(v):
                return f"{name} must be a finite number, got {v!r}"
            if m["min"] is not None and v < m["min"]:
                return f"{name} must be at least {_fmt(m['min'])}, got {_fmt(v)}"
            if m["max"] is not None and v > m["max"]:
                return f"{name} must be at most {_fmt(m['max'])}, got {_fmt(v)}"
            return None
        if not isinstance(v, str):
            return f"{name} must be text, got {v!r}"
        if m["choices"] is not None:
            allowed = choices_of(m["choices"])
            if v not in allowed:
                return f"{name} {v!r} is not known; choose one of: {', '.join(allowed)}"
        return None

    def check_more(self) -> None:
        """Checks across fields (a recipe overrides this)."""

    def to_dict(self) -> dict:
        """The recorded fields, as config.json holds them."""
        return {n: getattr(self, n) for n, f in self.options().items() if f.metadata["record"]}

    @classmethod
    def from_dict(cls, values: dict, where: str = "recipe", **override) -> "Recipe":
        """A recipe from recorded values; an unknown field is an error naming it (a config of another method, or of
        a newer pack). Missing fields take their defaults (a config of an older pack)."""
        if not isinstance(values, dict):
            raise ValueError(f"{where} must be an object of options, got {type(values).__name__}")
        known = cls.options()
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ValueError(f"{where}.{unknown[0]} is not an option of {cls.method or cls.__name__} (is this a config "
                             f"of another method, or of a newer pack?); its options are: {', '.join(known)}")
        kw = {}
        for k, v in {**values, **override}.items():
            kind = type(known[k].default)
            kw[k] = float(v) if kind is float and isinstance(v, int) and not isinstance(v, bool) else v
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
