"""The sync and async clients against a real HTTP server on 127.0.0.1 (holysheep.testing).

Every fault is injected by the server, over real sockets; nothing here is mocked.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import runpy
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import holysheep
from holysheep import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    ChatChunk,
    ConnectError,
    FirstTokenTimeoutError,
    IdleTimeoutError,
    IncompleteStreamError,
    InternalServerError,
    RateLimitError,
    RemoteProtocolError,
    RetryPolicy,
    StreamError,
    StreamInterruptedError,
    Timeouts,
    TotalTimeoutError,
    UnexpectedContentTypeError,
)
from holysheep.testing import MockUpstream, UpstreamConfig, serve
from holysheep.transports import (
    AsyncBaseTransport,
    AsyncHTTPXTransport,
    AsyncMockTransport,
    AsyncResponse,
    BaseTransport,
    HTTPXTransport,
    MockResponse,
    MockTransport,
    Request,
    RequestsTransport,
    Response,
    sse_body,
)

MESSAGES = [{"role": "user", "content": "Tell me about sheep."}]
EXPECTED = "".join(UpstreamConfig().token_list(None))


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with serve() as server:
        yield server


@pytest.fixture(params=["requests", "httpx"])
def transport(request: pytest.FixtureRequest) -> Iterator[BaseTransport]:
    chosen: BaseTransport = RequestsTransport() if request.param == "requests" else HTTPXTransport()
    with chosen:
        yield chosen


def client_for(upstream: MockUpstream, transport: BaseTransport, **kwargs: Any) -> holysheep.Client:
    """A client that raises every failure as it happens (retries have their own tests)."""
    kwargs.setdefault("retry", RetryPolicy.none())
    return holysheep.Client(
        api_key="sk-test", base_url=upstream.base_url, transport=transport, **kwargs
    )


def config(**kwargs: Any) -> dict[str, str]:
    """Per-request server behaviour, sent as the X-Mock-Config header."""
    import json

    return {"x-mock-config": json.dumps(kwargs)}


# -- the happy path ---------------------------------------------------------------------------


def test_sync_stream_yields_typed_chunks_and_the_completion(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    """The contract: `with client.chat.stream(...) as stream: for chunk in stream`."""
    client = client_for(upstream, transport)
    with client.chat.stream(model="gpt-4.1", messages=MESSAGES, max_tokens=500) as stream:
        texts = [chunk.text for chunk in stream]
    assert EXPECTED == "".join(texts)
    completion = stream.completion
    assert (EXPECTED, "stop", "assistant", "gpt-4.1") == (
        completion.text,
        completion.finish_reason,
        completion.role,
        completion.model,
    )
    assert completion.usage is not None
    assert len(texts) - 3 == completion.usage.completion_tokens  # role, finish, usage chunks
    stats = stream.stats
    assert (len(texts), False, 1) == (stats.events, stats.tokens_estimated, stats.attempts)
    assert stats.ttft is not None
    assert stats.duration is not None
    assert stats.bytes > len(EXPECTED)


def test_request_body_headers_and_ids(upstream: MockUpstream, transport: BaseTransport) -> None:
    """Extra params pass through; the request id is sent and the server's is captured."""
    client = client_for(upstream, transport)
    with client.chat.stream(
        model="gpt-4.1", messages=MESSAGES, temperature=0.3, request_id="my-id-1"
    ) as stream:
        stream.until_done()
    seen = upstream.requests[-1]
    assert ("Bearer sk-test", "my-id-1", "text/event-stream") == (
        seen.headers["authorization"],
        seen.headers["x-request-id"],
        seen.headers["accept"],
    )
    assert (0.3, True, {"include_usage": True}) == (
        seen.body["temperature"],
        seen.body["stream"],
        seen.body["stream_options"],
    )
    # The upstream mints its own id, as the API does; the stream reports the server's.
    assert stream.request_id.startswith("req_")
    assert ("my-id-1", stream.request_id) == (
        stream.stats.request_id,
        stream.stats.server_request_id,
    )


def test_an_x_request_id_header_is_the_request_id(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    """Given as a header, the id is sent once and is the one the stats report."""
    client = client_for(upstream, transport)
    with client.chat.stream(
        model="m", messages=MESSAGES, extra_headers={"X-Request-ID": "hdr-2"}
    ) as stream:
        stream.until_done()
    assert "hdr-2" == upstream.requests[-1].headers["x-request-id"]
    assert "hdr-2" == stream.stats.request_id


def test_looking_at_a_stream_before_sending_costs_no_attempt(transport: BaseTransport) -> None:
    """The request id, an empty completion and stats are there before the request is sent,
    and reading them does not use up one of the retry policy's attempts."""
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        client = client_for(upstream, transport, retry=RetryPolicy(attempts=2, wait_initial=0.01))
        stream = client.chat.stream(model="m", messages=MESSAGES, request_id="early-1")
        assert ("early-1", "", 0) == (
            stream.request_id,
            stream.completion.text,
            stream.stats.events,
        )
        with stream:
            stream.until_done()
        assert (EXPECTED, 2, 2) == (
            stream.completion.text,
            stream.stats.attempts,
            len(upstream.requests),
        )
        client.close()


def test_complete_and_text_stream(upstream: MockUpstream, transport: BaseTransport) -> None:
    """`complete()` returns the Completion; `text_stream()` yields only text."""
    client = client_for(upstream, transport)
    assert EXPECTED == client.chat.complete(model="m", messages=MESSAGES).text
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        pieces = list(stream.text_stream())
    assert all(pieces)
    assert EXPECTED == "".join(pieces)


def test_max_tokens_gives_length(upstream: MockUpstream, transport: BaseTransport) -> None:
    """The server's `length` finish reason comes through."""
    completion = client_for(upstream, transport).chat.complete(
        model="m", messages=MESSAGES, max_tokens=5
    )
    assert ("length", 5) == (
        completion.finish_reason,
        completion.usage and completion.usage.completion_tokens,
    )


def test_sequential_streams_reuse_one_connection(transport: BaseTransport) -> None:
    """Keep-alive: ten streams, one connection."""
    with serve() as fresh:
        client = client_for(fresh, transport)
        for _ in range(10):
            client.chat.complete(model="m", messages=MESSAGES)
        assert 1 == fresh.connections_opened


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, BadRequestError),
        (401, AuthenticationError),
        (429, RateLimitError),
        (503, InternalServerError),
    ],
)
def test_error_statuses_raise_typed_errors_with_details(
    upstream: MockUpstream, transport: BaseTransport, status: int, error: type[Exception]
) -> None:
    """Status, the server's message and the request id are in the error."""
    client = client_for(upstream, transport)
    fault = {"kind": "status", "status": status, "retry_after": 3}
    with pytest.raises(error) as info:
        client.chat.complete(
            model="m",
            messages=MESSAGES,
            extra_headers=config(fault=fault, echo_request_id=True),
            request_id="rid-7",
        )
    text = str(info.value)
    assert f"HTTP {status}" in text
    assert "mock fault" in text
    assert "request_id=rid-7" in text
    if isinstance(info.value, RateLimitError):
        assert 3.0 == info.value.retry_after


def test_error_responses_are_closed_so_the_pool_never_runs_dry(transport: BaseTransport) -> None:
    """200 rate-limited requests in a row, then a normal one: no connection is leaked."""
    with serve(fault={"kind": "status", "status": 429}) as limited:
        client = client_for(limited, transport)
        for _ in range(200):
            with pytest.raises(RateLimitError):
                client.chat.complete(model="m", messages=MESSAGES)
        assert limited.connections_opened <= 2
        limited.config = UpstreamConfig()
        assert EXPECTED == client.chat.complete(model="m", messages=MESSAGES).text


