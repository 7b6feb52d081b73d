"""Observers are told what the caller gets: the same exception, from where the stream really
stopped, once, and nothing after it. Cases the review of the observability layer found wrong."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import holysheep
from holysheep import (
    Attempt,
    Completion,
    Observer,
    RateLimiter,
    RequestInfo,
    RetryPolicy,
    StreamInterruptedError,
    StreamStats,
    Timeouts,
    TotalTimeoutError,
)
from holysheep.testing import serve
from holysheep.transports import (
    AsyncBaseTransport,
    AsyncMockTransport,
    AsyncResponse,
    BaseTransport,
    MockResponse,
    MockTransport,
    Response,
    sse_body,
)

MESSAGES = [{"role": "user", "content": "hi"}]
FAST = RetryPolicy(attempts=3, wait_initial=0.01, wait_max=0.02, wait_jitter=0.0)
ONE_RETRY = RetryPolicy(attempts=2, wait_initial=0.01, wait_jitter=0.0)


class Recorder(Observer):
    """Every callback, in order, with what it was given."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_request(self, info: RequestInfo) -> None:
        self.events.append(("request", info))

    def on_first_token(self, info: RequestInfo, stats: StreamStats) -> None:
        self.events.append(("first_token", stats))

    def on_retry(self, info: RequestInfo, attempt: Attempt) -> None:
        self.events.append(("retry", attempt))

    def on_end(self, info: RequestInfo, completion: Completion, stats: StreamStats) -> None:
        self.events.append(("end", completion))

    def on_error(self, info: RequestInfo, error: BaseException, stats: StreamStats) -> None:
        self.events.append(("error", error))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    @property
    def error(self) -> BaseException:
        name, error = self.events[-1]
        assert "error" == name
        assert isinstance(error, BaseException)
        return error


# -- text_stream() after a restart: the error it raises is the one reported ---------------------


def diverging() -> list[MockResponse]:
    """Attempt 1 drops after "Hello wor"; the restart says something else."""
    return [
        MockResponse(chunks=sse_body("Hello ", "wor", "ld")[:3], fault="connection reset"),
        MockResponse(chunks=sse_body("Goodbye ", "moon")),
    ]


def ending_while_repeating() -> list[MockResponse]:
    """Attempt 1 drops after "Hello world"; the restart ends cleanly after "Hello"."""
    return [
        MockResponse(chunks=sse_body("Hello", " world", "!")[:3], fault="connection reset"),
        MockResponse(chunks=sse_body("Hello")),
    ]


def failing_while_repeating() -> list[MockResponse]:
    """Attempt 1 drops after "Hello world"; the restart's body ends before any content (an
    `IncompleteStreamError`, which `text_stream()` raises as the interruption it is)."""
    return [
        MockResponse(chunks=sse_body("Hello", " world", "!")[:3], fault="connection reset"),
        MockResponse(chunks=sse_body("Hello", " world", "!")[:1]),
    ]


SCRIPTS = [diverging, ending_while_repeating, failing_while_repeating]


def read_text(client: holysheep.Client) -> str:
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        return "".join(stream.text_stream())


async def async_read_text(client: holysheep.AsyncClient) -> str:
    async with client.chat.stream(model="m", messages=MESSAGES) as stream:
        return "".join([text async for text in stream.text_stream()])


@pytest.mark.parametrize("script", SCRIPTS)
def test_text_stream_restart_failures_are_reported_as_the_error_raised(script: Any) -> None:
    recorder = Recorder()
    client = holysheep.Client(
        api_key="k",
        transport=MockTransport(script()),
        retry=ONE_RETRY,
        on_interrupt="restart",
        observers=[recorder],
    )
    with client, pytest.raises(StreamInterruptedError) as info:
        read_text(client)
    assert ["request", "first_token", "retry", "error"] == recorder.names
    assert info.value is recorder.error


@pytest.mark.anyio
@pytest.mark.parametrize("script", SCRIPTS)
async def test_async_text_stream_restart_failures_are_reported_as_the_error_raised(
    script: Any,
) -> None:
    recorder = Recorder()
    client = holysheep.AsyncClient(
        api_key="k",
        transport=AsyncMockTransport(script()),
        retry=ONE_RETRY,
        on_interrupt="restart",
        observers=[recorder],
    )
    async with client:
        with pytest.raises(StreamInterruptedError) as info:
            await async_read_text(client)
    assert ["request", "first_token", "retry", "error"] == recorder.names
    assert info.value is recorder.error


def test_a_restart_that_catches_up_is_still_an_end() -> None:
    """The matching itself reports nothing: a restart that repeats and goes on ends well."""
    recorder = Recorder()
    script = [
        MockResponse(chunks=sse_body("Hello", " world", "!")[:3], fault="connection reset"),
        MockResponse(chunks=sse_body("Hello", " world", "!")),
    ]
    client = holysheep.Client(
        api_key="k",
        transport=MockTransport(script),
        retry=FAST,
        on_interrupt="restart",
        observers=[recorder],
    )
    with client:
        assert "Hello world!" == read_text(client)
    assert ["request", "first_token", "retry", "end"] == recorder.names


