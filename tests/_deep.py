"""JSON nested deeper than Python recurses, for the parsing tests of both paths."""

from __future__ import annotations

import json

import pytest

# orjson parses up to 1024 levels; str() and json.dumps() recurse once per level.
DEEP = "[" * 1000 + "]" * 1000


def _recurses_out() -> bool:
    """Whether this Python's str() or json.dumps() runs out of recursion on `DEEP`. Python 3.13
    counts C recursion against a limit of its own, far above 1,000 levels: there, such a value
    makes text like any other, and there is no RecursionError to turn into an error."""
    try:
        value = json.loads(DEEP)
        str(value)
        json.dumps(value)
    except RecursionError:
        return True
    return False


recursing = pytest.mark.skipif(
    not _recurses_out(), reason="str() and json.dumps() do not recurse out at 1,000 levels"
)
