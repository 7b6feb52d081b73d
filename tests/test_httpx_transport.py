"""The httpx transports build their requests without `build_request` where they can; what goes
on the wire must be what `build_request` would have sent, for every kind of httpx client."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import string
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import holysheep
from holysheep import RetryPolicy
from holysheep._exchange import Exchange, Request, Timeouts
from holysheep.testing import MockUpstream, serve
from holysheep.transports import AsyncHTTPXTransport, HTTPXTransport, _httpcore_body
from holysheep.transports._base import BodyDecoder
from holysheep.transports._httpx import _build

MESSAGES = [{"role": "user", "content": "Tell me about sheep."}]
URL = "http://127.0.0.1:8000/v1/chat/completions"


def request(url: str = URL, headers: dict[str, str] | None = None) -> Request:
    return Exchange(
        url=url, api_key="sk-test", body=b'{"model":"m"}', timeouts=Timeouts(), headers=headers
    ).request


def built_by_httpx(client: httpx.Client | httpx.AsyncClient, sent: Request) -> httpx.Request:
    """What `build_request` makes of `sent`, with the timeouts `Timeouts()` sends."""
    return client.build_request(
        sent.method,
        sent.url,
        headers=sent.headers,
        content=sent.content,
        timeout=httpx.Timeout(10.05),  # `head_timeout()`: connect, write and pool too
    )


def assert_same(built: httpx.Request, expected: httpx.Request) -> None:
    assert (expected.method, expected.url, expected.headers.raw, expected.extensions) == (
        built.method,
        built.url,
        built.headers.raw,
        built.extensions,
    )
    assert expected.read() == built.read()


@pytest.mark.parametrize(
    "client",
    [
        httpx.Client(),
        httpx.Client(headers={"X-Org": "sheep", "Accept": "application/json"}),
        httpx.Client(cookies={"session": "abc"}),  # cookies: httpx's own path
        httpx.Client(params={"api-version": "2"}),  # query parameters: likewise
        httpx.Client(headers={"X-Name": "Zoë".encode()}),  # not ASCII: likewise
        httpx.AsyncClient(base_url="http://127.0.0.1:8000/v1/"),
    ],
    ids=["default", "headers", "cookies", "params", "non-ascii", "async-base-url"],
)
def test_requests_are_what_build_request_makes(client: httpx.Client | httpx.AsyncClient) -> None:
    sent = request(headers={"Accept": "text/event-stream", "X-Extra": "1"})
    expected = built_by_httpx(client, sent)
    urls: dict[str, httpx.URL] = {}
    assert_same(_build(client, sent, urls), expected)
    assert_same(_build(client, sent, urls), expected)  # again, from the parsed URL kept


def test_a_relative_url_is_joined_to_the_clients_base_url() -> None:
    client = httpx.Client(base_url="http://127.0.0.1:8000/v1/")
    sent = request(url="chat/completions")
    built = _build(client, sent, {})
    assert "http://127.0.0.1:8000/v1/chat/completions" == str(built.url)


_token = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=12)
_value = st.text(alphabet=string.ascii_letters + string.digits + " -_/.;=", max_size=20).map(
    str.strip
)


@given(
    defaults=st.lists(st.tuples(_token, _value), max_size=6),
    ours=st.dictionaries(_token, _value, max_size=6),
)
def test_any_headers_merge_as_httpx_merges_them(
    defaults: list[tuple[str, str]], ours: dict[str, str]
) -> None:
    """The client's headers, minus those the request replaces (any case), then the request's."""
    client = httpx.Client(headers=httpx.Headers(defaults))
    sent = request(headers=ours)
    expected = built_by_httpx(client, sent)
    assert_same(_build(client, sent, {}), expected)


# -- on the wire -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with serve(tokens=3) as server:
        yield server


def test_a_users_client_sends_its_headers_and_cookies(upstream: MockUpstream) -> None:
    own = httpx.Client(headers={"X-Org": "sheep"}, cookies={"session": "abc"})
    transport = HTTPXTransport(own)
    client = holysheep.Client(
        api_key="sk-test", base_url=upstream.base_url, transport=transport, retry=RetryPolicy.none()
    )
    for _ in range(2):
        client.chat.complete(model="m", messages=MESSAGES)
        seen = upstream.requests[-1].headers
        assert ("sheep", "session=abc", "Bearer sk-test") == (
            seen["x-org"],
            seen["cookie"],
            seen["authorization"],
        )
    own.close()


@pytest.mark.anyio
async def test_the_async_transport_sends_what_the_client_sets(upstream: MockUpstream) -> None:
    transport = AsyncHTTPXTransport()
    transport.client.headers["X-Org"] = "sheep"  # set after the first request: still sent
    async with holysheep.AsyncClient(
        api_key="sk-test", base_url=upstream.base_url, transport=transport
    ) as client:
        for org in ("sheep", "goats"):
            transport.client.headers["X-Org"] = org
            await client.chat.complete(model="m", messages=MESSAGES, request_id=f"id-{org}")
            seen = upstream.requests[-1].headers
            assert (org, f"id-{org}", "identity") == (
                seen["x-org"],
                seen["x-request-id"],
                seen["accept-encoding"],
            )


def test_a_client_class_with_its_own_build_request_keeps_it(upstream: MockUpstream) -> None:
    class Signing(httpx.Client):
        def build_request(self, *args: Any, **kwargs: Any) -> httpx.Request:
            built = super().build_request(*args, **kwargs)
            built.headers["X-Signed"] = "yes"
            return built

    with Signing() as own:
        client = holysheep.Client(
            api_key="sk-test",
            base_url=upstream.base_url,
            transport=HTTPXTransport(own),
            retry=RetryPolicy.none(),
        )
        client.chat.complete(model="m", messages=MESSAGES)
    assert "yes" == upstream.requests[-1].headers["x-signed"]


@pytest.mark.anyio
async def test_a_closed_transport_refuses_with_a_holysheep_error() -> None:
    """Not httpx's own RuntimeError: the clients only expect holysheep's errors (and a
    `LocalProtocolError` is not retried, since retrying cannot reopen the transport)."""
    with serve() as upstream:
        sync = HTTPXTransport()
        sync.close()
        client = holysheep.Client(api_key="k", base_url=upstream.base_url, transport=sync)
        with pytest.raises(holysheep.LocalProtocolError, match="HTTPXTransport is closed"):
            client.chat.complete(model="m", messages=MESSAGES)
        transport = AsyncHTTPXTransport()
        await transport.aclose()
        async_client = holysheep.AsyncClient(
            api_key="k", base_url=upstream.base_url, transport=transport
        )
        with pytest.raises(holysheep.LocalProtocolError, match="AsyncHTTPXTransport is closed"):
            await async_client.chat.complete(model="m", messages=MESSAGES)
        assert [] == upstream.requests


def test_closing_the_transport_lets_open_streams_finish_first() -> None:
    """httpx closes every connection of its pool, those being read in other threads included,
    so `close()` waits for the responses still open, and the last one closes the pool."""
    transport = HTTPXTransport()
    with serve(tokens=6, tokens_per_s=30) as upstream:
        client = holysheep.Client(api_key="k", base_url=upstream.base_url, transport=transport)
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            texts = stream.text_stream()
            first = next(texts)
            client.close()
            assert not transport.client.is_closed
            rest = "".join(texts)
        assert transport.client.is_closed
        assert 6 == stream.completion.usage.completion_tokens  # type: ignore[union-attr]
        assert stream.completion.text == first + rest
        with pytest.raises(holysheep.LocalProtocolError):
            client.chat.complete(model="m", messages=MESSAGES)


def test_closing_the_transport_waits_for_a_request_still_being_sent() -> None:
    """A close while another thread waits for its response head: that request is in use too
    (it was not counted until `send` returned, and the pool was closed under its read)."""
    event = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}\n\n'
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(event), event)
    )
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_late() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            time.sleep(0.6)
            conn.sendall(answer)

    threading.Thread(target=serve_late, daemon=True).start()
    transport = HTTPXTransport()
    client = holysheep.Client(
        api_key="k",
        base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1",
        transport=transport,
        retry=RetryPolicy.none(),
    )
    texts: list[str] = []
    reader = threading.Thread(
        target=lambda: texts.append(client.chat.complete(model="m", messages=MESSAGES).text)
    )
    reader.start()
    time.sleep(0.2)  # waiting for the head
    client.close()
    reader.join(5)
    listener.close()
    assert ["Hi"] == texts
    assert transport.client.is_closed


def test_one_async_client_on_a_second_event_loop_is_a_clear_error() -> None:
    """A module-level AsyncClient used by two `asyncio.run()` calls failed on the second with
    httpx's bare "Event loop is closed" (a RuntimeError, not a holysheep error)."""
    with serve(tokens=3) as upstream:
        client = holysheep.AsyncClient(api_key="k", base_url=upstream.base_url)

        async def ask() -> str:
            return (await client.chat.complete(model="m", messages=[])).text

        first = asyncio.new_event_loop()
        try:
            assert first.run_until_complete(ask())
            with pytest.raises(holysheep.ConfigurationError, match=r"one AsyncClient .* per event"):
                asyncio.run(ask())
            first.run_until_complete(client.aclose())
        finally:
            first.close()


