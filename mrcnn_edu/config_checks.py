"""Checking the settings dataclasses: each field's type from its type hint, its range from a table.

Every settings dataclass (``MaskRCNNConfig`` and its parts, ``DataConfig``, ``RunConfig``,
``TrainConfig``) calls ``check_fields(self, RULES)`` first in ``__post_init__``:

- the **type hint** says what a field accepts: ``int`` (not a bool, not ``3.0``), ``float`` (any
  finite real number, stored as a float), ``bool``, ``str``, ``X | None``, ``tuple[int, ...]``
  and ``tuple[int, int]`` (a list or tuple of those), a bare ``tuple`` (numbers, possibly
  nested in lists), another settings dataclass; lists are stored as tuples;
- the **rules** table, ``{field: Rule}``, adds the range: ``Rule(holds, "must be in [0, 1]")``.

A failure raises :class:`ConfigError` (a ValueError) naming the field. A config built inside a
bigger one is built under :func:`under`, which puts the parent's key in front, so a bad value
in a run config reads ``model.rpn.nms_thresh must be in [0, 1], got -1``. :func:`from_mapping`
builds a dataclass (and its dataclass-typed fields) from a JSON dict, refusing unknown keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np


class ConfigError(ValueError):
    """A config value that is wrong: ``key`` is its path (``"model.rpn.nms_thresh"``),
    ``problem`` what is wrong with it (``"must be in [0, 1], got -1"``)."""

    def __init__(self, key: str, problem: str, sep: str = " "):
        super().__init__(key, problem)
        self.key, self.problem, self.sep = key, problem, sep

    def __str__(self) -> str:
        return f"{self.key}{self.sep}{self.problem}"


class Rule(NamedTuple):
    """``holds(value) -> bool`` and the requirement it checks, e.g. ``"must be >= 1"``."""

    holds: Callable
    requirement: str


def at_least(low) -> Rule:
    return Rule(lambda v: v >= low, f"must be >= {low}")


def between(low, high, low_open: bool = False) -> Rule:
    """``[low, high]``, or ``(low, high]`` with ``low_open``."""
    if low_open:
        return Rule(lambda v: low < v <= high, f"must be in ({low}, {high}]")
    return Rule(lambda v: low <= v <= high, f"must be in [{low}, {high}]")


def one_of(*choices) -> Rule:
    return Rule(lambda v: v in choices, f"must be one of {list(choices)}")


def positive_numbers(count: int | None = None) -> Rule:
    """A tuple (possibly nested) of numbers > 0, with ``count`` entries when given."""
    what = f"{count} numbers" if count else "numbers"
    return Rule(
        lambda v: (count is None or len(v) == count) and all(x > 0 for x in _leaves(v)),
        f"must hold {what} > 0",
    )


def check_fields(obj, rules: Mapping[str, Rule] | None = None) -> None:
    """Check and normalise every field of the dataclass ``obj`` in place (frozen ones too):
    the type of its hint, then ``rules[name]`` (skipped for None). Raises ConfigError."""
    rules = rules or {}
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        given = getattr(obj, f.name)
        value = _coerce(given, hints.get(f.name, typing.Any), f.name)
        rule = rules.get(f.name)
        if rule is not None and value is not None and not rule.holds(value):
            raise ConfigError(f.name, f"{rule.requirement}, got {shown(given)}")
        object.__setattr__(obj, f.name, value)


@contextlib.contextmanager
def under(prefix: str):
    """Errors raised inside get ``prefix`` in front of their key path (plain ValueErrors,
    from checks across fields, become ``"<prefix>: <message>"``)."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{prefix}.{err.key}", err.problem, err.sep) from None
    except ValueError as err:
        raise ConfigError(prefix, str(err), ": ") from None


def from_mapping(klass, d, where: str = ""):
    """``klass(**d)`` for a settings dataclass, from a (JSON) dict: unknown keys are refused,
    dict values of dataclass-typed fields are built the same way, and every error names its
    key path under ``where`` (``"model"`` -> ``model.rpn.nms_thresh``)."""
    name = where or klass.__name__
    if not isinstance(d, Mapping):
        raise ConfigError(name, f"must be an object of {klass.__name__} settings, got {shown(d)}")
    valid = [f.name for f in dataclasses.fields(klass)]
    unknown = sorted(str(k) for k in d if k not in valid)
    if unknown:
        raise ConfigError(name, f"has unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    hints = _hints(klass)
    with under(where) if where else contextlib.nullcontext():
        kwargs = {}
        for key, value in d.items():
            nested = _dataclass_of(hints.get(key))
            if nested is not None and isinstance(value, Mapping):
                value = from_mapping(nested, value, key)
            kwargs[key] = value
        return klass(**kwargs)


# -- the types ----------------------------------------------------------------------------------
def _hints(klass) -> dict:
    return typing.get_type_hints(klass)


def _dataclass_of(hint):
    """The settings dataclass a field holds (``X`` or ``X | None``), else None."""
    options = typing.get_args(hint) if typing.get_origin(hint) is not None else (hint,)
    found = [o for o in options if isinstance(o, type) and dataclasses.is_dataclass(o)]
    return found[0] if len(found) == 1 else None


def _coerce(value, hint, key: str):
    """``value`` checked against ``hint`` and normalised (lists -> tuples, reals -> float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint), key)
    if hint is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise ConfigError(key, f"must be True or False, got {shown(value)}")
        return bool(value)
    if hint is int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise ConfigError(key, f"must be an integer, got {shown(value)}")
        return int(value)
    if hint is float:
        return _real(value, key)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {shown(value)}")
        return value
    if hint is tuple or origin is tuple:
        return _coerce_tuple(value, typing.get_args(hint), key)
    if origin is not None:  # another generic (list[int], dict[str, float], ...): its container
        hint = origin
    if isinstance(hint, type) and hint is not typing.Any and not isinstance(value, hint):
        what = " (an object of its settings)" if dataclasses.is_dataclass(hint) else ""
        raise ConfigError(key, f"must be a {hint.__name__}{what}, got {shown(value)}")
    return value


def _coerce_union(value, options, key: str):
    if value is None and type(None) in options:
        return None
    errors = []
    real_options = [o for o in options if o is not type(None)]
    for option in real_options:
        try:
            return _coerce(value, option, key)
        except ConfigError as err:
            if len(real_options) == 1:
                raise
            errors.append(err.problem.split(", got ")[0])
    if type(None) in options:
        errors.append("null (None)")
    kinds = [e.removeprefix("must be ") for e in errors]
    raise ConfigError(key, f"must be {', '.join(kinds[:-1])} or {kinds[-1]}, got {shown(value)}")


def _coerce_tuple(value, args, key: str):
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"must be a list, got {shown(value)}")
    if not args:  # a bare ``tuple``: numbers, possibly nested in lists
        return tuple(
            _coerce_tuple(v, (), f"{key}[{i}]")
            if isinstance(v, (list, tuple))
            else _number(v, f"{key}[{i}]")
            for i, v in enumerate(value)
        )
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(key, f"must hold {len(args)} values, got {shown(value)}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _real(value, key: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ConfigError(key, f"must be a number, got {shown(value)}")
    if not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value}")
    return float(value)


def _number(value, key: str):
    """A finite real number kept as it is (ints stay ints): the leaves of a bare tuple."""
    _real(value, key)
    return value


def _leaves(value):
    for v in value:
        if isinstance(v, tuple):
            yield from _leaves(v)
        else:
            yield v


def shown(value) -> str:
    """A value as a message shows it: JSON's ``null`` for None, tuples as lists."""
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value)
