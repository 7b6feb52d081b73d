"""Validators for the limits users construct (`Timeouts`, `RateLimiter`), written once."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from ._exceptions import ConfigurationError

__all__ = ["positive_or_none"]


def positive_or_none(
    owner: str, unit: str = ""
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """An attrs validator: None (no limit) or a positive finite number.

    NaN would silently disable a limit (every comparison with it is false), infinity is what
    None already says, and zero or less would stop everything; a bool is an int to Python but
    never a limit. `owner` and `unit` name the setting in the message.
    """

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is None:
            return
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf:
            return
        raise ConfigurationError(
            f"{owner}: {attribute.name} must be None (no limit) or a positive finite "
            f"number{unit}, got {value!r}"
        )

    return check