def test_wrong_content_type_is_a_clear_error(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    """A proxy's HTML page served with 200 is not an empty success."""
    client = client_for(upstream, transport)
    with pytest.raises(UnexpectedContentTypeError, match="502 Bad Gateway") as info:
        client.chat.complete(
            model="m", messages=MESSAGES, extra_headers=config(fault="wrong_content_type")
        )
    assert "text/html" == info.value.content_type


def test_dropped_connection_keeps_the_partial_text(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    """The server resets the connection after 5 tokens: exactly those 5 are kept."""
    client = client_for(upstream, transport)
    seen: list[str] = []
    with (
        pytest.raises(IncompleteStreamError) as info,
        client.chat.stream(
            model="m", messages=MESSAGES, extra_headers=config(fault="drop@5")
        ) as stream,
    ):
        seen.extend(chunk.text for chunk in stream)
    five = "".join(UpstreamConfig().token_list(5))
    assert five == "".join(seen)
    assert info.value.completion is not None
    assert five == info.value.completion.text
    assert info.value.request_id is not None


def test_inband_error_raises_stream_error_with_partial(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    """An in-band overloaded error is a retryable StreamError carrying the text so far."""
    client = client_for(upstream, transport)
    with pytest.raises(StreamError) as info:
        client.chat.complete(
            model="m",
            messages=MESSAGES,
            request_id="rid-42",
            extra_headers=config(fault="inband_error@3", echo_request_id=True),
        )
    assert (True, "server_error") == (info.value.retryable, info.value.type)
    assert (200, "rid-42") == (info.value.status_code, info.value.request_id)
    assert info.value.completion is not None
    assert "".join(UpstreamConfig().token_list(3)) == info.value.completion.text


def test_invalid_json_raises_remote_protocol_error(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    """Invalid JSON in the stream is named, never skipped."""
    client = client_for(upstream, transport)
    with pytest.raises(RemoteProtocolError, match="not json") as info:
        client.chat.complete(
            model="m",
            messages=MESSAGES,
            request_id="rid-43",
            extra_headers=config(fault="invalid_json@2", echo_request_id=True),
        )
    assert (200, "rid-43") == (info.value.status_code, info.value.request_id)
    assert info.value.completion is not None  # what came before the bad event is kept
    assert "".join(UpstreamConfig().token_list(2)) == info.value.completion.text


def test_connection_refused_is_a_connection_error(transport: BaseTransport) -> None:
    """Nothing listening: ConnectError (an APIConnectionError) naming the URL and our request
    id."""
    with serve() as gone:
        url = gone.base_url
    client = holysheep.Client(
        api_key="k", base_url=url, transport=transport, retry=RetryPolicy.none()
    )
    with pytest.raises(ConnectError, match="could not connect to") as info:
        client.chat.complete(model="m", messages=MESSAGES, request_id="rid-x")
    assert "rid-x" == info.value.request_id
    assert REFUSED.format(url) == info.value.message  # not urllib3's "Max retries exceeded"
    assert not causes(info.value)[-1].__module__.startswith("holysheep")  # the library's own


def causes(exc: BaseException) -> list[BaseException]:
    """`exc`'s chain of causes, outermost first (an exception raised from itself ends it)."""
    chain: list[BaseException] = []
    cause = exc.__cause__
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__
    return chain


def test_a_refusal_inside_an_except_block_says_refused(transport: BaseTransport) -> None:
    """The error being handled when the request was made is no cause of it: the message
    named the caller's own `FileNotFoundError` (and leaked its text)."""
    with serve() as gone:
        url = gone.base_url
    client = holysheep.Client(
        api_key="k", base_url=url, transport=transport, retry=RetryPolicy.none()
    )
    try:
        open("/nonexistent/holysheep-cache.json")  # noqa: SIM115
    except FileNotFoundError:
        with pytest.raises(ConnectError) as info:
            client.chat.complete(model="m", messages=MESSAGES)
    assert REFUSED.format(url) == info.value.message


def test_a_refusing_proxy_is_named(
    transport: BaseTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy that refuses: the message says the proxy failed, not the API's host."""
    with serve() as gone:
        proxy = gone.base_url.removesuffix("/v1")
    monkeypatch.setenv("HTTP_PROXY", proxy)
    monkeypatch.setenv("NO_PROXY", "")
    client = holysheep.Client(
        api_key="k",
        base_url="http://api.example.invalid/v1",
        transport=type(transport)(),
        retry=RetryPolicy.none(),
    )
    with pytest.raises(ConnectError, match=r"through the proxy: \[Errno \d+\] Connection refused"):
        client.chat.complete(model="m", messages=MESSAGES)


@pytest.mark.anyio
async def test_async_connection_refused_says_refused() -> None:
    """The default async transport names the refusal (anyio says "All connection attempts
    failed", and asyncio "Connect call failed")."""
    with serve() as gone:
        url = gone.base_url
    client = holysheep.AsyncClient(api_key="k", base_url=url, retry=RetryPolicy.none())
    with pytest.raises(ConnectError) as info:
        await client.chat.complete(model="m", messages=MESSAGES)
    assert REFUSED.format(url) == info.value.message
    assert httpx.ConnectError in [type(cause) for cause in causes(info.value)]  # kept
    await client.aclose()


# What a refused connection says, whichever transport met it: the system's words.
REFUSED = (
    f"could not connect to {{}}/chat/completions: [Errno {errno.ECONNREFUSED}] "
    f"{os.strerror(errno.ECONNREFUSED)}"
)


# -- timeouts ---------------------------------------------------------------------------------


def test_ttft_timeout(upstream: MockUpstream, transport: BaseTransport) -> None:
    """A slow first token trips `ttft`, and the error says so."""
    client = client_for(upstream, transport, timeout=Timeouts(ttft=0.2))
    started = time.monotonic()
    with pytest.raises(FirstTokenTimeoutError, match="ttft timeout"):
        client.chat.complete(model="m", messages=MESSAGES, extra_headers=config(ttft=2))
    assert time.monotonic() - started < 1.5
    client.close()


def test_idle_timeout_ignores_keepalives(upstream: MockUpstream, transport: BaseTransport) -> None:
    """Keep-alive comments every 50 ms while the next token is 2 s away still trip `idle`;
    the partial text is kept. (The upstream's stall fault sends no keep-alives: tokens paced
    slowly do, so this test fails if a comment resets `idle`.)"""
    client = client_for(upstream, transport, timeout=Timeouts(idle=0.3))
    behaviour = config(tokens_per_s=0.5, keepalive_interval=0.05)
    left_before = upstream.disconnects
    started = time.monotonic()
    with pytest.raises(IdleTimeoutError) as info:
        client.chat.complete(model="m", messages=MESSAGES, max_tokens=3, extra_headers=behaviour)
    assert time.monotonic() - started < 1.5
    assert info.value.completion is not None
    assert "".join(UpstreamConfig().token_list(1)) == info.value.completion.text
    assert upstream.wait_for_disconnect(2.0, count=left_before + 1)  # the server saw it
    client.close()


def test_total_timeout(upstream: MockUpstream, transport: BaseTransport) -> None:
    """`total` fires even while tokens flow."""
    client = client_for(upstream, transport, timeout=Timeouts(total=0.3))
    with pytest.raises(TotalTimeoutError):
        client.chat.complete(model="m", messages=MESSAGES, extra_headers=config(tokens_per_s=20))
    client.close()


def _instant_client(script: Any = None) -> holysheep.Client:
    return holysheep.Client(
        api_key="k",
        transport=MockTransport(script or (lambda request: MockResponse())),
        retry=RetryPolicy.none(),
    )


def test_the_stop_event_is_made_only_for_a_wait_and_set_if_closed_first() -> None:
    """A stream that never waits (for the rate limiter or a retry) makes no Event; one made
    after `close()` is set already, so a wait that starts then ends at once."""
    client = holysheep.Client(
        api_key="k",
        base_url="http://h/v1",
        transport=MockTransport(lambda request: MockResponse(chunks=sse_body("Hi"))),
    )
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        assert "Hi" == "".join(chunk.text for chunk in stream)
    assert stream._stop is None
    late = client.chat.stream(model="m", messages=MESSAGES)
    late.close()
    started = time.monotonic()
    late._stop_event().wait(5)
    assert time.monotonic() - started < 1
    client.close()


def test_short_streams_do_not_wake_the_watchdog_each_time() -> None:
    """Streams that end before the watchdog thread runs leave it asleep, not woken per stream."""
    client = _instant_client()
    for _ in range(200):
        assert "Hello!" == client.chat.complete(model="m", messages=MESSAGES).text
    assert client._watchdog.looks < 10  # one look per stream before the fix
    client.close()


def test_short_streams_with_pauses_do_not_wake_the_watchdog_each_time() -> None:
    """Past its first idle second, too: a stream that wakes it gets it a new second to wait."""
    client = _instant_client()
    streams = 0
    until = time.monotonic() + 2.5
    while time.monotonic() < until:
        client.chat.complete(model="m", messages=MESSAGES)
        streams += 1
        time.sleep(0.001)
    assert streams > 500
    assert client._watchdog.looks < 30  # about one look per stream without the new second
    client.close()


def test_a_deadline_sooner_than_the_idle_watchdogs_next_look_still_fires() -> None:
    """The idle watchdog looks again in a second; a stream due sooner wakes it."""

    def script(request: holysheep.Request) -> MockResponse:
        return MockResponse(delay=3.0) if ("x-stall", "1") in request.headers else MockResponse()

    client = _instant_client(script)
    watchdog = client._watchdog
    give_up = time.monotonic() + 10.0
    while True:  # until it found nothing to watch and will look again in about a second
        due = watchdog._wake_at
        if not watchdog._streams and due is not None and due - time.monotonic() > 0.8:
            break
        if time.monotonic() > give_up:
            pytest.fail("the watchdog never went idle")
        if watchdog.looks == 0 or due is None:
            # Not started, or asleep until woken: a short stream wakes it into a fresh second.
            client.chat.complete(model="m", messages=MESSAGES, timeout=Timeouts(connect=0.2))
        time.sleep(0.005)
    started = time.monotonic()
    with pytest.raises(FirstTokenTimeoutError):
        client.chat.complete(
            model="m",
            messages=MESSAGES,
            timeout=Timeouts(ttft=0.2),
            extra_headers={"x-stall": "1"},
        )
    assert 0.2 <= time.monotonic() - started < 0.7
    client.close()


# -- the caller's own time: ttft and idle wait for the server, not for the caller --------------

SLOW_CALLER = 0.6  # seconds the caller spends on a chunk, twice the `idle` below
TOKENS = UpstreamConfig().token_list(None)


def _slow_sync_read(stream: holysheep.Stream, pause_after: int) -> str:
    """Read `stream`, sleeping `SLOW_CALLER` after the content chunk number `pause_after`."""
    texts, seen = [], 0
    for chunk in stream:
        texts.append(chunk.text)
        seen += bool(chunk.text)
        if chunk.text and seen == pause_after:
            time.sleep(SLOW_CALLER)
    return "".join(texts)


def test_a_slow_caller_does_not_trip_idle(upstream: MockUpstream, transport: BaseTransport) -> None:
    """The server sent everything at once; the caller then spends longer on one chunk than
    `idle`. Nothing timed out on the wire, so the whole answer arrives."""
    client = client_for(upstream, transport, timeout=Timeouts(idle=0.3))
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        assert EXPECTED == _slow_sync_read(stream, pause_after=1)
    client.close()


def test_a_caller_late_to_iterate_does_not_trip_ttft(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    client = client_for(upstream, transport, timeout=Timeouts(ttft=0.3))
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        time.sleep(SLOW_CALLER)
        assert EXPECTED == "".join(chunk.text for chunk in stream)
    client.close()


def test_after_a_slow_caller_a_stall_is_timed_from_its_return(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    """The clock restarts when the caller asks again: a real stall after that still fires,
    `idle` after the caller's return, with what arrived kept."""
    client = client_for(upstream, transport, timeout=Timeouts(idle=0.3))
    behaviour = config(fault="stall@4", keepalive_interval=0.05)
    with (
        client.chat.stream(model="m", messages=MESSAGES, extra_headers=behaviour) as stream,
        pytest.raises(IdleTimeoutError) as info,
    ):
        _slow_sync_read(stream, pause_after=1)
    assert 0.25 < info.value.elapsed < 1.5  # from the return, not from the first chunk
    assert info.value.completion is not None
    assert "".join(TOKENS[:4]) == info.value.completion.text
    client.close()


def test_total_counts_the_callers_time_too(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    client = client_for(upstream, transport, timeout=Timeouts(total=0.4))
    with client.chat.stream(model="m", messages=MESSAGES, extra_headers=config(tokens_per_s=50)):
        pass
    with (
        client.chat.stream(
            model="m", messages=MESSAGES, extra_headers=config(tokens_per_s=50)
        ) as stream,
        pytest.raises(TotalTimeoutError),
    ):
        _slow_sync_read(stream, pause_after=1)
    client.close()


def _async_client(url: str, kind: str, anyio_backend: str, **kwargs: Any) -> holysheep.AsyncClient:
    """An `AsyncClient` on the httpx transport (the default) or on aiohttp (asyncio only), that
    raises every failure as it happens unless told otherwise."""
    kwargs.setdefault("retry", RetryPolicy.none())
    if kind != "httpx":
        if anyio_backend != "asyncio":
            pytest.skip("aiohttp runs on asyncio only")
        from holysheep.transports import AiohttpTransport

        kwargs["transport"] = AiohttpTransport()
    return holysheep.AsyncClient(api_key="k", base_url=url, **kwargs)


async def _slow_async_read(stream: holysheep.AsyncStream, pause_after: int) -> str:
    texts, seen = [], 0
    async for chunk in stream:
        texts.append(chunk.text)
        seen += bool(chunk.text)
        if chunk.text and seen == pause_after:
            await anyio.sleep(SLOW_CALLER)
    return "".join(texts)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["httpx", "aiohttp"])
async def test_async_a_slow_caller_does_not_trip_ttft_or_idle(
    upstream: MockUpstream, kind: str, anyio_backend: str
) -> None:
    async with _async_client(
        upstream.base_url, kind, anyio_backend, timeout=Timeouts(ttft=0.3, idle=0.3)
    ) as client:
        async with client.chat.stream(model="m", messages=MESSAGES) as stream:
            assert EXPECTED == await _slow_async_read(stream, pause_after=1)
        async with client.chat.stream(model="m", messages=MESSAGES) as stream:
            await anyio.sleep(SLOW_CALLER)  # late to iterate: past ttft
            assert EXPECTED == await _slow_async_read(stream, pause_after=0)
        async with client.chat.stream(
            model="m",
            messages=MESSAGES,
            extra_headers=config(fault="stall@4", keepalive_interval=0.05),
        ) as stream:
            with pytest.raises(IdleTimeoutError) as info:
                await _slow_async_read(stream, pause_after=1)
        assert 0.25 < info.value.elapsed < 1.5
        assert info.value.completion is not None
        assert "".join(TOKENS[:4]) == info.value.completion.text
        with pytest.raises(TotalTimeoutError):
            async with client.chat.stream(
                model="m",
                messages=MESSAGES,
                timeout=Timeouts(total=0.4),
                extra_headers=config(tokens_per_s=50),
            ) as stream:
                await _slow_async_read(stream, pause_after=1)


@pytest.mark.anyio
async def test_async_idle_alone_waits_for_a_slow_first_token(upstream: MockUpstream) -> None:
    """With ttft and total off, only `idle` runs, from the first content: a first token after
    longer than `idle` is fine (the asyncio timer used to fire before any content)."""
    async with holysheep.AsyncClient(
        api_key="k",
        base_url=upstream.base_url,
        timeout=Timeouts(connect=5, ttft=None, idle=0.3, total=None),
        retry=RetryPolicy.none(),
    ) as client:
        completion = await client.chat.complete(
            model="m", messages=MESSAGES, max_tokens=3, extra_headers=config(ttft=0.8)
        )
        assert "".join(TOKENS[:3]) == completion.text


# -- stopping early: the server must see the client leave -------------------------------------


def test_break_closes_the_connection(transport: BaseTransport) -> None:
    """`break` out of the loop: the server observes the disconnect."""
    with serve(tokens_per_s=200, tokens=400) as slow:
        client = client_for(slow, transport)
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            for chunk in stream:
                if chunk.text:
                    break
        assert stream.closed
        assert slow.wait_for_disconnect(3.0)


def test_close_from_another_thread_unblocks_a_read(transport: BaseTransport) -> None:
    """A reader blocked on a stalled stream returns promptly when another thread closes it."""
    with serve(fault="stall@2") as stalled:
        client = client_for(stalled, transport)
        stream = client.chat.stream(model="m", messages=MESSAGES)
        stream.open()
        threading.Timer(0.2, stream.close).start()
        started = time.monotonic()
        texts = [chunk.text for chunk in stream]
        assert time.monotonic() - started < 2.0
        assert "".join(UpstreamConfig().token_list(2)) == "".join(texts)
        assert stalled.wait_for_disconnect(3.0)


def test_close_while_the_head_is_awaited_keeps_the_slot_until_the_request_ends(
    transport: BaseTransport,
) -> None:
    """`close()` from another thread while `send` waits for the head: the server still holds
    the request, so a `max_concurrent` slot stays taken until `send` returns (it was given
    back at once, and a second request went out next to the first)."""
    limiter = holysheep.RateLimiter(max_concurrent=1)

    def head_after_a_while(conn: socket.socket) -> None:
        time.sleep(0.6)
        conn.sendall(_SSE_HEAD + _chunk("[DONE]") + b"0\r\n\r\n")

    with _one_connection(head_after_a_while) as (url, _):
        client = holysheep.Client(
            api_key="k",
            base_url=url,
            transport=transport,
            limiter=limiter,
            retry=RetryPolicy.none(),
        )
        stream = client.chat.stream(model="m", messages=MESSAGES)
        opener = threading.Thread(target=stream.open, daemon=True)
        opener.start()
        time.sleep(0.2)  # sending, waiting for the head
        assert 1 == limiter.in_flight
        stream.close()
        assert 1 == limiter.in_flight
        opener.join(3)
        assert not opener.is_alive()
        assert 0 == limiter.in_flight
        client.close()


class _BlockingTransport(BaseTransport):
    """One event, then a read that blocks until interrupted; records which thread called
    `interrupt` and `close` on the response."""

    def __init__(self) -> None:
        self.woken = threading.Event()
        self.calls: list[tuple[str, str]] = []

    def send(self, request: holysheep.transports.Request) -> holysheep.transports.Response:
        def body() -> Iterator[bytes]:
            yield b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
            self.woken.wait(5)
            raise APIConnectionError("interrupted")

        def interrupt() -> None:
            self.calls.append(("interrupt", threading.current_thread().name))
            self.woken.set()

        def close() -> None:
            self.calls.append(("close", threading.current_thread().name))
            self.woken.set()

        return holysheep.transports.Response(
            200, {"content-type": "text/event-stream"}, body(), close, interrupt
        )


@pytest.mark.parametrize("stopper", ["watchdog", "close"])
def test_only_the_reading_thread_closes_a_connection_it_reads(stopper: str) -> None:
    """The watchdog and `close()` from another thread only wake a blocked read
    (`Response.interrupt`); the reader closes. A socket closed by another thread just as a
    read starts hands its number to the next connection opened, and the read waited on that
    one for good (streams hung, in about one run in two of 60 streams with idle timeouts)."""
    transport = _BlockingTransport()
    client = holysheep.Client(
        api_key="k", transport=transport, timeout=Timeouts(idle=0.2), retry=RetryPolicy.none()
    )
    reader = threading.current_thread().name
    texts: list[str] = []
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        if stopper == "close":
            threading.Timer(0.1, stream.close).start()
        with contextlib.suppress(IdleTimeoutError):
            texts.extend(chunk.text for chunk in stream)
    client.close()
    assert ["Hi"] == texts
    interrupts = [who for what, who in transport.calls if what == "interrupt"]
    closes = [who for what, who in transport.calls if what == "close"]
    assert 1 == len(interrupts)
    assert reader != interrupts[0]
    assert {reader} == set(closes)


def test_an_idle_timeout_after_the_finish_ends_the_answer(transport: BaseTransport) -> None:
    """The server sends the finish, then nothing: the watchdog's wake-up of the read is the
    idle timeout, not a broken connection, and after the finish that timeout ends a complete
    answer (as on the async client; see `Exchange.complete_at_break`)."""

    def finish_then_silence(conn: socket.socket) -> None:
        choice = {"index": 0, "finish_reason": None}
        conn.sendall(
            _SSE_HEAD
            + _chunk({"choices": [{**choice, "delta": {"content": "Hi"}}]})
            + _chunk({"choices": [{**choice, "delta": {}, "finish_reason": "stop"}]})
        )
        time.sleep(1.5)

    with _one_connection(finish_then_silence) as (url, _):
        client = holysheep.Client(
            api_key="k",
            base_url=url,
            transport=transport,
            timeout=Timeouts(idle=0.3),
            retry=RetryPolicy.none(),
        )
        completion = client.chat.complete(model="m", messages=MESSAGES)
        client.close()
    assert ("Hi", "stop") == (completion.text, completion.finish_reason)


def test_leaving_the_block_while_another_thread_reads_leaves_the_close_to_it() -> None:
    """`with` in one thread, iteration in another: leaving the block only wakes the reader,
    which closes (the block's thread closed the response under the read)."""
    transport = _BlockingTransport()
    client = holysheep.Client(api_key="k", transport=transport, retry=RetryPolicy.none())
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        reader = threading.Thread(target=lambda: list(stream), name="the-reader", daemon=True)
        reader.start()
        time.sleep(0.2)  # blocked in its second read
    reader.join(3)
    assert not reader.is_alive()
    client.close()
    assert ["the-reader"] == [who for what, who in transport.calls if what == "close"]


def test_an_exception_while_opening_gives_back_the_slot() -> None:
    """Ctrl-C (or a transport's bug) during the send in `__enter__`: `__exit__` never runs,
    so `open()` gives back the rate limiter's slot itself, as the async client does."""
    limiter = holysheep.RateLimiter(max_concurrent=1)

    def interrupted(request: Any) -> MockResponse:
        raise KeyboardInterrupt

    client = holysheep.Client(api_key="k", transport=MockTransport(interrupted), limiter=limiter)
    with pytest.raises(KeyboardInterrupt), client.chat.stream(model="m", messages=MESSAGES):
        pass
    assert 0 == limiter.in_flight
    client.close()


def test_a_second_iteration_is_refused_and_leaves_the_first_alone(
    transport: BaseTransport,
) -> None:
    """Two threads iterating one stream: the second gets a clear RuntimeError at once (it used
    to read the same body and take half the chunks), and the first still answers to close()."""
    with serve(fault="stall@2") as stalled:
        client = client_for(stalled, transport)
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            texts: list[str] = []
            reader = threading.Thread(
                target=lambda: texts.extend(c.text for c in stream), daemon=True
            )
            reader.start()
            time.sleep(0.2)  # the first is blocked in the stall
            try:
                with pytest.raises(RuntimeError, match="already being read"):
                    next(iter(stream))
            finally:
                stream.close()
            reader.join(2.0)
            assert not reader.is_alive()
        assert "".join(UpstreamConfig().token_list(2)) == "".join(texts)
        client.close()


def test_an_iteration_after_the_end_reads_nothing(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    """The guard against a second reader lets go when an iteration ends: iterating again
    later (a second `for`) is not refused, it finds the stream over."""
    client = client_for(upstream, transport)
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        first = [chunk.text for chunk in stream]
        assert [] == list(stream)
    assert EXPECTED == "".join(first)
    client.close()


# -- async, on asyncio and trio ----------------------------------------------------------------


@pytest.mark.anyio
async def test_async_stream(upstream: MockUpstream) -> None:
    """`async with client.chat.stream(...)` / `async for`, on both backends."""
    async with holysheep.AsyncClient(api_key="k", base_url=upstream.base_url) as client:
        async with client.chat.stream(model="m", messages=MESSAGES) as stream:
            texts = [chunk.text async for chunk in stream]
        assert EXPECTED == "".join(texts) == stream.completion.text
        assert EXPECTED == (await client.chat.complete(model="m", messages=MESSAGES)).text


@pytest.mark.anyio
async def test_async_looking_at_a_stream_before_sending_costs_no_attempt() -> None:
    with serve() as upstream:
        upstream.enqueue({"fault": {"kind": "status", "status": 503}})
        async with holysheep.AsyncClient(
            api_key="k",
            base_url=upstream.base_url,
            retry=RetryPolicy(attempts=2, wait_initial=0.01),
        ) as client:
            stream = client.chat.stream(model="m", messages=MESSAGES, request_id="early-2")
            assert ("early-2", "", 0) == (
                stream.request_id,
                stream.completion.text,
                stream.stats.events,
            )
            async with stream:
                await stream.until_done()
        assert (EXPECTED, 2, 2) == (
            stream.completion.text,
            stream.stats.attempts,
            len(upstream.requests),
        )


@pytest.mark.anyio
async def test_async_errors_and_timeouts(upstream: MockUpstream) -> None:
    """Status errors, drops and timeouts behave as in the sync client."""
    async with holysheep.AsyncClient(
        api_key="k",
        base_url=upstream.base_url,
        timeout=Timeouts(ttft=0.2, idle=0.3),
        retry=RetryPolicy.none(),
    ) as client:
        with pytest.raises(RateLimitError):
            await client.chat.complete(
                model="m",
                messages=MESSAGES,
                extra_headers=config(fault={"kind": "status", "status": 429}),
            )
        with pytest.raises(IncompleteStreamError) as info:
            await client.chat.complete(
                model="m", messages=MESSAGES, extra_headers=config(fault="drop@3")
            )
        assert info.value.completion is not None
        assert "".join(UpstreamConfig().token_list(3)) == info.value.completion.text
        with pytest.raises(FirstTokenTimeoutError):
            await client.chat.complete(model="m", messages=MESSAGES, extra_headers=config(ttft=2))
        with pytest.raises(IdleTimeoutError):
            await client.chat.complete(
                model="m",
                messages=MESSAGES,
                extra_headers=config(fault="stall@2", keepalive_interval=0.05),
            )


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["inband_error@2", "invalid_json@2"])
async def test_async_errors_in_the_stream_carry_status_id_and_partial(
    upstream: MockUpstream, fault: str
) -> None:
    async with holysheep.AsyncClient(
        api_key="k", base_url=upstream.base_url, retry=RetryPolicy.none()
    ) as client:
        with pytest.raises((StreamError, RemoteProtocolError)) as info:
            await client.chat.complete(
                model="m",
                messages=MESSAGES,
                request_id="rid-44",
                extra_headers=config(fault=fault, echo_request_id=True),
            )
    assert (200, "rid-44") == (info.value.status_code, info.value.request_id)
    assert info.value.completion is not None
    assert "".join(UpstreamConfig().token_list(2)) == info.value.completion.text


@pytest.mark.anyio
async def test_async_idle_deadline_sooner_than_ttft_applies_after_first_content(
    upstream: MockUpstream,
) -> None:
    """The first content swaps a far ttft deadline for a near idle one: a stall after it is
    caught after `idle`, not after what was left of `ttft`."""
    async with holysheep.AsyncClient(
        api_key="k",
        base_url=upstream.base_url,
        timeout=Timeouts(ttft=20, idle=0.3),
        retry=RetryPolicy.none(),
    ) as client:
        started = anyio.current_time()
        with pytest.raises(IdleTimeoutError) as info:
            await client.chat.complete(
                model="m", messages=MESSAGES, extra_headers=config(fault="stall@2")
            )
        assert anyio.current_time() - started < 5
        assert info.value.completion is not None
        assert "".join(UpstreamConfig().token_list(2)) == info.value.completion.text


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    "timeouts",
    [
        Timeouts(),
        Timeouts(connect=None, ttft=0.4, idle=30),
        Timeouts(connect=30, ttft=None, idle=0.4, total=None),
        Timeouts(connect=None, ttft=None, idle=None, total=0.4),
        Timeouts(connect=0.4, ttft=30, idle=None, total=None),
    ],
)
async def test_the_timer_armed_at_the_send_is_due_by_the_deadline_after_the_head(
    upstream: MockUpstream, timeouts: Timeouts
) -> None:
    """On asyncio the head does not re-arm the deadline timer: the one armed before the send
    must already be due no later than the next deadline (or idle from now) once it came."""
    import asyncio

    from holysheep import _async_client

    loop = asyncio.get_running_loop()
    before = loop.time()
    assert before <= _async_client._now() <= loop.time()  # the clock read without loop.time()
    client = holysheep.AsyncClient(
        api_key="k", base_url=upstream.base_url, timeout=timeouts, retry=RetryPolicy.none()
    )
    async with (
        client,
        client.chat.stream(model="m", messages=MESSAGES, extra_headers=config(ttft=0.2)) as stream,
    ):
        exchange = stream._exchange
        assert 200 == exchange.status_code
        assert not exchange.progressed
        due = exchange.deadline()
        limits = [due[0]] if due is not None else []
        if timeouts.idle is not None:
            limits.append(loop.time() + timeouts.idle)
        assert stream._timer_due <= min(limits, default=float("inf"))
        assert EXPECTED == (await stream.until_done()).text


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_deadline_leaves_the_reading_task_uncancelled(upstream: MockUpstream) -> None:
    """On asyncio a deadline cancels the blocked read and takes the cancellation back: the
    task is not left marked as cancelled (which an enclosing `asyncio.timeout` or task group
    would misread), and it keeps running normally after the typed timeout."""
    import asyncio

    async with holysheep.AsyncClient(
        api_key="k",
        base_url=upstream.base_url,
        timeout=Timeouts(idle=0.2),
        retry=RetryPolicy.none(),
    ) as client:
        task = asyncio.current_task()
        assert task is not None
        with pytest.raises(IdleTimeoutError):
            await client.chat.complete(
                model="m", messages=MESSAGES, extra_headers=config(fault="stall@2")
            )
        if hasattr(task, "cancelling"):  # Python 3.11+
            assert 0 == task.cancelling()
        await asyncio.sleep(0.01)  # no cancellation left pending for the next await
        completion = await client.chat.complete(model="m", messages=MESSAGES)
        assert "stop" == completion.finish_reason


@pytest.mark.anyio
async def test_leaving_mid_stream_leaves_no_async_generator_to_the_collector(
    upstream: MockUpstream,
) -> None:
    """httpx's body is a chain of async generators; a stream left mid-way finishes them all,
    or the garbage collector would (trio warns about each; warnings are errors here)."""
    import gc

    async with holysheep.AsyncClient(api_key="k", base_url=upstream.base_url) as client:
        async with client.chat.stream(model="m", messages=MESSAGES) as stream:
            async for chunk in stream:
                if chunk.text:
                    break
        with pytest.raises(RemoteProtocolError):
            await client.chat.complete(
                model="m", messages=MESSAGES, extra_headers=config(fault="invalid_json@2")
            )
        gc.collect()
        await anyio.sleep(0.01)  # trio finalizes abandoned generators in a task


@pytest.mark.anyio
async def test_cancelling_the_task_closes_the_connection() -> None:
    """Cancel scope around a slow stream: the server sees the disconnect, nothing leaks."""
    with serve(tokens_per_s=100, tokens=1000) as slow:
        async with holysheep.AsyncClient(api_key="k", base_url=slow.base_url) as client:
            received = 0
            with anyio.move_on_after(0.3):
                async with client.chat.stream(model="m", messages=MESSAGES) as stream:
                    async for chunk in stream:
                        received += bool(chunk.text)
            assert 0 < received < 1000
            assert await anyio.to_thread.run_sync(slow.wait_for_disconnect, 3.0)


@pytest.mark.anyio
async def test_async_close_from_another_task() -> None:
    """`stream.close()` from another task ends a stalled read at once, quietly."""
    with serve(fault="stall@2") as stalled:
        async with holysheep.AsyncClient(api_key="k", base_url=stalled.base_url) as client:
            async with (
                client.chat.stream(model="m", messages=MESSAGES) as stream,
                anyio.create_task_group() as tg,
            ):

                async def close_soon() -> None:
                    await anyio.sleep(0.2)
                    stream.close()

                tg.start_soon(close_soon)
                texts = [chunk.text async for chunk in stream]
            assert "".join(UpstreamConfig().token_list(2)) == "".join(texts)
            assert await anyio.to_thread.run_sync(stalled.wait_for_disconnect, 3.0)


@pytest.mark.anyio
async def test_many_concurrent_streams_share_the_pool() -> None:
    """300 concurrent streams through one AsyncClient all finish (httpx's default pool is 100)."""
    with serve(tokens=20, tokens_per_s=100) as server:
        transport = AsyncHTTPXTransport()
        async with holysheep.AsyncClient(
            api_key="k", base_url=server.base_url, transport=transport
        ) as client:
            results: list[str] = []

            async def one() -> None:
                results.append((await client.chat.complete(model="m", messages=MESSAGES)).text)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for _ in range(300):
                        tg.start_soon(one)
        assert 300 == len(results)
        assert {"".join(UpstreamConfig(tokens=20).token_list(None))} == set(results)


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server that takes the request and never answers: the send itself hangs."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_a_deadline_ends_a_send_that_gets_no_answer(
    silent_server: str, transport: str, anyio_backend: str
) -> None:
    """No response head at all: the ttft deadline still fires, as the typed timeout, and on
    asyncio the task is left uncancelled."""
    if transport == "aiohttp":
        if anyio_backend != "asyncio":
            pytest.skip("aiohttp runs on asyncio only")
        from holysheep.transports import AiohttpTransport

        chosen: Any = AiohttpTransport()
    else:
        chosen = None
    async with holysheep.AsyncClient(
        api_key="k",
        base_url=silent_server,
        timeout=Timeouts(ttft=0.3),
        retry=RetryPolicy.none(),
        transport=chosen,
    ) as client:
        started = anyio.current_time()
        with pytest.raises(FirstTokenTimeoutError, match="ttft timeout"):
            await client.chat.complete(model="m", messages=MESSAGES)
        assert 0.25 < anyio.current_time() - started < 5
        if anyio_backend == "asyncio":
            import asyncio

            task = asyncio.current_task()
            assert task is not None
            if hasattr(task, "cancelling"):  # Python 3.11+
                assert 0 == task.cancelling()
            await asyncio.sleep(0.01)  # no cancellation left pending for the next await


@pytest.mark.anyio
async def test_close_from_another_task_ends_a_hanging_send_quietly(silent_server: str) -> None:
    """`stream.close()` while the request waits for its response head: the stream ends, empty,
    with no error, at once."""
    async with holysheep.AsyncClient(
        api_key="k", base_url=silent_server, retry=RetryPolicy.none()
    ) as client:
        stream = client.chat.stream(model="m", messages=MESSAGES)
        chunks: list[Any] = []

        async def consume() -> None:
            async with stream:
                chunks.extend([chunk async for chunk in stream])

        started = anyio.current_time()
        async with anyio.create_task_group() as group:
            group.start_soon(consume)
            await anyio.sleep(0.2)
            stream.close()
        assert [] == chunks
        assert anyio.current_time() - started < 3


@pytest.mark.anyio
async def test_cancelling_the_task_during_a_hanging_send_cancels_it(silent_server: str) -> None:
    """The caller's own cancellation is not mistaken for a deadline: it propagates."""
    async with holysheep.AsyncClient(
        api_key="k", base_url=silent_server, retry=RetryPolicy.none()
    ) as client:
        with anyio.move_on_after(0.3) as scope:
            await client.chat.complete(model="m", messages=MESSAGES)
        assert scope.cancelled_caught


@pytest.mark.anyio
async def test_cancelling_a_hanging_send_gives_back_the_limiters_slot(silent_server: str) -> None:
    """`__aexit__` does not run for a cancelled `__aenter__`: the slot is returned anyway, and
    the next stream gets it (the review found it held forever)."""
    limiter = holysheep.RateLimiter(max_concurrent=1)
    async with holysheep.AsyncClient(
        api_key="k", base_url=silent_server, retry=RetryPolicy.none(), limiter=limiter
    ) as client:
        for _ in range(2):
            with anyio.move_on_after(0.3) as scope:
                async with client.chat.stream(model="m", messages=MESSAGES):
                    pass
            assert scope.cancelled_caught
            assert 0 == limiter.in_flight


@pytest.mark.anyio
async def test_close_ends_a_wait_for_the_limiter(silent_server: str) -> None:
    """A stream queued behind the limiter's only slot: `close()` from another task ends the
    wait at once, and the stream ends empty, with no error."""
    limiter = holysheep.RateLimiter(max_concurrent=1)
    async with holysheep.AsyncClient(
        api_key="k", base_url=silent_server, retry=RetryPolicy.none(), limiter=limiter
    ) as client:
        holder = client.chat.stream(model="m", messages=MESSAGES)
        queued = client.chat.stream(model="m", messages=MESSAGES)
        chunks: list[Any] = []
        finished = anyio.Event()

        async def consume() -> None:
            async with queued:
                chunks.extend([chunk async for chunk in queued])
            finished.set()

        async with anyio.create_task_group() as group:
            group.start_soon(holder.open)  # takes the slot, then hangs on the silent server
            await anyio.sleep(0.1)
            assert 1 == limiter.in_flight
            group.start_soon(consume)
            await anyio.sleep(0.2)
            queued.close()
            with anyio.fail_after(2):  # it used to wait for as long as the slot was held
                await finished.wait()
            await holder.aclose()
        assert ([], 0) == (chunks, limiter.in_flight)


@contextlib.contextmanager
def _one_connection(
    handle: Callable[[socket.socket], None],
) -> Iterator[tuple[str, threading.Event]]:
    """A server on 127.0.0.1 for one connection: takes the request, then `handle(connection)`
    answers it (or not). Yields the base URL and an event set when `handle` found the client
    gone (an `OSError`)."""
    listener = socket.create_server(("127.0.0.1", 0))
    left = threading.Event()

    def serve_one() -> None:
        listener.settimeout(5)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(65536)
            try:
                handle(conn)
            except OSError:
                left.set()

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1", left
    finally:
        # A test that never connected (skipped) must not wait out the accept: shutting the
        # listener down wakes it; an accepted connection is served on regardless.
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        thread.join(15)
        listener.close()


def _gone(conn: socket.socket, stop: threading.Event) -> bool:
    """Wait for the client to close `conn` (True), or for `stop` (False)."""
    conn.settimeout(0.05)
    while not stop.is_set():
        try:
            if conn.recv(1024) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def _chunk(payload: dict[str, Any] | str) -> bytes:
    """One SSE `data:` event as one HTTP chunk."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    text = f"data: {data}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(text), text)


_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


@pytest.fixture
def slow_error_server() -> Iterator[tuple[str, threading.Event]]:
    """Answers 500 with a body that never finishes; the event is set when the client leaves."""
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
            b'content-length: 1000\r\n\r\n{"error": {"message": "bro'
        )
        if _gone(conn, stop):
            raise ConnectionResetError("the client left")

    with _one_connection(handle) as served:
        yield served
        stop.set()


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["httpx", "aiohttp"])
async def test_cancelling_while_an_error_body_is_read_closes_the_connection(
    slow_error_server: tuple[str, threading.Event], transport: str, anyio_backend: str
) -> None:
    url, left = slow_error_server
    async with _async_client(url, transport, anyio_backend) as client:
        with anyio.move_on_after(0.3) as scope:
            await client.chat.complete(model="m", messages=MESSAGES)
        assert scope.cancelled_caught
        assert await anyio.to_thread.run_sync(left.wait, 3.0)  # the server saw the client leave


@pytest.mark.anyio
async def test_a_second_reader_is_refused_and_leaves_the_first_alone(
    upstream: MockUpstream,
) -> None:
    """Two tasks reading one stream: the second gets a clear RuntimeError at once, and the first
    still answers to `close()` (a second reader used to take over its deadline and close)."""
    async with holysheep.AsyncClient(
        api_key="k", base_url=upstream.base_url, retry=RetryPolicy.none()
    ) as client:
        behaviour = config(fault="stall@2")
        async with client.chat.stream(model="m", messages=MESSAGES, extra_headers=behaviour) as s:
            texts: list[str] = []
            ended = anyio.Event()

            async def first() -> None:
                texts.extend([chunk.text async for chunk in s])
                ended.set()

            async with anyio.create_task_group() as group:
                group.start_soon(first)
                await anyio.sleep(0.2)  # first is blocked in the stall
                with pytest.raises(RuntimeError, match="already being read"):
                    await s.__anext__()
                s.close()
                with anyio.fail_after(2):
                    await ended.wait()
        assert "".join(TOKENS[:2]) == "".join(texts)


# -- the sync client's watchdog, close() and the end of a Client ------------------------------


def test_tokens_as_often_as_idle_end_cleanly_or_with_an_idle_timeout(
    transport: BaseTransport,
) -> None:
    """Content that moves the deadline while the watchdog expires a stream: the reader still
    gets the `IdleTimeoutError` the watchdog found (it used to get a RuntimeError, or a
    'connection broke' error, when the deadline had moved by the time it looked)."""
    outcomes: list[str] = []
    with serve(tokens_per_s=10, tokens=4) as upstream:
        client = client_for(upstream, transport, timeout=Timeouts(idle=0.1, ttft=2))

        def streams() -> None:
            for _ in range(6):
                try:
                    client.chat.complete(model="m", messages=MESSAGES)
                    outcomes.append("ok")
                except IdleTimeoutError:
                    outcomes.append("idle")
                except Exception as exc:  # the point is to see anything else
                    outcomes.append(repr(exc))

        threads = [threading.Thread(target=streams) for _ in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        client.close()
    assert 60 == len(outcomes)
    assert set(outcomes) <= {"ok", "idle"}


@pytest.fixture
def late_head_server() -> Iterator[tuple[str, threading.Event]]:
    """Sends the response head 0.5 s after the request, then a token every 50 ms; the event is
    set when the client has gone away."""

    def handle(conn: socket.socket) -> None:
        time.sleep(0.5)
        conn.sendall(_SSE_HEAD)
        for i in range(60):
            conn.sendall(_chunk({"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}))
            time.sleep(0.05)

    with _one_connection(handle) as served:
        yield served


def test_close_while_the_request_is_sent_closes_once_the_head_arrives(
    late_head_server: tuple[str, threading.Event], transport: BaseTransport
) -> None:
    """`close()` from another thread before the response head: nothing is read, and the
    connection is closed when the head comes (it used to be read to its end, and leaked)."""
    url, left = late_head_server
    client = holysheep.Client(
        api_key="k", base_url=url, transport=transport, retry=RetryPolicy.none()
    )
    stream = client.chat.stream(model="m", messages=MESSAGES)
    threading.Timer(0.1, stream.close).start()
    started = time.monotonic()
    with stream:
        texts = [chunk.text for chunk in stream]
    assert [] == texts
    assert time.monotonic() - started < 1.5
    assert left.wait(3)


def test_connect_bounds_the_wait_for_the_response_head(
    silent_server: str, transport: BaseTransport
) -> None:
    """`connect` covers the response head, as documented (the socket wait used `ttft`)."""
    client = holysheep.Client(
        api_key="k",
        base_url=silent_server,
        transport=transport,
        retry=RetryPolicy.none(),
        timeout=Timeouts(connect=0.3, ttft=5),
    )
    started = time.monotonic()
    with pytest.raises(holysheep.ConnectTimeoutError, match="no connection or response head"):
        client.chat.complete(model="m", messages=MESSAGES)
    assert time.monotonic() - started < 2
    client.close()


@contextlib.contextmanager
def _unanswered_handshakes() -> Iterator[str]:
    """A base URL whose TCP handshake never completes: the listener's accept queue is full, so
    further SYNs are dropped."""
    with socket.socket() as listener, contextlib.ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        for _ in range(4):
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"


@pytest.mark.parametrize(
    ("timeouts", "error"),
    [
        (Timeouts(connect=3, ttft=0.3), holysheep.FirstTokenTimeoutError),
        (Timeouts(connect=3, total=0.4), holysheep.TotalTimeoutError),
    ],
)
def test_ttft_and_total_bound_a_connection_slow_to_be_made(
    transport: BaseTransport, timeouts: Timeouts, error: type[holysheep.APITimeoutError]
) -> None:
    """The sync client cannot cut a send short, so the transport's connect must not outlast
    `ttft` or `total` (it waited the whole `connect`, 3 s here, then named the shorter one)."""
    with _unanswered_handshakes() as url:
        client = holysheep.Client(
            api_key="k",
            base_url=url,
            transport=transport,
            retry=RetryPolicy.none(),
            timeout=timeouts,
        )
        started = time.monotonic()
        with pytest.raises(error) as caught:
            client.chat.complete(model="m", messages=MESSAGES)
        waited = time.monotonic() - started
    assert waited < 1.5
    assert caught.value.elapsed == pytest.approx(waited, abs=0.2)


class NeverConnects(BaseTransport):
    """A transport whose connect times out, as its library would tell it."""

    def send(self, request: Request) -> Response:
        limit = request.timeouts.connect or 0
        time.sleep(limit)
        raise holysheep.ConnectTimeoutError("no connection", limit=limit, elapsed=limit)


class AsyncNeverConnects(AsyncBaseTransport):
    """One that never gives up on its own: the client's deadline cuts it short."""

    async def send(self, request: Request) -> AsyncResponse:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


NO_CONNECTION = (
    r"^connect timeout: no connection to http://127\.0\.0\.1:9/v1/chat/completions within 0\.2 s"
)


def test_a_connect_timeout_says_no_connection_was_made() -> None:
    """When the transport's own connect timeout fired, the error says so: "no response head"
    suggested the server took the request and never answered."""
    client = holysheep.Client(
        api_key="k",
        base_url="http://127.0.0.1:9/v1",
        transport=NeverConnects(),
        retry=RetryPolicy.none(),
        timeout=Timeouts(connect=0.2),
    )
    with pytest.raises(holysheep.ConnectTimeoutError, match=NO_CONNECTION) as caught:
        client.chat.complete(model="m", messages=MESSAGES)
    assert ("connect", 0.2) == (caught.value.timeout, caught.value.limit)
    assert caught.value.request_id is not None


@pytest.mark.anyio
async def test_async_a_connect_timeout_cut_by_the_client_claims_no_connection() -> None:
    """The client's own deadline cannot tell whether a connection was made, and says so."""
    async with holysheep.AsyncClient(
        api_key="k",
        base_url="http://127.0.0.1:9/v1",
        transport=AsyncNeverConnects(),
        retry=RetryPolicy.none(),
        timeout=Timeouts(connect=0.2),
    ) as client:
        with pytest.raises(holysheep.ConnectTimeoutError) as caught:
            await client.chat.complete(model="m", messages=MESSAGES)
        assert str(caught.value).startswith(
            "connect timeout: no connection or response head within 0.2 s"
        )


def urllib3_example() -> BaseTransport:
    """The custom transport of examples/urllib3_transport.py, as a user would write it."""
    example = Path(__file__).resolve().parent.parent / "examples" / "urllib3_transport.py"
    transport: BaseTransport = runpy.run_path(str(example))["Urllib3Transport"]()
    return transport


def test_the_urllib3_example_bounds_the_wait_for_the_response_head(silent_server: str) -> None:
    """The example waits for the head only as long as `head_timeout()` says, so `connect`
    ends a request the server never answers (its socket wait used to be the backstop)."""
    client = holysheep.Client(
        api_key="k",
        base_url=silent_server,
        transport=urllib3_example(),
        retry=RetryPolicy.none(),
        timeout=Timeouts(connect=0.3, ttft=1, idle=1, total=1),
    )
    started = time.monotonic()
    with pytest.raises(holysheep.ConnectTimeoutError, match="no connection or response head"):
        client.chat.complete(model="m", messages=MESSAGES)
    assert time.monotonic() - started < 2
    client.close()


def test_the_urllib3_example_waits_for_slow_tokens_past_the_head_timeout() -> None:
    """Once the head is in, the socket waits up to the backstop: tokens 0.5 s apart stream
    although the head had to come within 0.35 s."""
    with serve(tokens=3, tokens_per_s=2) as upstream:
        client = holysheep.Client(
            api_key="k",
            base_url=upstream.base_url,
            transport=urllib3_example(),
            retry=RetryPolicy.none(),
            timeout=Timeouts(connect=0.3, idle=2),
        )
        completion = client.chat.complete(model="m", messages=MESSAGES)
        client.close()
    assert "".join(UpstreamConfig(tokens=3).token_list(None)) == completion.text


def test_the_urllib3_example_translates_a_connect_timeout() -> None:
    """A listener whose accept queue is full never completes the handshake: the example
    raises holysheep's ConnectTimeoutError, as the built-in transports do."""
    transport = urllib3_example()
    with socket.socket() as listener, contextlib.ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/chat/completions"
        for _ in range(4):  # fill the accept queue; further SYNs are dropped
            filler = fillers.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
        request = holysheep.Request("POST", url, (), b"{}", Timeouts(connect=0.3))
        started = time.monotonic()
        with pytest.raises(holysheep.ConnectTimeoutError, match=r"within 0\.3 s"):
            transport.send(request)
    assert time.monotonic() - started < 2
    transport.close()


_CLOSE_DELIMITED_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
)


@contextlib.contextmanager
def _stalled_after(sent: bytes) -> Iterator[tuple[str, threading.Event]]:
    """A server on 127.0.0.1 that sends `sent`, then nothing until the client leaves (the event
    is set) or the test ends."""
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        conn.sendall(sent)
        if _gone(conn, stop):
            raise ConnectionResetError("the client left")

    with _one_connection(handle) as served:
        try:
            yield served
        finally:
            stop.set()


def test_the_urllib3_example_waits_for_slow_tokens_on_a_close_delimited_body() -> None:
    """A body that ends when the server closes (no length, no chunking) gets the backstop
    too: a first token 1 s after a head due within 0.35 s arrives (the example looked for the
    socket on the connection, which http.client empties then, and failed at 0.35 s)."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(_CLOSE_DELIMITED_HEAD)
        time.sleep(1)
        conn.sendall(b"".join(sse_body("late", " but fine")))

    with _one_connection(handle) as (url, _):
        client = holysheep.Client(
            api_key="k",
            base_url=url,
            transport=urllib3_example(),
            retry=RetryPolicy.none(),
            timeout=Timeouts(connect=0.3, ttft=5),
        )
        completion = client.chat.complete(model="m", messages=MESSAGES)
        client.close()
    assert "late but fine" == completion.text


def test_the_urllib3_example_idle_timeout_wakes_a_close_delimited_read() -> None:
    """`interrupt` reaches the socket of a close-delimited body, so the idle timeout ends a
    stall on time and the server sees the client leave (the read waited out the 3 s head
    timeout, or the server)."""
    sent = _CLOSE_DELIMITED_HEAD + b"".join(sse_body("Hello")[:2])
    with _stalled_after(sent) as (url, left):
        client = holysheep.Client(
            api_key="k",
            base_url=url,
            transport=urllib3_example(),
            retry=RetryPolicy.none(),
            timeout=Timeouts(connect=3, idle=0.3),
        )
        started = time.monotonic()
        with (
            pytest.raises(IdleTimeoutError),
            client.chat.stream(model="m", messages=MESSAGES) as stream,
        ):
            for _ in stream:
                pass
        elapsed = time.monotonic() - started
        assert left.wait(1)
        client.close()
    assert elapsed < 1.5


def test_the_urllib3_example_close_from_another_thread_ends_a_blocked_read() -> None:
    """`Response.close()` while another thread reads returns at once and the read ends with
    APIConnectionError (close waited for the server's next bytes, and the read then raised a
    raw AttributeError)."""
    transport = urllib3_example()
    with _stalled_after(_SSE_HEAD + _chunk({"choices": []})) as (url, left):
        timeouts = Timeouts(connect=1, ttft=1, idle=1, total=1)  # a 6 s backstop
        response = transport.send(holysheep.Request("POST", url, (), b"{}", timeouts))
        failures: list[BaseException] = []

        def read() -> None:
            try:
                for _ in response.stream:
                    pass
            except Exception as exc:
                failures.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.2)  # the reader is blocked in recv()
        started = time.monotonic()
        response.close()
        closing = time.monotonic() - started
        reader.join(5)
        assert left.wait(1)
    transport.close()
    assert closing < 0.5
    assert [APIConnectionError] == [type(failure) for failure in failures]


def test_the_urllib3_example_read_after_close_is_a_connection_error() -> None:
    """A read that starts after `close()` (from another thread, between two reads) raises
    APIConnectionError, not the raw AttributeError of a closed http.client response."""
    transport = urllib3_example()
    with _stalled_after(_SSE_HEAD + _chunk({"choices": []}) * 2) as (url, _):
        response = transport.send(holysheep.Request("POST", url, (), b"{}", Timeouts()))
        next(response.stream)
        response.close()
        with pytest.raises(APIConnectionError, match="stream broke"):
            next(response.stream)
    transport.close()


def test_the_urllib3_example_translates_a_header_it_cannot_send(silent_server: str) -> None:
    """A header value with CRLF, which urllib3 refuses with a ValueError, is an
    APIConnectionError like every other failure to send."""
    transport = urllib3_example()
    request = holysheep.Request("POST", silent_server, (("x-bad", "a\r\nb"),), b"{}", Timeouts())
    with pytest.raises(APIConnectionError, match="Invalid header value"):
        transport.send(request)
    transport.close()


def test_the_urllib3_example_says_a_refused_connection_was_never_made() -> None:
    """A refused connection is a ConnectError, as in the built-in transports, so a rate
    limiter gives back what the attempt reserved."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}/v1/chat/completions"
    transport = urllib3_example()
    with pytest.raises(holysheep.ConnectError, match="could not connect"):
        transport.send(holysheep.Request("POST", url, (), b"{}", Timeouts(connect=1)))
    transport.close()


def test_a_closed_client_keeps_timing_open_streams_and_refuses_new_ones(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    client = client_for(upstream, transport, timeout=Timeouts(idle=0.3))
    behaviour = config(fault="stall@3")
    with client.chat.stream(model="m", messages=MESSAGES, extra_headers=behaviour) as stream:
        chunks = iter(stream)
        next(chunks)
        client.close()  # used to stop the watchdog for good: the stall then hung forever
        started = time.monotonic()
        # requests leaves a connection in use open, and the idle timeout ends the stall;
        # httpx closes it with the pool.
        with pytest.raises((IdleTimeoutError, IncompleteStreamError)):
            for _ in chunks:
                pass
        assert time.monotonic() - started < 2
    with pytest.raises(holysheep.LocalProtocolError, match="closed"):
        client.chat.stream(model="m", messages=MESSAGES)


def test_response_headers_and_reprs(upstream: MockUpstream, transport: BaseTransport) -> None:
    """A stream shows its response headers (rate-limit headers live there) and says in its
    repr which request it is and where it stands."""
    client = client_for(upstream, transport)
    stream = client.chat.stream(model="m", messages=MESSAGES, request_id="rid-1")
    assert ({}, "<Stream request_id='rid-1' attempts=0 not sent>") == (
        dict(stream.response_headers),
        repr(stream),
    )
    with stream:
        assert "text/event-stream" == stream.response_headers["content-type"]
        server_id = stream.response_headers["x-request-id"]
        assert f"<Stream request_id={server_id!r} attempts=1 open>" == repr(stream)
        stream.until_done()
    assert f"<Stream request_id={server_id!r} attempts=1 ended>" == repr(stream)
    name = type(transport).__name__
    assert f"<Client base_url={upstream.base_url!r} transport={name}>" == repr(client)
    client.close()
    assert repr(client).endswith(" closed>")


@pytest.mark.anyio
async def test_async_response_headers_and_reprs(upstream: MockUpstream) -> None:
    """The async twins say the same."""
    async with holysheep.AsyncClient(api_key="k", base_url=upstream.base_url) as client:
        stream = client.chat.stream(model="m", messages=MESSAGES)
        async with stream:
            assert "text/event-stream" == stream.response_headers["content-type"]
            await stream.aclose()
        assert repr(stream).endswith(" attempts=1 closed>")
        assert f"<AsyncClient base_url={upstream.base_url!r} transport=AsyncHTTPXTransport>" == (
            repr(client)
        )


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_clients_dropped_unclosed_leave_no_thread_or_socket(upstream: MockUpstream) -> None:
    """A client the garbage collector takes without `close()` ends its watchdog thread, and
    the thread keeps no stream (nor its transport's socket) alive."""
    for _ in range(3):  # warm up: what is made once per process is not a leak
        holysheep.Client(api_key="k", base_url=upstream.base_url).chat.complete(
            model="m", messages=MESSAGES
        )
    gc.collect()
    threads, fds = threading.active_count(), _fds()
    for _ in range(20):
        holysheep.Client(api_key="k", base_url=upstream.base_url).chat.complete(
            model="m", messages=MESSAGES
        )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        gc.collect()
        if threading.active_count() <= threads and _fds() <= fds:
            break
        time.sleep(0.05)
    grown = (max(0, threading.active_count() - threads), max(0, _fds() - fds))
    assert (0, 0) == grown  # was (20, 20): a thread and a socket per client


def test_a_stream_outliving_its_unclosed_client_keeps_its_timeouts(
    upstream: MockUpstream, transport: BaseTransport
) -> None:
    """`Client(...).chat.stream(...)`: the client can be collected while its stream is read,
    and the stream's idle timeout still fires."""
    client = client_for(upstream, transport, timeout=Timeouts(idle=0.3))
    stream = client.chat.stream(model="m", messages=MESSAGES, extra_headers=config(fault="stall@3"))
    gone = weakref.ref(client)
    del client
    gc.collect()  # the client is gone; its watchdog was told to stop once streams end
    assert gone() is None
    started = time.monotonic()
    with stream, pytest.raises((IdleTimeoutError, IncompleteStreamError)):
        for _ in stream:
            pass
    assert time.monotonic() - started < 2


@pytest.mark.anyio
async def test_a_closed_async_client_refuses_new_streams(upstream: MockUpstream) -> None:
    client = holysheep.AsyncClient(api_key="k", base_url=upstream.base_url)
    await client.aclose()
    with pytest.raises(holysheep.LocalProtocolError, match="closed"):
        client.chat.stream(model="m", messages=MESSAGES)


def _finish_then_break(conn: socket.socket) -> None:
    """Every token, the finish and the usage, then the connection breaks before `[DONE]` (no
    last HTTP chunk): a proxy cutting the stream short."""
    choice = {"index": 0, "finish_reason": None}
    conn.sendall(
        _SSE_HEAD
        + _chunk({"choices": [{**choice, "delta": {"role": "assistant", "content": "Hi"}}]})
        + _chunk({"choices": [{**choice, "delta": {"content": " there"}}]})
        + _chunk({"choices": [{**choice, "delta": {}, "finish_reason": "stop"}]})
        + _chunk({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    )
    conn.shutdown(socket.SHUT_RDWR)


def test_a_break_after_the_finish_loses_nothing(transport: BaseTransport) -> None:
    """A clean end of the body there is accepted (a `finish_reason` is enough); a broken
    connection at the same point raised StreamInterruptedError for a complete answer."""
    with _one_connection(_finish_then_break) as (url, _):
        client = holysheep.Client(
            api_key="k", base_url=url, transport=transport, retry=RetryPolicy.none()
        )
        completion = client.chat.complete(model="m", messages=MESSAGES)
        client.close()
    assert ("Hi there", "stop", 2) == (
        completion.text,
        completion.finish_reason,
        completion.usage and completion.usage.completion_tokens,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["httpx", "aiohttp"])
async def test_async_a_break_after_the_finish_loses_nothing(kind: str, anyio_backend: str) -> None:
    with _one_connection(_finish_then_break) as (url, _):
        async with _async_client(url, kind, anyio_backend, retry=RetryPolicy.none()) as client:
            completion = await client.chat.complete(model="m", messages=MESSAGES)
    assert ("Hi there", "stop") == (completion.text, completion.finish_reason)


def _finish_then_half_an_event() -> MockResponse:
    """Content, the finish, then the first bytes of the next event (the usage) and a clean
    end of the body."""
    events = sse_body("Hi", " there")
    return MockResponse(chunks=[*events[:4], b'data: {"choices": [], "usage": {"prompt_'])


def test_a_body_that_ends_inside_an_event_after_the_finish_is_incomplete() -> None:
    """chat.md: a stream cut inside an event after the finish is incomplete, at a clean end
    of the body as at a break. The clients took it as complete when the body ended there:
    the accumulator's `close()` raised, and asking again whether the answer was complete
    closed it a second time, which returns quietly."""
    client = holysheep.Client(
        api_key="k",
        transport=MockTransport([_finish_then_half_an_event()]),
        retry=RetryPolicy.none(),
    )
    with pytest.raises(StreamInterruptedError, match="middle of an event") as info:
        client.chat.complete(model="m", messages=MESSAGES)
    client.close()
    assert info.value.completion is not None
    assert ("Hi there", "stop") == (info.value.completion.text, info.value.completion.finish_reason)


@pytest.mark.anyio
async def test_async_a_body_that_ends_inside_an_event_after_the_finish_is_incomplete() -> None:
    transport = AsyncMockTransport([_finish_then_half_an_event()])
    async with holysheep.AsyncClient(
        api_key="k", transport=transport, retry=RetryPolicy.none()
    ) as client:
        with pytest.raises(StreamInterruptedError, match="middle of an event") as info:
            await client.chat.complete(model="m", messages=MESSAGES)
    assert info.value.completion is not None
    assert "Hi there" == info.value.completion.text


def _one_choice_finished_then_break(conn: socket.socket) -> None:
    """Two choices (`n=2`): choice 0 finishes, then the connection breaks in the middle of
    choice 1."""
    conn.sendall(
        _SSE_HEAD
        + _chunk(
            {
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": "Yes."}},
                    {"index": 1, "delta": {"role": "assistant", "content": "Well, it "}},
                ]
            }
        )
        + _chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        + _chunk({"choices": [{"index": 1, "delta": {"content": "depends on"}}]})
    )
    conn.shutdown(socket.SHUT_RDWR)


_BOTH_CUT = [(0, "Yes.", "stop"), (1, "Well, it depends on", None)]


def test_a_break_before_every_choice_finished_is_an_interruption(
    transport: BaseTransport,
) -> None:
    """One choice's finish_reason is not the answer's: the break raises with both choices'
    text (the answer was returned as complete, choice 1 cut short)."""
    with _one_connection(_one_choice_finished_then_break) as (url, _):
        client = holysheep.Client(
            api_key="k", base_url=url, transport=transport, retry=RetryPolicy.none()
        )
        with pytest.raises(holysheep.StreamInterruptedError) as info:
            client.chat.complete(model="m", messages=MESSAGES, n=2)
        client.close()
    assert info.value.completion is not None
    assert _BOTH_CUT == [(c.index, c.text, c.finish_reason) for c in info.value.completion.choices]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["httpx", "aiohttp"])
async def test_async_a_break_before_every_choice_finished_is_an_interruption(
    kind: str, anyio_backend: str
) -> None:
    with _one_connection(_one_choice_finished_then_break) as (url, _):
        async with _async_client(url, kind, anyio_backend) as client:
            with pytest.raises(holysheep.StreamInterruptedError) as info:
                await client.chat.complete(model="m", messages=MESSAGES, n=2)
    assert info.value.completion is not None
    assert _BOTH_CUT == [(c.index, c.text, c.finish_reason) for c in info.value.completion.choices]


def _two_of_three_choices_then_break(conn: socket.socket) -> None:
    """`n=3` from a gateway that streams the choices one after another: choices 0 and 1
    finish, then the connection ends before choice 2 began."""
    conn.sendall(
        _SSE_HEAD
        + _chunk({"choices": [{"index": 0, "delta": {"content": "Yes."}}]})
        + _chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        + _chunk({"choices": [{"index": 1, "delta": {"content": "No."}}]})
        + _chunk({"choices": [{"index": 1, "delta": {}, "finish_reason": "stop"}]})
    )
    conn.shutdown(socket.SHUT_RDWR)


def test_a_break_before_every_choice_asked_for_began_is_an_interruption(
    transport: BaseTransport,
) -> None:
    """Two finished choices of the three asked for are not the answer: the break raises,
    keeping both (they were returned as the complete answer, choice 2 silently missing)."""
    with _one_connection(_two_of_three_choices_then_break) as (url, _):
        client = holysheep.Client(
            api_key="k", base_url=url, transport=transport, retry=RetryPolicy.none()
        )
        with pytest.raises(holysheep.StreamInterruptedError, match=r"kept: 7 chars") as info:
            client.chat.complete(model="m", messages=MESSAGES, n=3)
        client.close()
    assert info.value.completion is not None
    assert ["Yes.", "No."] == [c.text for c in info.value.completion.choices]


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["httpx", "aiohttp"])
async def test_async_a_break_before_every_choice_asked_for_began_is_an_interruption(
    kind: str, anyio_backend: str
) -> None:
    with _one_connection(_two_of_three_choices_then_break) as (url, _):
        async with _async_client(url, kind, anyio_backend) as client:
            with pytest.raises(holysheep.StreamInterruptedError, match=r"kept: 7 chars") as info:
                await client.chat.complete(model="m", messages=MESSAGES, n=3)
    assert info.value.completion is not None
    assert ["Yes.", "No."] == [c.text for c in info.value.completion.choices]


def _finish_then_stall(conn: socket.socket) -> None:
    """The answer and its finish_reason, then neither usage nor [DONE]: only keep-alive
    comments (which are no content, so `idle` runs on), until the client leaves."""
    conn.sendall(
        _SSE_HEAD
        + _chunk({"choices": [{"index": 0, "delta": {"content": "All said."}}]})
        + _chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    )
    comment = b": keep-alive\n\n"
    for _ in range(60):
        time.sleep(0.05)
        conn.sendall(b"%x\r\n%s\r\n" % (len(comment), comment))


def test_a_stall_after_the_finish_ends_the_stream_complete(transport: BaseTransport) -> None:
    """Every choice finished, then the gateway sends no usage and no [DONE]: when `idle`
    runs out the answer is complete (it was an IdleTimeoutError holding the whole answer),
    as at a break in the same place, and the connection is closed."""
    with _one_connection(_finish_then_stall) as (url, left):
        client = holysheep.Client(
            api_key="k",
            base_url=url,
            transport=transport,
            retry=RetryPolicy.none(),
            timeout=Timeouts(idle=0.2),
        )
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            texts = [chunk.text for chunk in stream]
        assert left.wait(2)
        client.close()
    assert ("All said.", "stop", None) == (
        "".join(texts),
        stream.completion.finish_reason,
        stream.completion.usage,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["httpx", "aiohttp"])
async def test_async_a_stall_after_the_finish_ends_the_stream_complete(
    kind: str, anyio_backend: str
) -> None:
    with _one_connection(_finish_then_stall) as (url, left):
        async with _async_client(url, kind, anyio_backend, timeout=Timeouts(idle=0.2)) as client:
            completion = await client.chat.complete(model="m", messages=MESSAGES)
        assert await anyio.to_thread.run_sync(left.wait, 2)
    assert ("All said.", "stop") == (completion.text, completion.finish_reason)


def test_a_stall_after_the_finish_of_one_choice_of_two_is_a_timeout() -> None:
    """The rule needs every choice asked for finished: with `n=2` and one finished, a stall is
    the IdleTimeoutError it is, with the text kept."""

    def one_of_two(conn: socket.socket) -> None:
        conn.sendall(
            _SSE_HEAD + _chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        )
        time.sleep(1)

    with _one_connection(one_of_two) as (url, _):
        client = holysheep.Client(
            api_key="k", base_url=url, retry=RetryPolicy.none(), timeout=Timeouts(idle=0.2)
        )
        with pytest.raises(holysheep.IdleTimeoutError):
            client.chat.complete(model="m", messages=MESSAGES, n=2)
        client.close()


def _finished_then_overloaded_then_silence() -> list[MockResponse]:
    """The answer and its finish, then an in-band overloaded error instead of `[DONE]`
    (resumed); the resumed stream brings nothing new, only keep-alive comments."""
    events = [b"id: %d\n" % n + event for n, event in enumerate(sse_body("All said.")[:3], 1)]
    overloaded = b'event: error\ndata: {"error": {"type": "overloaded_error"}}\n\n'
    silence = MockResponse(chunks=[b": keep-alive\n\n"] * 40, delay=0.05)
    return [MockResponse(chunks=[*events, overloaded]), silence]


def _resuming(**options: Any) -> dict[str, Any]:
    policy = RetryPolicy(attempts=2, wait_initial=0, wait_max=0, wait_jitter=0)
    return {"api_key": "k", "retry": policy, "on_interrupt": "resume", **options}


def test_a_stall_on_resuming_a_finished_answer_ends_it_complete() -> None:
    """chat.md: after a finish_reason for every choice, a stall ends the stream complete, as a
    break does. On a resumed stream that brings nothing new the clock that runs out is `ttft`,
    not `idle`: it raised a StreamInterruptedError ("the resume failed") holding the whole
    answer, where a break at the same point ended it complete."""
    transport = MockTransport(_finished_then_overloaded_then_silence())
    client = holysheep.Client(transport=transport, **_resuming(timeout=Timeouts(ttft=0.2)))
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        texts = [chunk.text for chunk in stream]
    client.close()
    assert ("All said.", "stop", 2) == (
        "".join(texts),
        stream.completion.finish_reason,
        stream.stats.attempts,
    )
    assert "3" == transport.requests[1].header("last-event-id")


@pytest.mark.anyio
async def test_async_a_stall_on_resuming_a_finished_answer_ends_it_complete() -> None:
    transport = AsyncMockTransport(_finished_then_overloaded_then_silence())
    options = _resuming(timeout=Timeouts(ttft=0.2))
    async with holysheep.AsyncClient(transport=transport, **options) as client:
        completion = await client.chat.complete(model="m", messages=MESSAGES)
    assert ("All said.", "stop") == (completion.text, completion.finish_reason)


# -- an error in the same bytes as chunks before it -------------------------------------------


def _events_then_error() -> tuple[list[bytes], bytes]:
    import json

    def event(i: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        data = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"id: %d\ndata: %s\n\n" % (i, json.dumps(data).encode())

    events = [
        event(0, {"role": "assistant", "content": ""}),
        event(1, {"content": "Hello"}),
        event(2, {"content": " world"}),
        event(3, {"content": "!"}),
        event(4, {}, "stop"),
        b"data: [DONE]\n\n",
    ]
    return events, b'data: {"error": {"message": "Overloaded", "type": "overloaded_error"}}\n\n'


@pytest.mark.parametrize(
    "error",
    [
        b'data: {"error": {"message": "Flagged by the content filter", "type": "content_filter"}}'
        b"\n\n",
        b'event: error\ndata: {"message": "Flagged by the content filter"}\n\n',
    ],
    ids=["data", "event"],
)
def test_an_error_after_a_replay_is_not_skipped_as_replayed(error: bytes) -> None:
    """A server that ignores Last-Event-ID replays what was delivered, then sends a final
    error without an `id:` line, so it carries the last replayed id (WHATWG). It is the
    server's answer, not a replay: it is raised (it was skipped with the replay, and the
    early end that was left was resumed as a dropped link until the attempts ran out)."""
    events, _ = _events_then_error()
    seen: list[str | None] = []

    def answer(request: Any) -> MockResponse:
        seen.append(request.header("last-event-id"))
        if len(seen) == 1:
            return MockResponse(chunks=events[:3], fault="reset")
        return MockResponse(chunks=[*events[:3], error])  # from the start again

    client = holysheep.Client(
        api_key="k",
        transport=MockTransport(answer),
        retry=RetryPolicy(wait_initial=0.01, wait_jitter=0),
        on_interrupt="resume",
    )
    with pytest.raises(StreamError, match="content filter") as info:
        client.chat.complete(model="m", messages=MESSAGES)
    assert [None, "2"] == seen
    assert info.value.completion is not None
    assert "Hello world" == info.value.completion.text


def _error_in_the_read_of_world() -> Callable[[Any], MockResponse]:
    """A mock server whose first answer has " world" and an in-band error in one read, and
    which resumes from the `Last-Event-ID` it is sent."""
    events, error = _events_then_error()

    def answer(request: Any) -> MockResponse:
        last = request.header("last-event-id")
        if last is None:
            return MockResponse(chunks=[events[0], events[1], events[2] + error])
        return MockResponse(chunks=events[int(last) + 1 :])

    return answer


@pytest.mark.parametrize("on_interrupt", ["raise", "resume"])
def test_chunks_read_with_an_error_reach_the_caller_before_it(on_interrupt: str) -> None:
    """One read holds " world" and then an in-band error: the caller sees " world" before the
    error (it used to be in the completion only, and a resume skipped it as delivered)."""
    answer = _error_in_the_read_of_world()
    client = holysheep.Client(
        api_key="k",
        transport=MockTransport(answer),
        retry=RetryPolicy(wait_initial=0.01, wait_jitter=0),
        on_interrupt=on_interrupt,  # type: ignore[arg-type]
    )
    shown: list[str] = []
    failed: list[StreamError] = []
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        try:
            shown.extend(chunk.text for chunk in stream)
        except StreamError as exc:
            failed.append(exc)
    assert ("raise" == on_interrupt) == bool(failed)
    if failed:
        assert failed[0].completion is not None
        assert "Hello world" == failed[0].completion.text
    expected = "Hello world!" if on_interrupt == "resume" else "Hello world"
    assert expected == "".join(shown) == stream.completion.text


@pytest.mark.anyio
@pytest.mark.parametrize("on_interrupt", ["raise", "resume"])
async def test_async_chunks_read_with_an_error_reach_the_caller_before_it(
    on_interrupt: str,
) -> None:
    answer = _error_in_the_read_of_world()
    client = holysheep.AsyncClient(
        api_key="k",
        transport=AsyncMockTransport(answer),
        retry=RetryPolicy(wait_initial=0.01, wait_jitter=0),
        on_interrupt=on_interrupt,  # type: ignore[arg-type]
    )
    shown: list[str] = []
    async with client.chat.stream(model="m", messages=MESSAGES) as stream:
        try:
            async for chunk in stream:
                shown.append(chunk.text)
        except StreamError:
            assert "raise" == on_interrupt
    expected = "Hello world!" if on_interrupt == "resume" else "Hello world"
    assert expected == "".join(shown) == stream.completion.text


def test_stats_of_a_resumed_stream_cover_every_attempt(transport: BaseTransport) -> None:
    """The caller waited through both attempts: ttft runs from the first send, and events and
    bytes add up to those of a stream that never broke (they described the last attempt)."""
    with serve(ttft=0.3, event_ids=True) as upstream:
        client = client_for(
            upstream, transport, retry=RetryPolicy(wait_initial=0.01), on_interrupt="resume"
        )
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            stream.until_done()
        clean = stream.stats
        upstream.enqueue({"fault": "drop@5"})
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            stream.until_done()
        resumed = stream.stats
        client.close()
    assert EXPECTED == stream.completion.text
    assert (2, clean.events, clean.bytes) == (resumed.attempts, resumed.events, resumed.bytes)
    assert resumed.ttft is not None
    assert resumed.duration is not None
    assert 0.3 <= resumed.ttft < resumed.duration


@pytest.mark.parametrize("on_interrupt", ["raise", "restart"])
def test_stats_of_a_stream_that_fails_for_good_count_each_attempt_once(
    transport: BaseTransport, on_interrupt: str
) -> None:
    """A call that gives up keeps its last attempt as the current one: its events and bytes
    were counted twice, once with the attempts before it (12 events for the 6 that came)."""
    with serve() as upstream:
        client = client_for(
            upstream,
            transport,
            retry=RetryPolicy(attempts=3, wait_initial=0.01, wait_jitter=0),
            on_interrupt=on_interrupt,
        )
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            stream.until_done()
        clean = stream.stats
        upstream.enqueue(*[{"fault": "drop@4"}] * 3)
        chunks: list[ChatChunk] = []
        stream = client.chat.stream(model="m", messages=MESSAGES)
        with pytest.raises(StreamInterruptedError):
            _read_into(stream, chunks)
        client.close()
    attempts = 1 if on_interrupt == "raise" else 3
    stats = stream.stats
    assert attempts == stats.attempts
    assert len(chunks) == stats.events  # every chunk of every attempt, once
    # Each attempt got the same first bytes of the clean answer, and not all of them.
    assert 0 < stats.bytes < attempts * clean.bytes
    assert 0 == stats.bytes % attempts


def _read_into(stream: holysheep.Stream, chunks: list[ChatChunk]) -> None:
    """The chunks of `stream`, less the `Reset` markers of restarts, until it ends or fails."""
    with stream:
        chunks.extend(chunk for chunk in stream if chunk.reset is None)


async def _aread_into(stream: holysheep.AsyncStream, chunks: list[ChatChunk]) -> None:
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)  # one by one: a comprehension loses them to the error


def test_the_duration_of_a_stream_that_failed_before_its_body_stays_put(
    transport: BaseTransport,
) -> None:
    """Its end was never stamped: read later (logged in an `except` block), `duration` had
    grown with the wall clock, as if the failed request were still running."""
    with serve() as upstream:
        client = client_for(upstream, transport, retry=RetryPolicy(attempts=2, wait_initial=0.01))
        upstream.enqueue(*[{"fault": {"kind": "status", "status": 503}}] * 2)
        stream = client.chat.stream(model="m", messages=MESSAGES)
        with pytest.raises(holysheep.InternalServerError):
            for _ in stream:
                pass
        client.close()
    first = stream.stats.duration
    time.sleep(0.2)
    assert first is not None
    assert first == stream.stats.duration


async def test_async_stats_of_a_stream_that_failed_count_once_and_its_duration_stays(
    anyio_backend: str,
) -> None:
    """The async twin of the two tests above."""
    del anyio_backend
    with serve() as upstream:
        async with holysheep.AsyncClient(
            api_key="k", base_url=upstream.base_url, retry=RetryPolicy.none()
        ) as client:
            upstream.enqueue({"fault": "drop@4"})
            chunks: list[ChatChunk] = []
            stream = client.chat.stream(model="m", messages=MESSAGES)
            with pytest.raises(StreamInterruptedError):
                await _aread_into(stream, chunks)
            upstream.enqueue({"fault": {"kind": "status", "status": 400}})
            refused = client.chat.stream(model="m", messages=MESSAGES)
            with pytest.raises(holysheep.BadRequestError):
                async with refused:
                    pass
    assert len(chunks) == stream.stats.events
    first = refused.stats.duration
    await anyio.sleep(0.2)
    assert first is not None
    assert first == refused.stats.duration


# -- after [DONE] -------------------------------------------------------------------------------


@pytest.fixture
def lingering_server() -> Iterator[tuple[str, threading.Event]]:
    """Streams an answer and `[DONE]`, then keep-alive comments without ever ending the body;
    the event is set when the client has gone away."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(
            _SSE_HEAD
            + _chunk({"choices": [{"index": 0, "delta": {"content": "Hello"}}]})
            + _chunk({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            + _chunk("[DONE]")
        )
        for _ in range(200):  # 10 s of keep-alives, and no end of the body
            time.sleep(0.05)
            conn.sendall(b"e\r\n: keep-alive\n\n\r\n")

    with _one_connection(handle) as served:
        yield served


def test_a_body_that_lingers_after_done_is_closed_and_the_stream_ends_normally(
    lingering_server: tuple[str, threading.Event], transport: BaseTransport
) -> None:
    """`[DONE]` ends the answer: a server that keeps the body open after it (keep-alives) is
    closed on after `AFTER_DONE`, with no error (it used to be an idle timeout, a minute on)."""
    url, left = lingering_server
    client = holysheep.Client(
        api_key="k", base_url=url, transport=transport, timeout=Timeouts(idle=5)
    )
    started = time.monotonic()
    completion = client.chat.complete(model="m", messages=MESSAGES)
    assert ("Hello", "stop") == (completion.text, completion.finish_reason)
    assert time.monotonic() - started < 3
    assert left.wait(3)
    client.close()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["httpx", "aiohttp"])
async def test_async_a_body_that_lingers_after_done_is_closed_and_the_stream_ends_normally(
    lingering_server: tuple[str, threading.Event], kind: str, anyio_backend: str
) -> None:
    url, left = lingering_server
    async with _async_client(url, kind, anyio_backend, timeout=Timeouts(idle=5)) as client:
        started = anyio.current_time()
        completion = await client.chat.complete(model="m", messages=MESSAGES)
        assert ("Hello", "stop") == (completion.text, completion.finish_reason)
        assert anyio.current_time() - started < 3
    assert await anyio.to_thread.run_sync(left.wait, 3.0)


# -- the third review: edges of the fixes above -------------------------------------------------


@pytest.fixture
def head_after_connect_server() -> Iterator[str]:
    """Sends the response head 0.32 s after the request (just after a 0.3 s `connect`), then
    nothing more."""
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        time.sleep(0.32)
        conn.sendall(_SSE_HEAD)
        _gone(conn, stop)

    with _one_connection(handle) as (url, _):
        yield url
        stop.set()


def test_a_head_just_after_the_connect_deadline_still_times_out_promptly(
    head_after_connect_server: str, transport: BaseTransport
) -> None:
    """The watchdog gives up on the head at `connect`, the socket a little later: a head in
    between used to carry on unwatched, until the socket backstop (seconds, or half an hour
    with the defaults), and report the stale connect timeout for whatever came next."""
    client = holysheep.Client(
        api_key="k",
        base_url=head_after_connect_server,
        transport=transport,
        retry=RetryPolicy.none(),
        timeout=Timeouts(connect=0.3, ttft=0.6),
    )
    started = time.monotonic()
    with pytest.raises((holysheep.ConnectTimeoutError, FirstTokenTimeoutError)):
        client.chat.complete(model="m", messages=MESSAGES)
    assert time.monotonic() - started < 2
    client.close()


@pytest.mark.anyio
async def test_async_an_error_held_back_for_its_chunks_is_dropped_by_close() -> None:
    """close() on the last chunk before a held-back error: the stream ends quietly, as the
    sync one does (the error used to be raised after close())."""
    events, error = _events_then_error()
    client = holysheep.AsyncClient(
        api_key="k",
        transport=AsyncMockTransport([MockResponse(chunks=[events[0], events[1] + error])]),
        retry=RetryPolicy.none(),
    )
    shown: list[str] = []
    async with client.chat.stream(model="m", messages=MESSAGES) as stream:
        async for chunk in stream:
            shown.append(chunk.text)
            if chunk.text:
                stream.close()
    assert ["", "Hello"] == shown


@pytest.fixture
def big_error_server() -> Iterator[str]:
    """Answers 500 with a 200 KB body, more than the clients read of an error body."""
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        body = b'{"error": {"message": "' + b"x" * 200_000 + b'"}}'
        conn.sendall(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        _gone(conn, stop)

    with _one_connection(handle) as (url, _):
        yield url
        stop.set()


@pytest.mark.anyio
async def test_an_error_body_read_in_part_leaves_no_async_generator_behind(
    big_error_server: str,
) -> None:
    import gc

    async with holysheep.AsyncClient(
        api_key="k", base_url=big_error_server, retry=RetryPolicy.none()
    ) as client:
        with pytest.raises(InternalServerError):
            await client.chat.complete(model="m", messages=MESSAGES)
        gc.collect()
        await anyio.sleep(0.01)  # trio finalizes abandoned generators in a task


# Paced, so that the first read cannot hold the whole answer (it did now and then on a busy
# machine, and the answer read before `total` ran out was rightly handed over), and done long
# before the caller comes back.
_PACED_AWAY = {"tokens": 6, "tokens_per_s": 25}


def test_total_that_ran_out_while_the_caller_was_away_fires_when_it_returns(
    transport: BaseTransport,
) -> None:
    """idle lapses while the caller is away, but `total` counts the caller's time: it fires
    when the caller is back, even if the rest of the answer is there to read."""
    with serve(**_PACED_AWAY) as upstream:
        client = client_for(upstream, transport, timeout=Timeouts(idle=0.2, total=0.5))
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            chunks = iter(stream)
            next(chunks)
            time.sleep(1.0)
            with pytest.raises(TotalTimeoutError):
                for _ in chunks:
                    pass
        client.close()


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["httpx", "aiohttp"])
async def test_async_total_that_ran_out_while_the_caller_was_away_fires_when_it_returns(
    kind: str, anyio_backend: str
) -> None:
    with serve(**_PACED_AWAY) as upstream:
        async with (
            _async_client(
                upstream.base_url, kind, anyio_backend, timeout=Timeouts(idle=0.2, total=0.5)
            ) as client,
            client.chat.stream(model="m", messages=MESSAGES) as stream,
        ):
            await stream.__anext__()
            await anyio.sleep(1.0)
            with pytest.raises(TotalTimeoutError):
                async for _ in stream:
                    pass


def test_a_second_drop_before_any_new_event_id_resumes_from_the_same_place() -> None:
    """The resumed connection breaks before sending an event with an id: the next attempt
    resumes from where the first left off (it used to find no id and give up)."""
    events, _ = _events_then_error()
    seen: list[str | None] = []

    def answer(request: Any) -> MockResponse:
        last = request.header("last-event-id")
        seen.append(last)
        if last is None:
            return MockResponse(chunks=events[:2], fault="reset")
        if len(seen) == 2:
            return MockResponse(chunks=[], fault="reset")
        return MockResponse(chunks=events[int(last) + 1 :])

    client = holysheep.Client(
        api_key="k",
        transport=MockTransport(answer),
        retry=RetryPolicy(wait_initial=0.01, wait_jitter=0),
        on_interrupt="resume",
    )
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        text = "".join(chunk.text for chunk in stream)
    assert ([None, "1", "1"], "Hello world!") == (seen, text)
