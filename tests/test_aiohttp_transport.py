"""`AiohttpTransport` against a real HTTP server on 127.0.0.1 (holysheep.testing), on asyncio.

The same contract as the other transports: holysheep errors only, a closed unfinished body is
a disconnect the server sees, a finished one leaves its connection for the next stream. aiohttp
runs on asyncio only, so these tests do too, except the one proving trio gets a clear error.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import gc
import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest

import holysheep
from holysheep import (
    APIConnectionError,
    ConfigurationError,
    ConnectError,
    ConnectTimeoutError,
    IdleTimeoutError,
    IncompleteStreamError,
    InternalServerError,
    RateLimitError,
    RetryPolicy,
    Timeouts,
)
from holysheep._exchange import Exchange
from holysheep.testing import MockUpstream, UpstreamConfig, serve
from holysheep.transports import AiohttpTransport, AsyncResponse, Request

MESSAGES = [{"role": "user", "content": "Tell me about sheep."}]
EXPECTED = "".join(UpstreamConfig().token_list(None))


@pytest.fixture
def anyio_backend() -> str:
    """aiohttp is asyncio-only; `test_trio_gets_a_clear_error` overrides this."""
    return "asyncio"


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with serve() as server:
        yield server


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    async with AiohttpTransport() as chosen:
        yield chosen


def client_for(upstream: MockUpstream, transport: Any, **kwargs: Any) -> holysheep.AsyncClient:
    """A client that raises every failure as it happens (retries have their own tests)."""
    kwargs.setdefault("retry", RetryPolicy.none())
    return holysheep.AsyncClient(
        api_key="sk-test", base_url=upstream.base_url, transport=transport, **kwargs
    )


def config(**kwargs: Any) -> dict[str, str]:
    """Per-request server behaviour, sent as the X-Mock-Config header."""
    return {"x-mock-config": json.dumps(kwargs)}


async def disconnected(server: MockUpstream, count: int = 1) -> bool:
    return await anyio.to_thread.run_sync(server.wait_for_disconnect, 3.0, count)


# -- the happy path ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stream_yields_typed_chunks_and_the_completion(
    upstream: MockUpstream, transport: AiohttpTransport
) -> None:
    """`async with client.chat.stream(...)` / `async for` works the same as on httpx."""
    client = client_for(upstream, transport)
    async with client.chat.stream(model="gpt-4.1", messages=MESSAGES, request_id="rid-a") as s:
        texts = [chunk.text async for chunk in s]
    assert EXPECTED == "".join(texts) == s.completion.text
    assert ("stop", "gpt-4.1") == (s.completion.finish_reason, s.completion.model)
    assert s.completion.usage is not None
    assert (len(texts), 1) == (s.stats.events, s.stats.attempts)
    # Ours is sent; the upstream mints its own, as the API does, and the stream reports it.
    assert ("rid-a", s.request_id) == (s.stats.request_id, s.stats.server_request_id)
    assert s.request_id.startswith("req_")
    seen = upstream.requests[-1]
    assert ("Bearer sk-test", "identity", "rid-a") == (
        seen.headers["authorization"],
        seen.headers["accept-encoding"],
        seen.headers["x-request-id"],
    )
    assert EXPECTED == (await client.chat.complete(model="m", messages=MESSAGES)).text


@pytest.mark.anyio
async def test_sequential_streams_reuse_one_connection(transport: AiohttpTransport) -> None:
    """Keep-alive: ten finished streams, one connection."""
    with serve() as fresh:
        client = client_for(fresh, transport)
        for _ in range(10):
            assert EXPECTED == (await client.chat.complete(model="m", messages=MESSAGES)).text
        assert 1 == fresh.connections_opened


@pytest.mark.anyio
async def test_many_concurrent_streams_all_finish() -> None:
    """300 concurrent streams through one transport, past aiohttp's default limit of 100."""
    with serve(tokens=20, tokens_per_s=100) as server:
        async with client_for(server, AiohttpTransport()) as client:
            results: list[str] = []

            async def one() -> None:
                results.append((await client.chat.complete(model="m", messages=MESSAGES)).text)

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for _ in range(300):
                        tg.start_soon(one)
        assert 300 == len(results)
        assert {"".join(UpstreamConfig(tokens=20).token_list(None))} == set(results)
        assert server.connections_opened > 100  # no cap: they were open at once


