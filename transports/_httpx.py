"""Transports on `httpx`: `HTTPXTransport` (sync) and `AsyncHTTPXTransport` (async, default)."""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, final

import anyio
import anyio.lowlevel
import httpx

from holysheep._exceptions import (
    APIConnectionError,
    LocalProtocolError,
)
from holysheep._exchange import CASELESS_HEADERS, Request, Timeouts
from holysheep.transports import _httpcore_body, _httpcore_pool
from holysheep.transports._base import (
    AsyncBaseTransport,
    AsyncResponse,
    BaseTransport,
    Response,
    body_decoder,
    closing_elsewhere,
    connect_error,
    connect_timeout,
    env_proxy,
    same_loop,
)

__all__ = ["AsyncHTTPXTransport", "HTTPXTransport", "default_limits"]

CASELESS_HEADERS.add(httpx.Headers)  # handed over as they are (see `Exchange.on_headers`)


def default_limits(max_connections: int | None = 10_000) -> httpx.Limits:
    """Pool limits for streaming: httpx's default of 100 would queue the 101st stream.

    A stream holds its connection for its whole life, so the pool must be as large as the
    number of concurrent streams a process runs; keep-alive connections stay bounded.
    """
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=100)


@functools.lru_cache(maxsize=64)
def _timeout(t: Timeouts) -> httpx.Timeout:
    # Cached: a client sends every request with the same few `Timeouts`.
    # Connecting, writing the request and waiting for a connection from the pool too, all
    # within what the head may take: none must outlast `ttft` or `total`, which the sync client
    # cannot cut short while the transport sends.
    return httpx.Timeout(t.head_timeout())


def _build(
    client: httpx.Client | httpx.AsyncClient, request: Request, urls: dict[str, httpx.URL]
) -> httpx.Request:
    """`client.build_request(...)` for `request`, at a third of its cost when it can be.

    `build_request` parses the URL again and merges the client's headers, cookies and query
    parameters into every request: 43 µs, a twentieth of a short stream over loopback and
    more than the client adds to it. Our URLs are absolute and repeat, so a parsed one is
    kept in `urls`; a client without cookies or query parameters (httpx's default) gets its
    headers merged here as httpx merges them (the request's replace the client's of the same
    name). Anything else, and a client class with a `build_request` of its own, takes
    `build_request` itself.
    """
    timeout = _timeout(request.timeouts)
    if _stock_build(client) and not client.cookies and not client.params:
        url = urls.get(request.url)
        if url is None:
            url = httpx.URL(request.url)
            if len(urls) < 64:
                urls[request.url] = url
        defaults = _text_headers(client.headers)
        # A relative URL is joined to the client's `base_url`: `build_request` does that.
        if defaults is not None and not url.is_relative_url:
            ours = {name.lower() for name, _ in request.headers}
            headers = [pair for pair in defaults if pair[0].lower() not in ours]
            headers += request.headers
            return httpx.Request(
                request.method,
                url,
                headers=headers,
                content=request.content,
                extensions={"timeout": timeout.as_dict()},
            )
    return client.build_request(
        request.method,
        request.url,
        headers=request.headers,
        content=request.content,
        timeout=timeout,
    )


def _stock_build(client: httpx.Client | httpx.AsyncClient) -> bool:
    """Whether `client.build_request` is httpx's own, which `_build` does the work of."""
    build = type(client).build_request
    return build is httpx.Client.build_request or build is httpx.AsyncClient.build_request


def _text_headers(headers: httpx.Headers) -> list[tuple[str, str]] | None:
    """The client's own headers as text; None if one is not ASCII (left to httpx then)."""
    try:
        return [(name.decode("ascii"), value.decode("ascii")) for name, value in headers.raw]
    except UnicodeDecodeError:
        return None


def _body_timeout(built: httpx.Request, request: Request) -> None:
    # The head arrived; from here the clients' ttft/idle timers rule and the read timeout is
    # only a backstop. httpcore reads this dict when the body iteration starts.
    timeouts = built.extensions.get("timeout")
    if isinstance(timeouts, dict):
        timeouts["read"] = request.timeouts.read_backstop()


def _translate(
    exc: httpx.HTTPError, request: Request, client: httpx.Client | httpx.AsyncClient
) -> Exception:
    if isinstance(exc, httpx.ConnectTimeout):
        return connect_timeout(request)
    if isinstance(exc, httpx.ConnectError):  # refused, DNS, TLS: nothing was sent
        # httpx's error does not say whether it met the proxy; the environment does.
        proxied = client.trust_env and env_proxy(request.url) is not None
        return connect_error(request, exc, via_proxy=proxied)
    return APIConnectionError(f"could not reach {request.url}: {exc!r}")


