"""Reading an HTTP/1.1 response body from httpcore's connection, below httpx's public API.

Why: for a stream of small SSE events, httpx's `aiter_raw()` costs more than the events. Each
event is an HTTP chunk, and each chunk climbs five generators (httpcore's connection and pool
streams, httpx's response and bound streams, then ours), plus a context manager that maps
h11's exceptions; each read of the socket enters a cancel scope for httpcore's read timeout.
Measured on one 20,000-event stream (bench/client.py), that made `AsyncClient` on httpx read
0.8x as fast as bare `aiter_raw()`. Reading here drives the connection's own `h11` state and
socket, so parsing is still h11's and the connection still goes back to httpx's pool when the
response is closed; what is skipped is the layering. Every event h11 already holds is handed
over in one piece, so the SSE decoder parses them together.

Only a plain HTTP/1.1 connection of httpx's own default transport, on a network stream of
httpcore's own backends (anyio, trio, sync sockets) is read this way: `async_body` and
`sync_body` return None for anything else (HTTP/2, a transport or network stream of another
kind, a version of httpx or httpcore laid out otherwise), and the caller reads the body
through httpx as before. The tests run both ways (`tests/test_httpx_transport.py`,
`tests/test_hostile_upstream.py`).

The read timeout httpcore would set is not set here: the clients' `ttft`, `idle` and `total`
bound every read themselves, and the sync transport sets the socket's timeout to the same
backstop once per body. A failure is the `APIConnectionError` the transports raise for httpx's
errors, with the error httpx would have raised (`ReadError`, `ReadTimeout`,
`RemoteProtocolError`) as its cause.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import h11
import httpx

from holysheep._exceptions import APIConnectionError

__all__ = ["ENABLED", "async_body", "read_failed", "sync_body"]

try:  # the private layout read below; if it moved, every body goes through httpx
    from httpcore._async.connection_pool import PoolByteStream as _AsyncPoolStream
    from httpcore._async.http11 import HTTP11ConnectionByteStream as _AsyncH11Stream
    from httpcore._backends.anyio import AnyIOStream as _AnyIOStream
    from httpcore._backends.sync import SyncStream as _SyncStream
    from httpcore._sync.connection_pool import PoolByteStream as _SyncPoolStream
    from httpcore._sync.http11 import HTTP11ConnectionByteStream as _SyncH11Stream
    from httpx._client import BoundAsyncStream as _BoundAsync
    from httpx._client import BoundSyncStream as _BoundSync
    from httpx._transports.default import AsyncResponseStream as _AsyncResponseStream
    from httpx._transports.default import ResponseStream as _SyncResponseStream

    ENABLED = True
except ImportError:  # pragma: no cover - another httpx or httpcore
    ENABLED = False

# Tests set this to False to read every body through httpx (the path taken when the layout
# is not recognised).
use_direct_reads = True

_Data = h11.Data
_NEED_DATA = h11.NEED_DATA


def read_failed(error: httpx.HTTPError | httpx.StreamError) -> APIConnectionError:
    """What the httpx transports raise (from `error`) for `error` while reading a body."""
    return APIConnectionError(f"the connection failed while reading the stream: {error!r}")


def _as_httpx(kind: type[httpx.TransportError], cause: BaseException) -> httpx.TransportError:
    """The error httpx would have raised for `cause`, with `cause` under it."""
    error = kind(str(cause))
    error.__cause__ = cause
    return error


def _take(next_event: Callable[[], Any], pieces: list[bytes | bytearray]) -> object:
    """Move the body bytes h11 can already give into `pieces`, and say what stopped it:
    `NEED_DATA`, h11's error (returned, so the bytes before it are handed over first: they may
    hold text the stream must keep), or anything else for the end of the body (`EndOfMessage`,
    or `PAUSED` after an upgrade, where httpcore's own reader stops too).
    """
    try:
        while True:
            event = next_event()
            if type(event) is not _Data:
                return event
            pieces.append(event.data)
    except h11.RemoteProtocolError as exc:  # cut short, or a framing error
        return exc


def _ended(outcome: object, state: Any) -> None:
    """What stopped `_take`, other than a need for data: raise ours for h11's error; at the end
    of the body, make sure bytes the server sent past it are never the next answer.

    Such bytes (a `Content-Length` too short, or a second response nobody asked for) are kept
    by h11 as the start of the next response on this connection, and the next request would
    read them as its answer. The server's side is marked broken, so that httpcore closes the
    connection rather than pool it (what requests does).
    """
    if isinstance(outcome, h11.RemoteProtocolError):
        error = _as_httpx(httpx.RemoteProtocolError, outcome)
        raise read_failed(error) from error
    if state.trailing_data[0]:
        broken = getattr(state, "_process_error", None)  # h11's own, since 0.8
        if broken is not None:
            broken(state.their_role)


def _h11_connection(stream: object, layers: tuple[type, ...]) -> Any:
    """The httpcore connection under httpx's response stream, if every layer is the expected
    type (`layers`: bound, response, pool, connection stream); else None."""
    # Each layer, and the attribute that holds the next one.
    inner_names = ("_stream", "_httpcore_stream", "_stream", "_connection")
    for kind, inner in zip(layers, inner_names, strict=True):
        if type(stream) is not kind:
            return None
        stream = getattr(stream, inner, None)
    state = getattr(stream, "_h11_state", None)
    if not (hasattr(state, "next_event") and hasattr(stream, "_network_stream")):
        return None  # pragma: no cover - another httpcore
    return stream


def async_body(response: httpx.Response) -> AsyncIterator[bytes] | None:
    """The body of `response`, read from its connection; None to read it through httpx."""
    if not (ENABLED and use_direct_reads):
        return None
    connection = _h11_connection(
        response.stream, (_BoundAsync, _AsyncResponseStream, _AsyncPoolStream, _AsyncH11Stream)
    )
    if connection is None:
        return None
    network = connection._network_stream
    if type(network) is _AnyIOStream:
        import anyio

        stream = getattr(network, "_stream", None)
        if not isinstance(stream, anyio.abc.ByteReceiveStream):  # pragma: no cover
            return None
        broken: tuple[type[BaseException], ...] = (
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        )
        return _async_body(response, connection, stream.receive, anyio.EndOfStream, broken)
    trio_stream = _trio_stream(network)
    if trio_stream is None:
        return None
    import trio

    broken = (trio.BrokenResourceError, trio.ClosedResourceError)
    return _async_body(response, connection, trio_stream.receive_some, (), broken)


def _trio_stream(network: object) -> Any:
    try:
        from httpcore._backends.trio import TrioStream
    except ImportError:  # trio is not installed, or httpcore moved it
        return None
    if type(network) is not TrioStream:
        return None
    stream = getattr(network, "_stream", None)
    return stream if callable(getattr(stream, "receive_some", None)) else None


async def _async_body(
    response: httpx.Response,
    connection: Any,
    receive: Callable[[int], Awaitable[bytes]],
    end_of_stream: type[BaseException] | tuple[()],
    broken: tuple[type[BaseException], ...],
) -> AsyncIterator[bytes]:
    state = connection._h11_state
    next_event, receive_data = state.next_event, state.receive_data
    size = connection.READ_NUM_BYTES
    pieces: list[bytes | bytearray] = []
    over = False  # the body ended, or failed (the client closes the response then)
    try:
        while True:
            outcome = _take(next_event, pieces)
            if pieces:
                yield b"".join(pieces)
                pieces.clear()
            if outcome is not _NEED_DATA:
                over = True
                _ended(outcome, state)
                return
            try:
                data = await receive(size)
            except end_of_stream:  # anyio says so; trio returns b""
                data = b""
            except broken as exc:
                over = True
                error = _as_httpx(httpx.ReadError, exc)
                raise read_failed(error) from error
            receive_data(data)
    finally:
        if not over:
            # Left mid-way: closed by the client (which closes the response too), or dropped
            # and finalized by the event loop (trio does that), where nothing else would give
            # the connection back: httpx's own generators closed it then.
            await response.aclose()


def sync_body(response: httpx.Response, timeout: float | None) -> Iterator[bytes] | None:
    """As `async_body`, for the sync transport; `timeout` bounds each read of the socket."""
    if not (ENABLED and use_direct_reads):
        return None
    connection = _h11_connection(
        response.stream, (_BoundSync, _SyncResponseStream, _SyncPoolStream, _SyncH11Stream)
    )
    if connection is None or type(connection._network_stream) is not _SyncStream:
        return None
    sock = getattr(connection._network_stream, "_sock", None)
    if not isinstance(sock, socket.socket):  # pragma: no cover - another httpcore
        return None
    return _sync_body(connection, sock, timeout)


def _sync_body(connection: Any, sock: socket.socket, timeout: float | None) -> Iterator[bytes]:
    state = connection._h11_state
    next_event, receive_data = state.next_event, state.receive_data
    size = connection.READ_NUM_BYTES
    recv = sock.recv
    pieces: list[bytes | bytearray] = []
    timed = False
    while True:
        outcome = _take(next_event, pieces)
        if pieces:
            yield b"".join(pieces)
            pieces.clear()
        if outcome is not _NEED_DATA:
            _ended(outcome, state)
            return
        try:
            if not timed:  # once: httpcore sets it before every read
                sock.settimeout(timeout)
                timed = True
            data = recv(size)
        except TimeoutError as exc:  # socket.timeout
            error = _as_httpx(httpx.ReadTimeout, exc)
            raise read_failed(error) from error
        except OSError as exc:
            error = _as_httpx(httpx.ReadError, exc)
            raise read_failed(error) from error
        receive_data(data)