@pytest.mark.anyio
async def test_max_connections_bounds_the_pool() -> None:
    """`max_connections=2`: six concurrent streams share two connections."""
    with serve(tokens=5, tokens_per_s=200) as server:
        async with (
            client_for(server, AiohttpTransport(max_connections=2)) as client,
            anyio.create_task_group() as tg,
        ):
            for _ in range(6):
                tg.start_soon(functools.partial(client.chat.complete, model="m", messages=[]))
        assert 2 == server.connections_opened


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_rate_limit_carries_status_retry_after_message_and_id(
    upstream: MockUpstream, transport: AiohttpTransport
) -> None:
    """A 429 with Retry-After is a RateLimitError with every detail filled in."""
    client = client_for(upstream, transport)
    fault = {"kind": "status", "status": 429, "retry_after": 3}
    with pytest.raises(RateLimitError) as info:
        await client.chat.complete(
            model="m",
            messages=MESSAGES,
            extra_headers=config(fault=fault, echo_request_id=True),
            request_id="rid-7",
        )
    assert (429, 3.0, "rid-7") == (
        info.value.status_code,
        info.value.retry_after,
        info.value.request_id,
    )
    assert "mock fault" in str(info.value)


@pytest.mark.anyio
async def test_server_error_is_internal_server_error(
    upstream: MockUpstream, transport: AiohttpTransport
) -> None:
    """A 500 is an InternalServerError naming the status."""
    client = client_for(upstream, transport)
    fault = {"kind": "status", "status": 500}
    with pytest.raises(InternalServerError, match="HTTP 500") as info:
        await client.chat.complete(model="m", messages=MESSAGES, extra_headers=config(fault=fault))
    assert 500 == info.value.status_code


@pytest.mark.anyio
async def test_error_responses_do_not_leak_connections(transport: AiohttpTransport) -> None:
    """100 rate-limited requests in a row, then a normal one, on at most two connections."""
    with serve(fault={"kind": "status", "status": 429}) as limited:
        client = client_for(limited, transport)
        for _ in range(100):
            with pytest.raises(RateLimitError):
                await client.chat.complete(model="m", messages=MESSAGES)
        limited.config = UpstreamConfig()
        assert EXPECTED == (await client.chat.complete(model="m", messages=MESSAGES)).text
        assert limited.connections_opened <= 2


@pytest.mark.anyio
async def test_dropped_connection_keeps_the_partial_text(
    upstream: MockUpstream, transport: AiohttpTransport
) -> None:
    """The server drops the connection after 5 tokens: exactly those 5 are kept."""
    client = client_for(upstream, transport)
    seen: list[str] = []

    async def read() -> None:
        async with client.chat.stream(
            model="m", messages=MESSAGES, extra_headers=config(fault="drop@5")
        ) as stream:
            async for chunk in stream:
                seen.append(chunk.text)

    with pytest.raises(IncompleteStreamError) as info:
        await read()
    five = "".join(UpstreamConfig().token_list(5))
    assert five == "".join(seen)
    assert info.value.completion is not None
    assert five == info.value.completion.text
    assert "the connection failed while reading the stream" in str(info.value)


@pytest.mark.anyio
async def test_connection_refused_is_a_connection_error(transport: AiohttpTransport) -> None:
    """Nothing listening: ConnectError (an APIConnectionError) naming the URL and our request
    id."""
    with serve() as gone:
        url = gone.base_url
    client = holysheep.AsyncClient(
        api_key="k", base_url=url, transport=transport, retry=RetryPolicy.none()
    )
    with pytest.raises(ConnectError, match="could not connect to") as info:
        await client.chat.complete(model="m", messages=MESSAGES, request_id="rid-x")
    assert "rid-x" == info.value.request_id
    assert (
        f"could not connect to {url}/chat/completions: [Errno {errno.ECONNREFUSED}] "
        f"{os.strerror(errno.ECONNREFUSED)}"
    ) == info.value.message  # asyncio's "Connect call failed" does not say refused


@pytest.mark.anyio
async def test_connect_timeout_is_a_connect_timeout_error(transport: AiohttpTransport) -> None:
    """A listener whose accept queue is full never completes the handshake: `connect` fires."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):  # fill the accept queue; further SYNs are dropped
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                filler.connect_ex(("127.0.0.1", port))
            client = holysheep.AsyncClient(
                api_key="k",
                base_url=f"http://127.0.0.1:{port}/v1",
                transport=transport,
                timeout=Timeouts(connect=0.3),
                retry=RetryPolicy.none(),
            )
            with anyio.fail_after(5), pytest.raises(ConnectTimeoutError, match=r"within 0\.3 s"):
                await client.chat.complete(model="m", messages=MESSAGES)
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.anyio
async def test_idle_timeout_cuts_the_read_and_the_connection(transport: AiohttpTransport) -> None:
    """A stall with keep-alives trips the client's `idle` timer; the server sees the client go."""
    with serve(fault="stall@4", keepalive_interval=0.05) as stalled:
        client = client_for(stalled, transport, timeout=Timeouts(idle=0.3))
        with anyio.fail_after(2), pytest.raises(IdleTimeoutError) as info:
            await client.chat.complete(model="m", messages=MESSAGES)
        assert info.value.completion is not None
        assert "".join(UpstreamConfig().token_list(4)) == info.value.completion.text
        assert await disconnected(stalled)


