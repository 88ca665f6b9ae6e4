"""Ranges of numeric recipe keys, declared on the dataclass fields of the schema.

`lr: float = ranged(3e-3, ge=0)` gives the field its default and the range a value must be in;
scratchlm.config checks every value read from a recipe or `--set` against it before a command
writes anything. A float must also be finite, and an integer fit in 64 bits. A list of numbers has
the range of each item. A subclass that only changes a default keeps the range of its base.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scratchlm.errors import UserError

MAX_INT = 2**63 - 1
"""The largest integer TOML (and so a recipe) can hold."""


@dataclass(frozen=True)
class Range:
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if isinstance(value, int) and abs(value) > MAX_INT:
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )

    def describe(self, kind: str) -> str:
        """'a number in (0, 1]', 'an integer >= 1', 'a finite number'..."""
        low = f"[{_show(self.ge)}" if self.ge is not None else None
        low = f"({_show(self.gt)}" if self.gt is not None else low
        high = f"{_show(self.le)}]" if self.le is not None else None
        high = f"{_show(self.lt)})" if self.lt is not None else high
        if low and high:
            return f"{kind} in {low}, {high}"
        bounds = [
            f"{op} {_show(bound)}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        if bounds:
            return f"{kind} {' and '.join(bounds)}"
        return "a finite number" if kind == "a number" else kind


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def ranged(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with a default (or a default factory, for lists) and a Range."""
    metadata = {"range": Range(ge=ge, gt=gt, le=le, lt=lt)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_range(cls: type, name: str) -> Range | None:
    """The range of field `name` of dataclass `cls`, declared on it or on a base class."""
    for klass in cls.__mro__:
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and "range" in declared.metadata:
            return declared.metadata["range"]
    return None


def check_range(cls: type, name: str, value: Any, tp: Any, key: str) -> None:
    """A UserError naming `key` when the number (or a number of the list) is out of its range."""
    bounds = field_range(cls, name)
    item_type = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
    if item_type not in (int, float):
        return
    if bounds is None:
        raise TypeError(f"{cls.__name__}.{name} is a number without a declared range")
    for number in value if isinstance(value, list) else [value]:
        if not bounds.contains(number):
            kind = "an integer" if item_type is int else "a number"
            raise UserError(
                f"recipe key {key} = {show_value(number)}: expected {bounds.describe(kind)}"
            )


def show_value(value: Any) -> str:
    """A value for a one-line message: long strings and deep or long lists are cut short."""
    return _SHORT_REPR.repr(value)


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 60, 60
    short.maxlist = short.maxdict = 6
    return short


_SHORT_REPR = _short_repr()
