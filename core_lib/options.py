"""Typed options: a dataclass declares every option with its type, default and meaning; one helper checks them.

Solvers (``Solver.Options``), the likelihood, the data sets and the config schema all use the
same three functions, so an option is declared once and checked the same way from Python, from
YAML and from the command line: unknown names are refused with the valid list, values of the
wrong type are refused with the expected type, ints are accepted where floats are declared and
lists where tuples are, and the dataclass's own ``validate()`` checks ranges.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Sequence
from typing import Any

from core_lib.errors import UserError

__all__ = ["build_options", "option_fields", "describe_type", "value_matches", "require", "finite_positive"]


def _members(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def value_matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (ints count as floats, lists as tuples or lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(value_matches(value, member) for member in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if origin is tuple:
        return (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == len(args)
                and all(value_matches(v, a) for v, a in zip(value, args)))
    if origin is list:
        if not isinstance(value, Sequence) or isinstance(value, str):
            return False
        return all(value_matches(v, args[0]) for v in value) if args else True
    return isinstance(value, hint) if isinstance(hint, type) else True


def describe_type(hint: Any) -> str:
    """A type annotation in words, for error messages ("a number", "one of 'a', 'b'", "int or None")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(member) for member in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if hint is type(None):
        return "None"
    if origin is tuple:
        return "(" + ", ".join(describe_type(a) for a in args) + ")"
    if origin is list:
        return f"a list of {describe_type(args[0])}" if args else "a list"
    if hint is float:
        return "a number"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _coerce(value: Any, hint: Any) -> Any:
    """The value in the declared type: floats where only floats are declared, tuples where tuples are."""
    members = _members(hint)
    if isinstance(value, Sequence) and not isinstance(value, str):
        if any(typing.get_origin(m) is tuple for m in members):
            inner = next(typing.get_args(m) for m in members if typing.get_origin(m) is tuple)
            return tuple(float(v) if a is float else v for v, a in zip(value, inner))
        return list(value)
    if value is not None and float in members and int not in members and not isinstance(value, bool):
        return float(value)
    return value


def build_options(options_cls: type, given: dict[str, Any], owner: str, error: type[UserError] = UserError):
    """Instantiate the dataclass ``options_cls`` from ``given``, checked, then ``validate()`` it.

    Args:
        options_cls: a dataclass whose annotated fields are the options, each with a default.
        given: option name → value (from Python, YAML or the command line).
        owner: what the options belong to, for messages ("solver 'pc'", "dataset 'ring'").
        error: the UserError subclass to raise.

    Raises:
        ``error`` for an unknown name (listing the valid ones) or a value of the wrong type;
        ``validate()`` raises for values out of range.
    """
    hints = typing.get_type_hints(options_cls)
    fields = [f.name for f in dataclasses.fields(options_cls)]
    unknown = sorted(set(given) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise error(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                    f"for {owner}; valid options: {valid}.")
    values = {}
    for key, value in given.items():
        if not value_matches(value, hints[key]):
            raise error(f"option {key!r} of {owner} must be {describe_type(hints[key])}, got {value!r}.")
        values[key] = _coerce(value, hints[key])
    opts = options_cls(**values)
    if hasattr(opts, "validate"):
        opts.validate()
    return opts


def option_fields(options_cls: type) -> list[tuple[str, Any, Any]]:
    """(name, annotation, default) of every field of an options dataclass, in declaration order."""
    hints = typing.get_type_hints(options_cls)
    return [(f.name, hints[f.name],
             f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(options_cls)]


def require(ok: bool, key: str, value: Any, what: str, error: type[UserError] = UserError) -> None:
    """Raise ``error("<key>: <what>, got <value>.")`` unless ``ok``: the one shape of a range check's message."""
    if not ok:
        raise error(f"{key}: {what}, got {value!r}.")


def finite_positive(value: Any) -> bool:
    """Whether value is a real number, finite and > 0 (NaN and inf are not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
