"""Bad arguments to the core's constructors and calls are `ConfigurationError`s.

One error for every argument the library refuses, under `HolySheepError` like everything it
raises, and still a `ValueError` for code that caught the plain one these used to raise.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from holysheep import (
    ChatAccumulator,
    ConfigurationError,
    HolySheepError,
    Price,
    RateLimiter,
    SSEDecoder,
    monthly_roi,
)

CASES: dict[str, Callable[[], object]] = {
    "SSEDecoder(max_line_size=0)": lambda: SSEDecoder(max_line_size=0),
    "SSEDecoder(max_event_size=-1)": lambda: SSEDecoder(max_event_size=-1),
    "ChatAccumulator(choices=0)": lambda: ChatAccumulator(choices=0),
    "ChatAccumulator(choices=True)": lambda: ChatAccumulator(choices=True),
    "Price(-1, 0)": lambda: Price(-1, 0),
    "Price(nan, 0)": lambda: Price(float("nan"), 0),
    "RateLimiter().enqueue(-1, 0)": lambda: RateLimiter(max_concurrent=1).enqueue(-1, 0.0),
    "RateLimiter().enqueue(1, nan)": lambda: RateLimiter(max_concurrent=1).enqueue(1, float("nan")),
    "monthly_roi(-1, ...)": lambda: monthly_roi(-1, "gpt-4.1"),
    "monthly_roi(output_share=2)": lambda: monthly_roi(1, "gpt-4.1", output_share=2),
}


@pytest.mark.parametrize("call", CASES.values(), ids=CASES.keys())
def test_a_bad_argument_is_a_configuration_error(call: Callable[[], object]) -> None:
    """Each refusal is a `ConfigurationError`: a `HolySheepError` and a `ValueError`."""
    with pytest.raises(ConfigurationError) as caught:
        call()
    assert isinstance(caught.value, HolySheepError)
    assert isinstance(caught.value, ValueError)
