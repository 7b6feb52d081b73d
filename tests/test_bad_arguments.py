"""Bad arguments to the core's constructors and calls are `ConfigurationError`s.

One error for every argument the library refuses, under `HolySheepError` like everything it
raises, and still a `ValueError` for code that caught the plain one these used to raise.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from holysheep import (
    AsyncClient,
    ChatAccumulator,
    Client,
    ConfigurationError,
    HolySheepError,
    Price,
    RateLimiter,
    SSEDecoder,
    monthly_roi,
)
from holysheep.transports import MockResponse, MockTransport

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
    # openai's `max_retries=3` carried over: it failed with an AttributeError at the first 503.
    "Client(retry=3)": lambda: Client(api_key="k", retry=3),  # type: ignore[arg-type]
    "AsyncClient(retry=3)": lambda: AsyncClient(api_key="k", retry=3),  # type: ignore[arg-type]
    "complete(retry=3)": lambda: Client(api_key="k").chat.complete(
        model="m",
        messages=[],
        retry=3,  # type: ignore[arg-type]
    ),
    "Client(headers=[pairs])": lambda: Client(api_key="k", headers=[("a", "b")]),  # type: ignore[arg-type]
    "Client(headers={1: 'b'})": lambda: Client(api_key="k", headers={1: "b"}),  # type: ignore[dict-item]
    "Client(base_url=123)": lambda: Client(api_key="k", base_url=123),  # type: ignore[arg-type]
    "Client(limiter=10)": lambda: Client(api_key="k", limiter=10),  # type: ignore[arg-type]
    "AsyncClient(limiter=10)": lambda: AsyncClient(api_key="k", limiter=10),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("call", CASES.values(), ids=CASES.keys())
def test_a_bad_argument_is_a_configuration_error(call: Callable[[], object]) -> None:
    """Each refusal is a `ConfigurationError`: a `HolySheepError` and a `ValueError`."""
    with pytest.raises(ConfigurationError) as caught:
        call()
    assert isinstance(caught.value, HolySheepError)
    assert isinstance(caught.value, ValueError)


def test_a_calls_header_replaces_the_clients_whatever_the_case() -> None:
    """HTTP names are caseless: a call's `idempotency-key` replaces the client's
    `Idempotency-Key`, as `x-trace` replaces `X-Trace` (both were sent, the client's first,
    and the client's key and request id won)."""
    transport = MockTransport(lambda request: MockResponse())
    with Client(
        api_key="k",
        transport=transport,
        headers={"X-Trace": "client", "Idempotency-Key": "client-key", "X-Request-ID": "c"},
    ) as client:
        client.chat.complete(
            model="m",
            messages=[],
            extra_headers={"x-trace": "call", "idempotency-key": "call-key", "x-request-id": "r"},
        )
    (sent,) = transport.requests
    chosen = [
        (name.lower(), value)
        for name, value in sent.headers
        if name.lower() in ("x-trace", "idempotency-key", "x-request-id")
    ]
    assert sorted(
        [("idempotency-key", "call-key"), ("x-request-id", "r"), ("x-trace", "call")]
    ) == sorted(chosen)