# -- stopping early: the server must see the client leave -------------------------------------


@pytest.mark.anyio
async def test_break_closes_the_connection(transport: AiohttpTransport) -> None:
    """`break` out of the loop: the server observes the disconnect."""
    with serve(tokens_per_s=200, tokens=400) as slow:
        client = client_for(slow, transport)
        async with client.chat.stream(model="m", messages=MESSAGES) as stream:
            async for chunk in stream:
                if chunk.text:
                    break
        assert stream.closed
        assert await disconnected(slow)
        # The dropped connection was not pooled: the next stream opens a fresh one.
        short = await client.chat.complete(model="m", messages=MESSAGES, max_tokens=3)
        assert ("length", 2) == (short.finish_reason, slow.connections_opened)


@pytest.mark.anyio
async def test_cancelling_the_task_closes_the_connection(transport: AiohttpTransport) -> None:
    """Cancel scope around a slow stream: the server sees the disconnect."""
    with serve(tokens_per_s=100, tokens=1000) as slow:
        client = client_for(slow, transport)
        received = 0
        with anyio.move_on_after(0.3):
            async with client.chat.stream(model="m", messages=MESSAGES) as stream:
                async for chunk in stream:
                    received += bool(chunk.text)
        assert 0 < received < 1000
        assert await disconnected(slow)


@pytest.mark.anyio
async def test_stream_close_from_another_task(transport: AiohttpTransport) -> None:
    """`stream.close()` from another task ends a stalled read at once, quietly."""
    with serve(fault="stall@2") as stalled:
        client = client_for(stalled, transport)
        async with (
            client.chat.stream(model="m", messages=MESSAGES) as stream,
            anyio.create_task_group() as tg,
        ):

            async def close_soon() -> None:
                await anyio.sleep(0.2)
                stream.close()

            tg.start_soon(close_soon)
            with anyio.fail_after(2):
                texts = [chunk.text async for chunk in stream]
        assert "".join(UpstreamConfig().token_list(2)) == "".join(texts)
        assert await disconnected(stalled)


@pytest.mark.anyio
async def test_response_aclose_from_another_task_ends_a_blocked_read(
    transport: AiohttpTransport,
) -> None:
    """The transport contract itself: `aclose()` wakes a read blocked in another task."""
    with serve(fault="stall@1") as stalled:
        request = Request(
            "POST",
            stalled.base_url + "/chat/completions",
            (("content-type", "application/json"), ("accept-encoding", "identity")),
            json.dumps({"model": "m", "messages": MESSAGES, "stream": True}).encode(),
        )
        response: AsyncResponse = await transport.send(request)
        assert 200 == response.status_code
        assert response.headers["content-type"].startswith("text/event-stream")
        got: list[bytes] = []
        failures: list[Exception] = []

        async def read_all() -> None:
            try:
                async for data in response.stream:
                    got.append(data)
            except APIConnectionError as exc:
                failures.append(exc)

        with anyio.fail_after(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_all)
                await anyio.sleep(0.2)
                await response.aclose()
        assert 1 == len(failures)
        assert "the connection failed while reading the stream" in str(failures[0])
        assert b"data: " in b"".join(got)
        assert await disconnected(stalled)


# -- setup and environment --------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_session_is_made_lazily_and_closed_by_aclose(upstream: MockUpstream) -> None:
    """No session before the first request; `aclose()` closes it; a closed transport refuses."""
    transport = AiohttpTransport()
    assert transport.session is None
    async with client_for(upstream, transport) as client:
        await client.chat.complete(model="m", messages=MESSAGES)
        session = transport.session
        assert session is not None
        assert not session.closed
        assert session.timeout.total is None  # aiohttp's 300 s default would cut long streams
    assert session.closed
    with pytest.raises(holysheep.LocalProtocolError, match="closed"):
        await client.chat.complete(model="m", messages=MESSAGES)