def test_closing_a_client_after_its_event_loop_ended_says_what_to_do(
    upstream: MockUpstream,
) -> None:
    """`asyncio.run(use(client))` then `asyncio.run(client.aclose())`: only the ended loop
    could have closed the connections; say so (it was a bare "Event loop is closed")."""

    def use_then_close_elsewhere() -> str:
        client = holysheep.AsyncClient(api_key="k", base_url=upstream.base_url)
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
        # The stranded sockets, which nothing but that loop could have closed.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    assert message.startswith(
        "AsyncHTTPXTransport's connections belong to an event loop that has ended"
    )


def test_closing_a_client_on_another_loop_while_its_own_runs_is_refused(
    upstream: MockUpstream,
) -> None:
    """That loop still owns the connections and can close them: say so."""
    client = holysheep.AsyncClient(api_key="k", base_url=upstream.base_url)
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        first.run_until_complete(client.chat.complete(model="m", messages=[]))
        with pytest.raises(holysheep.ConfigurationError, match="first used on another"):
            second.run_until_complete(client.aclose())
        first.run_until_complete(client.aclose())
    finally:
        first.close()
        second.close()


def test_a_client_used_in_one_trio_run_closes_in_another(upstream: MockUpstream) -> None:
    """Trio's sockets close from any run: `trio.run(client.aclose)` after `trio.run(main)`
    closes the pool, as it did before asyncio's check came."""
    trio = pytest.importorskip("trio")
    client = holysheep.AsyncClient(api_key="k", base_url=upstream.base_url)

    async def use() -> str:
        return (await client.chat.complete(model="m", messages=[])).text

    assert trio.run(use)
    trio.run(client.aclose)
    assert client.transport.client.is_closed  # type: ignore[attr-defined]