class HTTPXTransport(BaseTransport):
    """Sync transport on `httpx.Client`."""

    def __init__(
        self,
        client: httpx.Client | None = None,
        *,
        max_connections: int | None = 1000,
        verify: bool | str = True,
    ) -> None:
        self._owns_client = client is None
        if client is None:
            client = httpx.Client(limits=default_limits(max_connections), verify=verify)
            _httpcore_pool.mend(client)  # its pool's bookkeeping, linear (see the module)
        self.client = client
        self._urls: dict[str, httpx.URL] = {}  # parsed request URLs, see `_build`
        # Responses not yet closed, and whether `close()` waits for them (see `close`).
        self._lock = threading.Lock()
        self._open = 0
        self._closing = False
        # Closers of responses dropped unclosed (see `_Dropped`), run by the next `send` or
        # `close`.
        self._dropped: list[Callable[[], None]] = []

    def send(self, request: Request) -> Response:
        self._close_dropped()
        with self._lock:
            if self._closing or self.client.is_closed:  # httpx would raise a RuntimeError
                raise LocalProtocolError("HTTPXTransport is closed: cannot send another request")
            self._open += 1  # from the send on: a connection is in use (see `close`)
        built = _build(self.client, request, self._urls)
        try:
            response = self.client.send(built, stream=True)
        except BaseException as exc:
            self._closed_one()
            if isinstance(exc, httpx.HTTPError):
                raise _translate(exc, request, self.client) from exc
            raise
        _body_timeout(built, request)
        body, close, interrupt = _body_and_closer(
            response,
            request.timeouts.read_backstop(),
            self._closed_one,
            self._dropped,
            self._dropped_after_close,
        )
        return Response(
            response.status_code,
            response.headers,  # case-insensitive already: no copy per stream
            body,
            close,
            interrupt,
        )

    def close(self) -> None:
        """Close the pool once the requests and responses still open are done.

        httpx closes every connection of its pool, those being read included, and a socket
        closed under a read in another thread can leave that read waiting on whatever
        connection gets its number next. So streams still open finish first (their own
        timeouts bound them), and the last one to close closes the pool.
        """
        self._close_dropped()
        with self._lock:
            self._closing = True
            now = self._open == 0
        if now and self._owns_client:
            self.client.close()

    def _close_dropped(self) -> None:
        dropped = self._dropped
        while dropped:
            dropped.pop()()  # (a list's pop is atomic: another thread may take one too)

    def _dropped_after_close(self) -> None:
        # No send or close will come to close it, and the pool waits for it: a thread of its
        # own does (not the one the garbage collector stopped, see `_Dropped`).
        if self._closing:
            threading.Thread(target=self._close_dropped, daemon=True).start()

    def _closed_one(self) -> None:
        with self._lock:
            self._open -= 1
            last = self._closing and self._open == 0
        if last and self._owns_client:
            self.client.close()


@final
class _Dropped:
    """Closes a response that was dropped without being closed, once it is garbage.

    httpcore counts the connection of a response nobody closed as in use for good: a caller
    that lost a few streams to an exception before its `with` ran out of connections, and the
    transport's `close()` waited for them for ever. The close is not done here, where the
    garbage collector may have stopped a thread holding the pool's lock (httpcore's, not
    reentrant), or outside the event loop, but queued for the transport's next `send` or
    `close` (`aclose`).
    """

    __slots__ = ("armed", "closer", "queue", "wake")

    def __init__(
        self, closer: Any, queue: list[Any], wake: Callable[[], None] | None = None
    ) -> None:
        self.closer = closer  # what the transport closes: a function, or (async) the response
        self.queue = queue
        self.wake = wake  # told when one is queued
        self.armed = True

    def __del__(self) -> None:
        if self.armed:
            self.queue.append(self.closer)
            if self.wake is not None:
                self.wake()


def _body_and_closer(
    response: httpx.Response,
    timeout: float | None,
    closed: Callable[[], None],
    dropped: list[Callable[[], None]],
    wake: Callable[[], None],
) -> tuple[Iterator[bytes], Callable[[], None], Callable[[], None]]:
    finished = False
    done = False

    def release() -> None:
        # Closed, and counted closed once (see `HTTPXTransport.close`); all a dropped one needs:
        # no thread reads it.
        nonlocal done
        response.close()
        if not done:
            done = True
            closed()

    # Held by `body` and `close` alone: when the response they belong to is dropped, so is it.
    guard = _Dropped(release, dropped, wake)

    def body() -> Iterator[bytes]:
        nonlocal finished
        guard  # noqa: B018 - held, see `guard`
        if response.is_stream_consumed:
            yield from _content(response)  # (see `_content`)
            finished = True
            return
        try:
            decode = body_decoder(response.headers)
            direct = None if decode is not None else _httpcore_body.sync_body(response, timeout)
            if direct is not None:  # see `_httpcore_body`
                yield from direct
            else:
                stream = response.stream  # not iter_raw(): see `_aiter_raw`
                assert isinstance(stream, httpx.SyncByteStream)
                if decode is None:
                    yield from stream
                else:
                    for data in stream:
                        yield from decode.decode(data)
                    yield from decode.flush()
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise _httpcore_body.read_failed(exc) from exc
        finished = True

    def interrupt() -> None:
        # Wakes a read blocked in another thread; the socket stays open until `close`.
        if not finished:
            stream = response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close() -> None:
        guard.armed = False
        # Shut the socket down first: closing it does not wake a thread blocked in recv(),
        # and an unfinished body must not go back to the pool.
        interrupt()
        release()

    return body(), close, interrupt


