"""The tuning methods, one file each, and the registry that maps a saved `kind` to its config."""

import dataclasses
import math
import types
import typing

from ..errors import TuningError, TuningFileError
from .adapter import Adapter
from .base import Method
from .bitfit import BitFit
from .dora import DoRA
from .full import FullFineTuning
from .ia3 import IA3
from .lora import LoRA
from .prefix import PrefixTuning
from .prompt import PromptTuning

METHODS: dict[str, type[Method]] = {
    m.kind: m for m in (PromptTuning, PrefixTuning, Adapter, LoRA, DoRA, IA3, BitFit, FullFineTuning)
}


def register(method: type[Method]) -> type[Method]:
    """Add a method to the registry (usable as a class decorator): `attach`, `Bank`, saved tunings,
    `slimtune train --method <kind>` with its `cli_options`, and `slimtune compare --methods <kind>` then know it.
    A new method is one file: its `Method` config (kind, learning rates, label, options) and its `Component`.
    The module that registers it must be imported wherever it runs (the study trains each configuration in a
    child process)."""
    if not (isinstance(method, type) and issubclass(method, Method)) or not method.kind:
        raise TuningError(f"register() takes a Method subclass with a kind, got {method!r}")
    if not isinstance(getattr(method, "component", None), type):
        raise TuningError(f"{method.__name__} has no component: set {method.__name__}.component to its Component class")
    known = METHODS.get(method.kind)
    if known is not None and known is not method:
        raise TuningError(f"a method of kind {method.kind!r} is already registered ({known.__name__})")
    METHODS[method.kind] = method
    return method


def method_from_dict(data: dict) -> Method:
    """The method a saved record describes, every setting checked against its declared type first (a record
    may come from anyone: a config's own checks assume the types are right)."""
    if not isinstance(data, dict):
        raise TuningFileError(f"a tuning's method must be a JSON object with a 'kind', got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("kind", None)
    if not isinstance(kind, str) or kind not in METHODS:
        shown = kind if isinstance(kind, str) else type(kind).__name__
        raise TuningFileError(f"unknown tuning method {str(shown)[:40]!r}; expected one of {sorted(METHODS)}")
    cls = METHODS[kind]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name not in fields:
            raise TuningFileError(f"bad settings for method {kind!r}: unknown setting {str(name)[:40]!r}; "
                                  f"it has {sorted(fields)}")
        if not _fits(value, hints[name]):
            raise TuningFileError(f"bad settings for method {kind!r}: {name} must be {_describe(hints[name])}, "
                                  f"got {str(value)[:40]!r}")
        data[name] = _from_json(value, hints[name])
    try:
        return cls(**data)
    except TypeError as err:
        raise TuningFileError(f"bad settings for method {kind!r}: {err}") from err


def _from_json(value, hint):
    """A JSON list as the tuple a field declares (a config then equals the one that was saved)."""
    if isinstance(value, list) and any(typing.get_origin(h) is tuple for h in (hint, *typing.get_args(hint))):
        return tuple(value)
    return value


def _fits(value, hint) -> bool:
    """Whether a JSON value fits a config field's type (a JSON list for a tuple, an integer for a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return "a list of strings" if args[0] is str else f"a list of {_describe(args[0])}"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint))


__all__ = ["IA3", "METHODS", "Adapter", "BitFit", "DoRA", "FullFineTuning", "LoRA", "Method", "PrefixTuning", "PromptTuning",
           "method_from_dict", "register"]