# -- whatever the reading raises ends the request as an error --------------------------------

HEAD = {"content-type": "text/event-stream"}


class BuggyBody(BaseTransport):
    """A transport whose body raises a bug of its own (no HolySheepError) mid-stream."""

    def send(self, request: Any) -> Response:
        def body() -> Iterator[bytes]:
            yield from sse_body("Hel", "lo")[:2]
            raise ValueError("bug in the transport")

        return Response(200, HEAD, body(), lambda: None)


class AsyncBuggyBody(AsyncBaseTransport):
    async def send(self, request: Any) -> AsyncResponse:
        async def body() -> AsyncIterator[bytes]:
            for data in sse_body("Hel", "lo")[:2]:
                yield data
            raise ValueError("bug in the transport")

        async def aclose() -> None:
            pass

        return AsyncResponse(200, HEAD, body(), aclose)


def test_a_transport_bug_mid_stream_is_reported_as_the_error() -> None:
    recorder = Recorder()
    client = holysheep.Client(api_key="k", transport=BuggyBody(), observers=[recorder])
    with client, pytest.raises(ValueError, match="bug in the transport") as info:
        client.chat.complete(model="m", messages=MESSAGES)
    assert ["request", "first_token", "error"] == recorder.names
    assert info.value is recorder.error


@pytest.mark.anyio
async def test_async_a_transport_bug_mid_stream_is_reported_as_the_error() -> None:
    recorder = Recorder()
    client = holysheep.AsyncClient(api_key="k", transport=AsyncBuggyBody(), observers=[recorder])
    async with client:
        with pytest.raises(ValueError, match="bug in the transport") as info:
            await client.chat.complete(model="m", messages=MESSAGES)
    assert ["request", "first_token", "error"] == recorder.names
    assert info.value is recorder.error


# -- sync: Ctrl-C in the caller's loop body is an error; a `break`, or its own bug, an end --


def answer() -> MockTransport:
    return MockTransport([MockResponse(chunks=sse_body("Hello", " world"))])


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_in_the_loop_body_is_reported_as_an_error(exc_type: type[BaseException]) -> None:
    """As on the async client, and as `Call.left` says: the for loop's generator is closed
    before `__exit__` is told why, and must not report an end first."""
    recorder = Recorder()
    client = holysheep.Client(api_key="k", transport=answer(), observers=[recorder])

    def interrupted() -> None:
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            for chunk in stream:
                if chunk.text:
                    raise exc_type

    with client, pytest.raises(exc_type) as info:
        interrupted()
    assert ["request", "first_token", "error"] == recorder.names
    assert info.value is recorder.error


@pytest.mark.parametrize("leave", ["break", "raise"])
def test_a_break_or_an_exception_in_the_loop_body_is_an_end(leave: str) -> None:
    recorder = Recorder()
    client = holysheep.Client(api_key="k", transport=answer(), observers=[recorder])

    def leaving() -> None:
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            for chunk in stream:
                if chunk.text and leave == "break":
                    break
                if chunk.text:
                    raise ValueError("the caller's own bug")
            assert stream.closed

    with client:
        if leave == "raise":
            with pytest.raises(ValueError, match="own bug"):
                leaving()
        else:
            leaving()
    assert ["request", "first_token", "end"] == recorder.names
    assert "Hello" == recorder.events[-1][1].text


# -- hooks and history count the requests sent, as `attempts` does -----------------------------


def test_a_retry_still_queued_at_total_is_no_attempt_for_hooks_or_history() -> None:
    """A 503 is retried, and the retry waits in the rate limiter's queue, behind another
    stream, until `total` runs out: it was never sent, so `attempts` is 1, and the hooks and
    `stats.retries` must tell of one failed attempt, not of a second one."""
    limiter = RateLimiter(max_concurrent=1)
    released = threading.Event()
    holders: list[threading.Thread] = []
    busy = MockResponse(status_code=503, chunks=[b'{"error": {"message": "busy"}}'])

    def answer(request: holysheep.Request) -> MockResponse:
        if holders:
            return MockResponse()  # the other stream's
        # Before answering the 503, have another stream queue for the slot, and take it next.
        holders.append(threading.Thread(target=hold))
        holders[0].start()
        deadline = time.monotonic() + 5
        while limiter.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        return busy

    def hold() -> None:
        with client.chat.stream(model="m", messages=MESSAGES, timeout=Timeouts(total=10)):
            released.wait(5)

    hooked: list[Attempt] = []
    recorder = Recorder()
    client = holysheep.Client(
        api_key="k",
        transport=MockTransport(answer),
        limiter=limiter,
        retry=FAST,
        timeout=Timeouts(total=0.5),
        hooks=[hooked.append],
        observers=[recorder],
    )
    with client:
        stream = client.chat.stream(model="m", messages=MESSAGES)
        with pytest.raises(TotalTimeoutError, match="rate limiter's queue") as info:
            stream.until_done()
        released.set()
        holders[0].join(5)
    assert 1 == info.value.attempts == stream.stats.attempts
    assert [1] == [attempt.attempt for attempt in hooked]
    assert hooked == list(stream.stats.retries)
    mine = [name for name, payload in recorder.events if name == "retry" or payload is info.value]
    assert ["retry", "error"] == mine  # told of the 503's retry, then of the error