class AsyncHTTPXTransport(AsyncBaseTransport):
    """Async transport on `httpx.AsyncClient`; runs on asyncio and trio."""

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        max_connections: int | None = 10_000,
        verify: bool | str = True,
    ) -> None:
        self._owns_client = client is None
        if client is None:
            client = httpx.AsyncClient(limits=default_limits(max_connections), verify=verify)
            _httpcore_pool.mend(client)  # its pool's bookkeeping, linear (see the module)
        self.client = client
        self._urls: dict[str, httpx.URL] = {}  # parsed request URLs, see `_build`
        self._loop: object = None  # the event loop our own pool belongs to (`same_loop`)
        self._dropped: list[httpx.Response] = []  # dropped unclosed (see `_Dropped`)

    async def send(self, request: Request) -> AsyncResponse:
        await self._close_dropped()
        if self.client.is_closed:  # httpx would raise a RuntimeError of its own
            raise LocalProtocolError("AsyncHTTPXTransport is closed: cannot send another request")
        if self._owns_client:
            loop = anyio.lowlevel.current_token().native_token  # asyncio's loop, or trio's
            self._loop = same_loop(self._loop, loop, "AsyncHTTPXTransport")
        built = _build(self.client, request, self._urls)
        try:
            response = await self.client.send(built, stream=True)
        except httpx.HTTPError as exc:
            raise _translate(exc, request, self.client) from exc
        _body_timeout(built, request)
        # Held by `aclose` alone: when the response is dropped, so is it (see `_Dropped`).
        guard = _Dropped(response, self._dropped)

        async def aclose() -> None:
            guard.armed = False
            await response.aclose()

        return AsyncResponse(
            response.status_code,
            response.headers,  # case-insensitive already: no copy per stream
            _async_body(response),
            aclose,
        )

    async def _close_dropped(self) -> None:
        dropped = self._dropped
        while dropped:
            await dropped.pop().aclose()

    async def aclose(self) -> None:
        await self._close_dropped()
        if self._owns_client:
            loop = anyio.lowlevel.current_token().native_token
            closing_elsewhere(self._loop, loop, "AsyncHTTPXTransport")
            await self.client.aclose()


def _async_body(response: httpx.Response) -> AsyncIterator[bytes]:
    # Read from the connection itself where it can be (see `_httpcore_body`); a body a proxy
    # compressed, and every connection of another kind, through httpx.
    if response.is_stream_consumed:
        return _already_read(response)
    if "content-encoding" not in response.headers:
        direct = _httpcore_body.async_body(response)
        if direct is not None:
            return direct
    return _aiter_raw(response)


async def _already_read(response: httpx.Response) -> AsyncIterator[bytes]:
    for piece in _content(response):
        yield piece


def _content(response: httpx.Response) -> list[bytes]:
    """The body an event hook of the caller's own httpx client read already (`r.read()` to
    log an error, say): httpx gave the connection back to its pool then, and reading the
    stream again took another request's bytes, or waited for nothing."""
    try:
        content = response.content
    except httpx.ResponseNotRead:  # iterated, not kept: gone
        return []
    return [content] if content else []


async def _aiter_raw(response: httpx.Response) -> AsyncIterator[bytes]:
    # The response's byte stream itself, not `aiter_raw()`: that one re-chunks (a no-op
    # without a chunk size) and counts bytes on every read, a fifth of httpx's cost per read.
    # The stream still raises httpx's exceptions; the client closes the response. A body a
    # proxy compressed (gzip, deflate) is decoded here, as `requests` decodes it.
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    parts = stream.__aiter__()
    finished = False
    try:
        # In the `try`, as in the sync body: an encoding it refuses still unwinds httpx's
        # generators (see `_unwind`).
        decode = body_decoder(response.headers)
        if decode is None:
            async for data in parts:
                yield data
        else:  # a loop of its own: the plain one stays free of a test per read
            async for data in parts:
                for piece in decode.decode(data):
                    yield piece
            for piece in decode.flush():
                yield piece
        finished = True
    except (httpx.HTTPError, httpx.StreamError) as exc:
        finished = True
        raise _httpcore_body.read_failed(exc) from exc
    finally:
        if not finished:
            await _unwind(response, parts)


async def _unwind(response: httpx.Response, parts: AsyncIterator[bytes]) -> None:
    """Finish httpx's async generators after an early close.

    A body left mid-way leaves a chain of them (httpx's, then httpcore's) suspended, and
    `async for` closes none of the inner ones, so the garbage collector finalizes them later,
    which trio reports as ResourceWarnings. One more step in a cancelled scope delivers the
    cancellation at the innermost wait, and every layer ends on it; what is already buffered
    is dropped on the way, and nothing waits on the network.
    """
    await response.aclose()
    with anyio.CancelScope() as scope:
        scope.cancel()
        with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
            async for _ in parts:
                pass