@pytest.mark.parametrize("wbits", [zlib.MAX_WBITS, -zlib.MAX_WBITS], ids=["zlib", "raw"])
def test_deflate_of_either_kind_decodes_a_byte_at_a_time(wbits: int) -> None:
    """`deflate` comes wrapped (RFC 9110) or raw: both decode, even fed one byte per read (a
    first read with no output once settled the format too early)."""
    packer = zlib.compressobj(wbits=wbits)
    body = packer.compress(b"data: hello\n\n") + packer.flush()
    decoder = BodyDecoder("deflate")
    pieces = [piece for i in range(len(body)) for piece in decoder.decode(body[i : i + 1])]
    assert b"data: hello\n\n" == b"".join([*pieces, *decoder.flush()])


# --- bodies read from httpcore's connection (transports/_httpcore_body.py) -----------------


@pytest.fixture(params=["direct", "layered"])
def reads(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both ways an httpx transport reads a body: from the connection, or through httpx."""
    _httpcore_body.use_direct_reads = request.param == "direct"
    try:
        yield request.param
    finally:
        _httpcore_body.use_direct_reads = True


def assert_whole(completion: holysheep.Completion) -> None:
    assert ("stop", 50) == (
        completion.finish_reason,
        completion.usage and completion.usage.completion_tokens,
    )


CHAT = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'


def chat_request(upstream: MockUpstream) -> Request:
    return Exchange(
        url=upstream.base_url + "/chat/completions", api_key="k", body=CHAT, timeouts=Timeouts()
    ).request


@pytest.fixture
def direct(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each body the httpx transports read was read from the connection."""
    seen: list[bool] = []
    for name in ("sync_body", "async_body"):
        real = getattr(_httpcore_body, name)

        def spy(*args: Any, real: Any = real) -> Any:
            body = real(*args)
            seen.append(body is not None)
            return body

        monkeypatch.setattr(_httpcore_body, name, spy)
    return seen


def test_the_sync_transport_reads_a_plain_body_from_the_connection(
    upstream: MockUpstream, direct: list[bool]
) -> None:
    """The default httpx client's HTTP/1.1 bodies take the direct path (the speed of the
    httpx transports rests on it: a new httpx or httpcore laid out otherwise turns it off)."""
    with HTTPXTransport() as transport:
        response = transport.send(chat_request(upstream))
        try:
            assert b"data: [DONE]" in b"".join(response.stream)
            assert [True] == direct
        finally:
            response.close()


@pytest.mark.anyio
async def test_the_async_transport_reads_a_plain_body_from_the_connection(
    upstream: MockUpstream, direct: list[bool]
) -> None:
    """As for the sync transport, on asyncio and on trio."""
    transport = AsyncHTTPXTransport()
    try:
        response = await transport.send(chat_request(upstream))
        try:
            assert b"data: [DONE]" in b"".join([data async for data in response.stream])
            assert [True] == direct
        finally:
            await response.aclose()
    finally:
        await transport.aclose()


class _WrappedStream(httpx.SyncByteStream):
    """A user's httpx transport that passes the body on through a stream of its own."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __iter__(self) -> Iterator[bytes]:
        yield from self.inner

    def close(self) -> None:
        self.inner.close()


class _WrappingTransport(httpx.BaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_WrappedStream(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


def test_a_client_with_another_httpx_transport_reads_through_httpx(
    upstream: MockUpstream, direct: list[bool]
) -> None:
    """A connection the layout does not know (here a user's httpx transport, streaming through
    a byte stream of its own) is read through httpx's public API, whole."""
    with (
        httpx.Client(transport=_WrappingTransport()) as http,
        HTTPXTransport(http) as transport,
    ):
        response = transport.send(chat_request(upstream))
        try:
            assert b"".join(response.stream).endswith(b"data: [DONE]\n\n")
            assert [False] == direct  # asked, and declined
        finally:
            response.close()


def test_sync_streams_reuse_one_connection_and_a_cut_one_is_not_reused(reads: str) -> None:
    """Read to the end, a body leaves its connection ready for the next request; left
    half-way, the connection is closed, not handed to the next one mid-body."""
    with (
        serve(tokens=50) as fresh,
        holysheep.Client(
            api_key="k", base_url=fresh.base_url, transport=HTTPXTransport()
        ) as client,
    ):
        for _ in range(5):
            assert_whole(client.chat.complete(model="m", messages=MESSAGES))
        assert 1 == fresh.connections_opened
        with client.chat.stream(model="m", messages=MESSAGES) as stream:
            next(iter(stream))
        assert_whole(client.chat.complete(model="m", messages=MESSAGES))
        assert 2 == fresh.connections_opened


@pytest.mark.anyio
async def test_async_streams_reuse_one_connection_and_a_cut_one_is_not_reused(
    reads: str,
) -> None:
    """As for the sync transport, on asyncio and on trio."""
    with serve(tokens=50) as fresh:
        async with holysheep.AsyncClient(api_key="k", base_url=fresh.base_url) as client:
            for _ in range(5):
                completion = await client.chat.complete(model="m", messages=MESSAGES)
                assert_whole(completion)
            assert 1 == fresh.connections_opened
            async with client.chat.stream(model="m", messages=MESSAGES) as stream:
                await stream.__anext__()
            completion = await client.chat.complete(model="m", messages=MESSAGES)
            assert_whole(completion)
            assert 2 == fresh.connections_opened


def test_a_stream_dropped_on_trio_gives_its_connection_back(reads: str) -> None:
    """An `AsyncStream` left by `break` and dropped, without `async with`: trio finalizes its
    body, which closes the connection (the server sees it go), on both read paths."""
    trio = pytest.importorskip("trio")

    async def main(upstream: MockUpstream) -> None:
        async with holysheep.AsyncClient(
            api_key="k", base_url=upstream.base_url, retry=RetryPolicy.none()
        ) as client:
            for _ in range(3):
                stream = client.chat.stream(model="m", messages=MESSAGES)
                async for chunk in stream:
                    if chunk.text:
                        break
                del stream, chunk
                gc.collect()
            with trio.move_on_after(5):
                while upstream.disconnects < 3:
                    await trio.sleep(0.01)

    with serve(tokens=20_000, tokens_per_s=2_000) as paced:  # 10 s answers
        with warnings.catch_warnings():
            # trio's, for each body it finalizes: the caller did not close its stream.
            warnings.filterwarnings("ignore", "Async generator", ResourceWarning)
            trio.run(main, paced)
        assert 3 == paced.disconnects


def _hooked(kind: type[httpx.Client] | type[httpx.AsyncClient], read: Any) -> Any:
    """An httpx client whose response hook reads error bodies (to log them, say)."""
    return kind(event_hooks={"response": [read]})


def test_a_body_a_users_hook_read_is_taken_as_read(upstream: MockUpstream) -> None:
    """A hook of the caller's own httpx client that reads an error body: the error keeps the
    server's message, and the connection (back in httpx's pool) serves the next request
    (the stream was read again: it spun, or waited for a body already taken)."""

    def read(response: httpx.Response) -> None:
        if response.is_error:
            response.read()

    upstream.enqueue({"fault": {"kind": "status", "status": 400}})
    transport = HTTPXTransport(_hooked(httpx.Client, read))
    with holysheep.Client(
        api_key="k", base_url=upstream.base_url, transport=transport, timeout=5
    ) as client:
        with pytest.raises(holysheep.BadRequestError) as info:
            client.chat.complete(model="m", messages=MESSAGES)
        assert "(empty body)" not in str(info.value)
        assert "stop" == client.chat.complete(model="m", messages=MESSAGES).finish_reason
    transport.client.close()


@pytest.mark.anyio
async def test_a_body_a_users_async_hook_read_is_taken_as_read(upstream: MockUpstream) -> None:
    """As for the sync transport, on asyncio and on trio."""

    async def read(response: httpx.Response) -> None:
        if response.is_error:
            await response.aread()

    upstream.enqueue({"fault": {"kind": "status", "status": 400}})
    transport = AsyncHTTPXTransport(_hooked(httpx.AsyncClient, read))
    async with holysheep.AsyncClient(
        api_key="k", base_url=upstream.base_url, transport=transport, timeout=5
    ) as client:
        with pytest.raises(holysheep.BadRequestError) as info:
            await client.chat.complete(model="m", messages=MESSAGES)
        assert "(empty body)" not in str(info.value)
        completion = await client.chat.complete(model="m", messages=MESSAGES)
        assert "stop" == completion.finish_reason
    await transport.client.aclose()


def test_a_response_dropped_unclosed_gives_its_connection_back() -> None:
    """httpcore counts the connection of a response nobody closed as in use for good: two
    dropped ones used up a pool of two, the next request waited for a connection until its
    timeout, and `close()` never closed the pool. A dropped one is closed at the next send."""
    with serve(tokens=50, tokens_per_s=20) as upstream:
        transport = HTTPXTransport(max_connections=2)
        for _ in range(2):
            transport.send(chat_request(upstream))  # ...and dropped, unread and unclosed
        gc.collect()
        started = time.monotonic()
        response = transport.send(chat_request(upstream))
        assert time.monotonic() - started < 1
        assert upstream.wait_for_disconnect(2.0, count=2)  # the server saw both go
        response.close()
        transport.close()
        assert transport.client.is_closed


@pytest.mark.anyio
async def test_async_a_response_dropped_unclosed_gives_its_connection_back() -> None:
    """As for the sync transport: an `AsyncResponse` dropped unread and unclosed is closed at
    the next send (it held its connection for good), on asyncio and trio."""
    with serve(tokens=50, tokens_per_s=20) as upstream:
        transport = AsyncHTTPXTransport(max_connections=2)
        for _ in range(2):
            await transport.send(chat_request(upstream))  # ...and dropped
        gc.collect()
        with anyio.fail_after(1):
            response = await transport.send(chat_request(upstream))
        assert upstream.wait_for_disconnect(2.0, count=2)
        await response.aclose()
        await transport.aclose()
        assert transport.client.is_closed


def _sse_response(text: str, request_id: bytes) -> bytes:
    chunk = {
        "id": "c",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": "stop"}],
    }
    body = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-request-id: %s\r\n"
        b"content-length: %d\r\n\r\n" % (request_id, len(body))
    ) + body


