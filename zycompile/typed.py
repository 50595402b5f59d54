"""Build frozen dataclasses from plain YAML data, with errors that name the key path.

Recipes and pass options share this so every bad value reads the same way:
``recipes/x.yaml: runtime.max_seq_len: got 'big' (str); expected an integer``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from zycompile.errors import RecipeError


def fail(where: str, path: str, msg: str) -> typing.NoReturn:
    prefix = f"{where}: " if where else ""
    raise RecipeError(f"{prefix}{path or '<root>'}: {msg}")


def describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def unknown_key_message(key: str, allowed: typing.Iterable[str]) -> str:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}'{hint} (allowed: {', '.join(allowed) or 'none'})"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is bool:
        return "a boolean (true/false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin in (dict, Mapping) or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def convert(value: Any, tp: Any, where: str, path: str) -> Any:
    """Check ``value`` against the type ``tp`` and return it in its frozen form."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return convert(value, args[0], where, path)
        for a in args:
            try:
                return convert(value, a, where, path)
            except RecipeError:
                continue
        fail(where, path, f"got {describe(value)}; expected {' or '.join(_type_name(a) for a in args)}")
    if value is None:
        fail(where, path, f"got null; expected {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed or type(value) is not type(allowed[0]):
            fail(where, path, f"got {describe(value)}; allowed: {', '.join(repr(a) for a in allowed)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail(where, path, f"got {describe(value)}; expected a boolean (true/false)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(where, path, f"got {describe(value)}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(where, path, f"got {describe(value)}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(where, path, f"got {describe(value)}; expected a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail(where, path, f"got {describe(value)}; expected {_type_name(tp)}")
        (elem,) = get_args(tp)[:1]
        return tuple(convert(v, elem, where, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            fail(where, path, f"got {describe(value)}; expected a mapping")
        return types.MappingProxyType(dict(value))
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, path)
    raise TypeError(f"typed.convert: unsupported type {tp!r} at {path}")


def build(cls: type, data: Any, where: str = "", path: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping; every problem is one RecipeError."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        fail(where, path, f"got {describe(data)}; expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            fail(where, f"{path}.{key}" if path else str(key), unknown_key_message(str(key), fields))
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = convert(data[name], hints[name], where, sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fail(where, sub, "missing required key")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        for key, msg in check():
            fail(where, f"{path}.{key}" if path else key, msg)
    return obj


def to_plain(obj: Any) -> Any:
    """Dataclass/MappingProxy/tuple tree → plain dicts and lists (for YAML, JSON and hashing)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
