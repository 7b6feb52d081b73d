"""A stream the caller closes while the client waits without reading: in a send, or before a
retry.

Found by the property tests (`test_client_properties_more.py`); here in their smallest form,
the close made from inside the wait (a hook, a transport), with no thread."""

from __future__ import annotations

import pytest
from _scripted import MESSAGES, NO_WAIT

import holysheep
from holysheep import (
    Attempt,
    Completion,
    ConnectError,
    Observer,
    RequestInfo,
    RetryPolicy,
    StreamStats,
)
from holysheep.transports import (
    AsyncMockTransport,
    MockResponse,
    MockTransport,
    Request,
    sse_body,
)

# "Hel" and "lo" arrive, then the connection drops; the restart's attempt gets a 503 asking
# for a wait no test sits through: the caller closes the stream in it.
BROKEN = MockResponse(chunks=sse_body("Hel", "lo")[:3], fault="connection reset by peer")
BUSY = MockResponse(503, headers={"retry-after": "30"}, chunks=[b'{"error": {}}'])


def test_closing_while_a_restart_waits_keeps_the_answer_shown() -> None:
    """No `Reset` came, so the caller still shows the broken answer: the stream's completion
    (and the one observers are told of) is that answer, not the new attempt's nothing."""
    stream: holysheep.Stream | None = None
    ended: list[str] = []

    class Ends(Observer):
        def on_end(self, info: RequestInfo, completion: Completion, stats: StreamStats) -> None:
            ended.append(completion.text)

    def close(attempt: Attempt) -> None:
        if attempt.attempt == 2:  # the restart's 503: the client is about to wait 30 s
            assert stream is not None
            stream.close()

    transport = MockTransport([BROKEN, BUSY])
    with holysheep.Client(
        api_key="k",
        transport=transport,
        retry=NO_WAIT,
        on_interrupt="restart",
        hooks=[close],
        observers=[Ends()],
    ) as client:
        stream = client.chat.stream(model="m", messages=MESSAGES)
        with stream:
            shown = "".join(chunk.text for chunk in stream)
    assert ("Hello", "Hello", ["Hello"]) == (shown, stream.completion.text, ended)


@pytest.mark.anyio
async def test_closing_while_a_restart_waits_keeps_the_answer_shown_async() -> None:
    """The same, on the async client."""
    stream: holysheep.AsyncStream | None = None

    def close(attempt: Attempt) -> None:
        if attempt.attempt == 2:
            assert stream is not None
            stream.close()

    transport = AsyncMockTransport([BROKEN, BUSY])
    async with holysheep.AsyncClient(
        api_key="k", transport=transport, retry=NO_WAIT, on_interrupt="restart", hooks=[close]
    ) as client:
        stream = client.chat.stream(model="m", messages=MESSAGES)
        async with stream:
            shown = "".join([chunk.text async for chunk in stream])
    assert ("Hello", "Hello") == (shown, stream.completion.text)


def test_closing_in_a_send_that_then_fails_is_quiet() -> None:
    """A sync send cannot be cut short: closed meanwhile, the stream ends quietly when the send
    fails, even with no retry left, as a stream closed in a read does."""
    stream: holysheep.Stream | None = None

    def refuse(request: Request) -> MockResponse:
        assert stream is not None
        stream.close()  # as another thread would, while the request goes out
        raise ConnectError("connection refused")

    with holysheep.Client(
        api_key="k", transport=MockTransport(refuse), retry=RetryPolicy.none()
    ) as client:
        stream = client.chat.stream(model="m", messages=MESSAGES)
        with stream:
            assert [] == list(stream)
    assert stream.closed