@contextlib.contextmanager
def _server_sending_more_than_asked() -> Iterator[str]:
    """Each connection's first response comes with a second one nobody asked for, in the same
    write (a desynchronised proxy); a second request on the connection is answered afresh."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve_one(conn: socket.socket) -> None:
        with conn:
            answered = 0
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = conn.recv(65536)
                    if not data:
                        return
                    head += data
                answered += 1
                if answered == 1:
                    conn.sendall(_sse_response("first", b"r1") + _sse_response("STALE", b"stale"))
                else:
                    conn.sendall(_sse_response("fresh", b"r%d" % answered))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        listener.close()


def test_bytes_past_the_end_of_a_body_are_never_the_next_answer() -> None:
    """h11 kept the surplus as the start of the next response on the connection, and the next
    stream returned the stale answer, with its request id. Now the connection is closed."""
    with (
        _server_sending_more_than_asked() as base_url,
        holysheep.Client(
            api_key="k", base_url=base_url, transport=HTTPXTransport(), retry=RetryPolicy.none()
        ) as client,
    ):
        answers = []
        for _ in range(2):
            with client.chat.stream(model="m", messages=MESSAGES) as stream:
                answers.append(("".join(chunk.text for chunk in stream), stream.request_id))
    assert [("first", "r1"), ("first", "r1")] == answers  # each on a connection of its own


def test_a_response_dropped_after_close_still_closes_the_pool() -> None:
    """`close()` waits for the responses still open; one of them dropped unclosed afterwards was
    queued for a next send or close that never came, and the pool stayed open."""
    with serve(tokens=50, tokens_per_s=20) as upstream:
        transport = HTTPXTransport()
        response = transport.send(chat_request(upstream))
        transport.close()  # waits for it...
        del response  # ...and it is dropped, unclosed
        gc.collect()
        assert upstream.wait_for_disconnect(2.0, count=1)
        deadline = time.monotonic() + 2
        while not transport.client.is_closed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert transport.client.is_closed