@pytest.mark.anyio
async def test_closing_the_client_ends_a_read_blocked_in_another_task() -> None:
    """aiohttp's own close leaves a blocked `readany()` waiting (until the idle timeout, a
    minute by default); the transport closes what it has open, so the reader fails at once,
    with the text so far, and the server sees it leave."""
    with serve(tokens_per_s=20) as upstream:
        client = client_for(upstream, AiohttpTransport())
        failure: list[BaseException] = []

        async def reader() -> None:
            try:
                async with client.chat.stream(model="m", messages=MESSAGES) as stream:
                    async for _ in stream:
                        pass
            except holysheep.HolySheepError as exc:
                failure.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(reader)
            await anyio.sleep(0.3)
            await client.aclose()
            with anyio.fail_after(2):
                while not failure:
                    await anyio.sleep(0.01)
        assert isinstance(failure[0], IncompleteStreamError)
        assert failure[0].completion is not None
        assert failure[0].completion.text
        assert EXPECTED.startswith(failure[0].completion.text)
        assert await disconnected(upstream)


@pytest.mark.anyio
async def test_a_session_passed_in_is_used_and_left_open(upstream: MockUpstream) -> None:
    """Your own `aiohttp.ClientSession` carries the requests and stays yours to close."""
    import aiohttp

    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with client_for(upstream, AiohttpTransport(session)) as client:
            assert EXPECTED == (await client.chat.complete(model="m", messages=MESSAGES)).text
        assert not session.closed


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.anyio
async def test_trio_gets_a_clear_error(upstream: MockUpstream) -> None:
    """aiohttp cannot run on trio: `send` says so and names the transport that can."""
    async with client_for(upstream, AiohttpTransport()) as client:
        with pytest.raises(ConfigurationError, match=r"asyncio only.*trio.*AsyncHTTPXTransport"):
            await client.chat.complete(model="m", messages=MESSAGES)


def test_one_client_on_a_second_event_loop_is_a_clear_error(upstream: MockUpstream) -> None:
    """A client kept across two `asyncio.run()` calls failed on the second with aiohttp's
    "Event loop is closed"; it now says what is wrong and what to do."""
    client = holysheep.AsyncClient(
        api_key="k", base_url=upstream.base_url, transport=AiohttpTransport()
    )

    async def ask() -> str:
        return (await client.chat.complete(model="m", messages=MESSAGES)).text

    first = asyncio.new_event_loop()
    try:
        assert EXPECTED == first.run_until_complete(ask())
        with pytest.raises(ConfigurationError, match=r"one AsyncClient .* per event loop"):
            asyncio.run(ask())
        first.run_until_complete(client.aclose())
    finally:
        first.close()


def test_the_package_imports_without_aiohttp() -> None:
    """Only asking for `AiohttpTransport` needs aiohttp, and the error names the extra."""
    code = (
        "import sys; sys.modules['aiohttp'] = None\n"
        "import holysheep, holysheep.transports as t\n"
        "from holysheep.transports import AsyncHTTPXTransport\n"
        "try:\n"
        "    t.AiohttpTransport\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "pip install 'holysheep[aiohttp]'" in result.stdout


def test_unknown_names_are_still_attribute_errors() -> None:
    """The lazy export does not swallow typos."""
    import holysheep.transports

    with pytest.raises(AttributeError, match="NoSuchTransport"):
        holysheep.transports.NoSuchTransport  # type: ignore[attr-defined]  # noqa: B018


def test_closing_after_the_event_loop_ended_says_what_to_do(upstream: MockUpstream) -> None:
    """As the httpx transport: `aclose()` in a new loop cannot close the ended loop's
    connections, and says so (it returned quietly and stranded them)."""

    def use_then_close_elsewhere() -> str:
        client = holysheep.AsyncClient(
            api_key="k", base_url=upstream.base_url, transport=AiohttpTransport()
        )
        first = asyncio.new_event_loop()
        first.run_until_complete(client.chat.complete(model="m", messages=[]))
        first.close()
        try:
            asyncio.run(client.aclose())
        except holysheep.ConfigurationError as exc:
            return str(exc)
        return "no error"

    message = use_then_close_elsewhere()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the stranded sockets
        gc.collect()
    assert message.startswith(
        "AiohttpTransport's connections belong to an event loop that has ended"
    )


@pytest.mark.anyio
async def test_a_body_dropped_unclosed_is_not_kept(upstream: MockUpstream) -> None:
    """The transport kept every unfinished body it handed out until `aclose()`, so each stream
    dropped unclosed stayed in memory (aiohttp itself lets go of it at the end of the body)."""
    request = Exchange(
        url=upstream.base_url + "/chat/completions", api_key="k", body=b"{}", timeouts=Timeouts()
    ).request
    async with AiohttpTransport() as transport:
        for _ in range(3):
            await transport.send(request)  # ...and dropped
        gc.collect()
        assert 0 == len(transport._open)
