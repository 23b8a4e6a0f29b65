"""Methods registered by name, and spec strings parsed into method objects (never evaluated).

Spec grammar::

    spec    := method ("+" method)*
    method  := name [":" param ("," param)*]
    param   := key "=" value          # value: int, float, true/false, none, or a bare string

``snapkv:budget=0.25+kivi:bits=2`` is a policy composed with a quantizer.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing
import warnings
from typing import Any

from .errors import SpecError
from .methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise TypeError(f"method name {cls.name!r} is registered twice ({METHODS[cls.name].__name__}, {cls.__name__})")
    METHODS[cls.name] = cls
    return cls


_loaded = False
IMPORT_ERRORS: dict[str, BaseException] = {}


def _load_all() -> None:
    """Import every module of kvshrink.methods once, so that their @register lines run.

    A method module that fails to import (e.g. a missing optional dependency) does not take the other
    methods down: its error is kept in IMPORT_ERRORS, warned about, and named when the method is asked for.
    """
    global _loaded
    if _loaded:
        return
    from . import methods

    for mod in pkgutil.iter_modules(methods.__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            try:
                importlib.import_module(f"{methods.__name__}.{mod.name}")
            except Exception as exc:  # noqa: BLE001 - reported below and on use
                IMPORT_ERRORS[mod.name] = exc
                warnings.warn(f"kvshrink method module {mod.name!r} failed to import: {exc!r}", stacklevel=2)
    _loaded = True


def method_names() -> list[str]:
    _load_all()
    return sorted(METHODS)


def get_method_class(name: str) -> type[Method]:
    _load_all()
    if name not in METHODS:
        broken = "".join(f"; module {m!r} failed to import: {e!r}" for m, e in IMPORT_ERRORS.items())
        raise SpecError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}{broken}")
    return METHODS[name]


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(cls) if f.init}


def _convert(method: str, key: str, raw: str, tp: Any) -> Any:
    """Convert the text of one parameter value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.lower() == "none" and type(None) in typing.get_args(tp):
            return None
        for a in args:
            try:
                return _convert(method, key, raw, a)
            except SpecError:
                continue
        raise SpecError(f"{method}: {key}={raw!r} is not a valid {' or '.join(getattr(a, '__name__', str(a)) for a in args)}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if str(c) == raw:
                return c
        raise SpecError(f"{method}: {key}={raw!r} is not one of {', '.join(map(str, choices))}")
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise SpecError(f"{method}: {key}={raw!r} is not a boolean; use true or false")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise SpecError(f"{method}: {key}={raw!r} is not an integer") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise SpecError(f"{method}: {key}={raw!r} is not a number") from None
    return raw


def create(name: str, **params: Any) -> Method:
    """Create a method by name from keyword arguments (values may be strings, as from a spec)."""
    cls = get_method_class(name)
    types_ = _field_types(cls)
    unknown = sorted(set(params) - set(types_))
    if unknown:
        valid = ", ".join(types_) or "(none: this method takes no parameters)"
        raise SpecError(f"{name}: unknown parameter(s) {', '.join(unknown)}; valid parameters: {valid}")
    kwargs = {k: _convert(name, k, v, types_[k]) if isinstance(v, str) else v for k, v in params.items()}
    try:
        return cls(**kwargs)
    except SpecError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{name}: {exc}") from exc


def parse_one(text: str) -> Method:
    text = text.strip()
    if not text:
        raise SpecError("empty method spec; write e.g. 'kivi:bits=2' (see `kvshrink info`)")
    name, _, rest = text.partition(":")
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"{name}: parameter {item!r} must look like key=value")
        if key.strip() in params:
            raise SpecError(f"{name}: parameter {key.strip()!r} given twice")
        params[key.strip()] = value.strip()
    return create(name.strip(), **params)


def parse_spec(spec: str) -> list[Method]:
    """Parse ``"policy:...+quantizer:..."`` into method objects, in order."""
    if not isinstance(spec, str):
        raise SpecError(f"a method spec is a string, got {type(spec).__name__}")
    return [parse_one(part) for part in spec.split("+")]


def describe(cls: type[Method]) -> dict[str, Any]:
    """Name, kind, paper and parameters (default, type, help) of a method, for `kvshrink info`."""
    types_ = _field_types(cls)
    params = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        tp = types_.get(f.name)
        params[f.name] = {
            "default": default,
            "type": getattr(tp, "__name__", str(tp).replace("typing.", "")),
            "help": f.metadata.get("help", ""),
        }
    doc = (cls.__doc__ or "").strip().splitlines()
    return {"name": cls.name, "kind": cls.kind, "paper": cls.paper, "summary": doc[0] if doc else "", "params": params}