# -- nothing is told after the end ----------------------------------------------------------------


class Closer(Observer):
    """Closes the stream from its `on_first_token`."""

    stream: Any = None

    def on_first_token(self, info: RequestInfo, stats: StreamStats) -> None:
        self.stream.close()


def test_an_observer_closing_the_stream_ends_it_for_the_next_observer_too() -> None:
    """The end is the last callback every observer hears: the next observer's first token,
    told after the close reported the end, came after it."""
    closer, recorder = Closer(), Recorder()
    client = holysheep.Client(api_key="k", transport=answer(), observers=[closer, recorder])
    with client, client.chat.stream(model="m", messages=MESSAGES) as stream:
        closer.stream = stream
        for _ in stream:
            pass
    assert ["request", "end"] == recorder.names


@pytest.mark.anyio
async def test_async_an_observer_closing_the_stream_ends_it_for_the_next_observer_too() -> None:
    closer, recorder = Closer(), Recorder()
    transport = AsyncMockTransport([MockResponse(chunks=sse_body("Hello", " world"))])
    client = holysheep.AsyncClient(api_key="k", transport=transport, observers=[closer, recorder])
    async with client, client.chat.stream(model="m", messages=MESSAGES) as stream:
        closer.stream = stream
        async for _ in stream:
            pass
    assert ["request", "end"] == recorder.names


class ReturnsWhenInterrupted(BaseTransport):
    """The second read waits until `close()` interrupts it, then returns the content it had
    (a transport may return or raise there)."""

    def send(self, request: Any) -> Response:
        woken = threading.Event()
        role, hello = sse_body("Hello")[:2]

        def body() -> Iterator[bytes]:
            yield role  # no content yet
            woken.wait(5)
            yield hello

        return Response(200, HEAD, body(), woken.set, woken.set)


def test_content_read_as_another_thread_closes_brings_no_first_token_after_the_end() -> None:
    recorder = Recorder()
    client = holysheep.Client(api_key="k", transport=ReturnsWhenInterrupted(), observers=[recorder])
    with client, client.chat.stream(model="m", messages=MESSAGES) as stream:
        closing = threading.Timer(0.1, stream.close)
        closing.start()
        for _ in stream:
            pass
        closing.join()
    assert ["request", "end"] == recorder.names


# -- an observer's time, and code blocking the event loop, are not the server's idle time -----


class SlowFirstToken(Observer):
    """Blocks in `on_first_token` for longer than the idle timeout (a synchronous export)."""

    def on_first_token(self, info: RequestInfo, stats: StreamStats) -> None:
        time.sleep(0.6)


PACED = Timeouts(idle=0.3)


def test_a_slow_observer_is_the_callers_time_not_the_servers() -> None:
    """As a slow loop body is: the watchdog took the observer's 0.6 s for a stalled server
    (and `complete()` then paid for the whole answer again)."""
    with serve(tokens_per_s=100) as upstream:
        client = holysheep.Client(
            api_key="k",
            base_url=upstream.base_url,
            timeout=PACED,
            retry=RetryPolicy(attempts=1),
            observers=[SlowFirstToken()],
        )
        with client:
            completion = client.chat.complete(model="m", messages=MESSAGES, max_tokens=10)
        assert "length" == completion.finish_reason
        assert 1 == len(upstream.requests)


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["observer", "loop body"])
async def test_code_blocking_the_event_loop_does_not_fail_a_stream_that_sent_on_time(
    where: str,
) -> None:
    """On asyncio the deadline timer ran in the loop's first turn after the block, as the
    bytes sent meanwhile were there but the read waiting for them not yet woken, and cancelled
    it: `IdleTimeoutError` after "waited 0.60 s" (trio always forgave it)."""
    observers = [SlowFirstToken()] if where == "observer" else []
    with serve(tokens_per_s=100) as upstream:
        client = holysheep.AsyncClient(
            api_key="k",
            base_url=upstream.base_url,
            timeout=PACED,
            retry=RetryPolicy(attempts=1),
            observers=observers,
        )
        async with client, client.chat.stream(model="m", messages=MESSAGES, max_tokens=10) as s:
            async for chunk in s:
                if chunk.text and where == "loop body" and s.completion.text == chunk.text:
                    time.sleep(0.6)  # blocking, not awaiting: the loop stands still
        assert "length" == s.completion.finish_reason
