"""The transport interface: the only place holysheep touches the network.

A transport sends one `Request` and returns the response head plus an iterator of raw body
bytes. It does not parse SSE, retry or time anything out beyond the connect timeout and a read
backstop; the clients do that, the same way for every transport. Transports translate their
library's exceptions into `APIConnectionError` (and `ConnectTimeoutError`) at the edge, so the
rest of holysheep never sees a `requests` or `httpx` exception.

Three rules every transport keeps:

- `Response.close()` may be called from another thread (or, for async transports, another
  task) while a read is blocked, and must make that read return or raise promptly. A sync
  transport should also give `Response.interrupt`: it wakes such a read *without* releasing
  the connection (`socket.shutdown`, not `close`), and the sync client calls it instead of
  `close()` from other threads while a read may be under way, leaving the close to the
  reading thread. Closing a socket another thread is about to read lets the kernel hand its
  number to the next connection opened, and the read then waits on that one.
- An unfinished body is closed, never drained: the server sees the client go away.
- Closing a response whose body was read to its end neither blocks nor awaits anything a
  cancellation could interrupt (the connection goes back to the pool as it is): the async
  client then closes it without a cancel scope around it.
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
import urllib.request
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from types import TracebackType
from typing import final

import attrs

from holysheep._exceptions import (
    APIConnectionError,
    ConfigurationError,
    ConnectError,
    ConnectTimeoutError,
    RemoteProtocolError,
)
from holysheep._exchange import Request

__all__ = ["AsyncBaseTransport", "AsyncResponse", "BaseTransport", "Request", "Response"]


def _noop() -> None:
    pass


def connect_timeout(request: Request) -> ConnectTimeoutError:
    """No connection within `request.timeouts.connect`, in the words every transport uses."""
    limit = request.timeouts.connect or 0.0
    return ConnectTimeoutError(
        f"connect timeout: no connection to {request.url} within {limit:g} s",
        limit=limit,
        elapsed=limit,
    )


def env_proxy(url: str) -> str | None:
    """The proxy `HTTP(S)_PROXY` / `ALL_PROXY` / `NO_PROXY` name for `url`, as requests and
    httpx read them by default."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy  # `proxy.corp:3128`, as requests and httpx read it
    return proxy or None


def connect_error(
    request: Request, cause: BaseException | str, *, via_proxy: bool = False
) -> ConnectError:
    """No connection made (refused, DNS, a refused certificate): the request was never sent.

    `cause`, an HTTP library's exception, is told by the OS errors at its root: they say what
    went wrong ("[Errno 111] Connection refused"), where the library's own words may not
    (urllib3's "Max retries exceeded" when nothing was retried, anyio's "All connection
    attempts failed"). The library's exception stays in the `__cause__` chain.
    """
    detail = cause if isinstance(cause, str) else _root_os_errors(cause)
    if via_proxy and not detail.startswith(_VIA_PROXY):
        detail = _VIA_PROXY + detail
    return ConnectError(f"could not connect to {request.url}: {detail}")


# Before the details of a failure to reach the proxy (not the API's host).
_VIA_PROXY = "through the proxy: "


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and everything it wraps, outermost first: its `__cause__`, urllib3's `reason`, an
    exception among its args, and an exception group's members.

    Not `__context__`: that is whatever the calling code was handling when the request was
    made (a user's own `FileNotFoundError`, say), nothing the HTTP library wrapped.
    """
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop(0)
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [item.__cause__, getattr(item, "reason", None)]
        todo += item.args
        todo += getattr(item, "exceptions", ())


def _root_os_errors(exc: BaseException) -> str:
    chain = list(causes(exc))
    found = [cause for cause in chain if isinstance(cause, OSError) and cause.errno]
    # The roots: an OS error that wraps no other. Several when the host has several addresses
    # (IPv6 unreachable, IPv4 refused): each is said, once.
    roots = [error for error in found if not any(other in found for other in causes_of(error))]
    words = list(dict.fromkeys(_os_words(error) for error in roots))
    detail = "; ".join(words) if words else repr(exc)
    if any("Proxy" in type(cause).__name__ for cause in chain):
        detail = _VIA_PROXY + detail  # the proxy failed, not the API's host
    return detail


def causes_of(exc: BaseException) -> list[BaseException]:
    """What `exc` wraps, without itself."""
    return list(causes(exc))[1:]


def _os_words(error: OSError) -> str:
    if type(error) in _PLAIN_ERRORS and error.errno is not None and error.errno > 0:
        # The system's words: asyncio says "Connect call failed ('127.0.0.1', 9)" for a
        # refused connection, which does not say refused.
        return f"[Errno {error.errno}] {os.strerror(error.errno)}"
    return str(error)  # a DNS failure, a refused certificate: their own words say more


# The errors whose `errno` says it all (not `ssl.SSLError` or `socket.gaierror`, whose numbers
# are their libraries' own).
_PLAIN_ERRORS = frozenset(
    [OSError, ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError]
)


def same_loop(first: object, current: object, transport: str) -> object:
    """The event loop a transport's own pool belongs to: `current` the first time (`first` is
    None), and a clear error on any other loop after that.

    Connections (an httpx pool, an aiohttp session) stay bound to the loop that made them; on
    another they fail with a bare "Event loop is closed" (a module-level client used by two
    `asyncio.run()` calls, typically).
    """
    if first is not None and current is not first:
        raise ConfigurationError(
            f"{transport} was first used on another event loop, and its connections belong to "
            "that one: make one AsyncClient (and transport) per event loop"
        )
    return current


def closing_elsewhere(first: object, current: object, transport: str) -> None:
    """Refuse, clearly, an `aclose()` on loop `current` for connections of loop `first`.

    asyncio's connections can only be closed by their own loop; once it has ended, asking
    raised a bare "Event loop is closed" from deep in asyncio (a client used in one
    `asyncio.run()` and closed in another), and the sockets are left to the garbage
    collector. Trio's sockets close from any run, so only asyncio's loops are asked.
    """
    if first is None or current is first or not isinstance(first, asyncio.AbstractEventLoop):
        return  # (trio's token: any run closes them)
    if first.is_closed():
        raise ConfigurationError(
            f"{transport}'s connections belong to an event loop that has ended, and only it "
            "could close them: close the client inside the loop that used it (`async with "
            "AsyncClient() as client:` in that loop, or `await client.aclose()` before it ends)"
        )
    same_loop(first, current, transport)  # that loop still runs and owns them


# The most one piece of a compressed body expands to at a time: the SSE decoder's size limits
# then act on a body that expands without end (a "zip bomb") before it is all in memory.
_PIECE = 64 * 1024


@final
class BodyDecoder:
    """Decompresses a body sent with `Content-Encoding: gzip` or `deflate`, read by read.

    The clients ask for `identity`, but a proxy may compress anyway. `requests` decodes such a
    body itself; the httpx transports read httpx's raw stream (see `_httpx._aiter_raw`) and
    `AiohttpTransport` its raw payload, and decode with this. Each read gives what it
    completes, in pieces of at most 64 KiB, so events still flow one by one when the server
    flushes after each. Bytes that do not decode raise `APIConnectionError`, as `requests`
    reports them. As urllib3 does, a gzip body may hold several members, and what follows the
    last one, if it is not gzip, is ignored.
    """

    __slots__ = ("_decompressor", "_encoding", "_ignoring", "_seen", "_started")

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        # gzip: its header and trailer (wbits 16+); deflate: zlib's wrapper, else raw (below).
        self._decompressor = zlib.decompressobj(
            16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        )
        self._started = False  # some output came: the format is settled
        self._ignoring = False  # trailing bytes after the last gzip member
        self._seen = b""  # deflate's bytes before the first output

    def decode(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of `data`, the body's next bytes."""
        try:
            yield from self._pieces(data)
        except zlib.error as exc:
            raise APIConnectionError(
                f"the body was sent with Content-Encoding {self._encoding!r} and does not "
                f"decode: {exc}"
            ) from exc

    def flush(self) -> Iterator[bytes]:
        """What is left at the end of the body."""
        if not self._ignoring:
            rest = self._decompressor.flush()
            if rest:
                yield rest

    def _pieces(self, data: bytes) -> Iterator[bytes]:
        if self._ignoring:
            return
        decompressor = self._decompressor
        if not self._started and self._encoding == "deflate":
            self._seen += data  # kept until the format is settled (see below)
        try:
            out = decompressor.decompress(data, _PIECE)
        except zlib.error:
            if self._started or self._encoding != "deflate":
                raise
            # RFC 9110 section 8.4.1.2 names zlib's format, but servers send raw deflate
            # too; urllib3 and httpx take both, so do we: everything so far, again, as raw.
            decompressor = self._decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
            out = decompressor.decompress(self._seen, _PIECE)
        if out:
            self._seen = b""
        while True:
            if out:
                self._started = True
                yield out
            if decompressor.unconsumed_tail:
                out = decompressor.decompress(decompressor.unconsumed_tail, _PIECE)
            elif decompressor.eof and decompressor.unused_data and self._encoding == "gzip":
                # Another member (RFC 1952 allows several), or trailing bytes to ignore.
                rest = decompressor.unused_data
                decompressor = self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                try:
                    out = decompressor.decompress(rest, _PIECE)
                except zlib.error:
                    self._ignoring = True
                    return
            else:
                return


def body_decoder(headers: Mapping[str, str]) -> BodyDecoder | None:
    """A decoder for a body in gzip or deflate (`Content-Encoding`); None for one not encoded.

    Raises `RemoteProtocolError` for any other encoding (see `check_encoding`).
    """
    encoding = headers.get("content-encoding")
    if encoding is None:
        return None
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip"):
        return BodyDecoder("gzip")
    if encoding == "deflate":
        return BodyDecoder("deflate")
    check_encoding(encoding, ())  # `identity` passes; anything else is refused
    return None


def check_encoding(encoding: str | None, known: Collection[str]) -> None:
    """Refuse a body in an encoding nobody here decodes (`br` without Brotli, say).

    Read as it is, it reached the SSE decoder as noise, and the stream looked cut short ("ended
    without [DONE]") with nothing to say why.
    """
    if not encoding:
        return
    unknown = [
        part
        for part in (token.strip().lower() for token in encoding.split(","))
        if part and part != "identity" and part not in known
    ]
    if unknown:
        raise RemoteProtocolError(
            f"the body was sent with Content-Encoding {encoding!r}, which this transport "
            "cannot decode (holysheep asks for identity: a proxy on the way compressed it)"
        )


async def _anoop() -> None:
    pass


@final
@attrs.frozen
class Response:
    """A response head and its body, as raw byte chunks in arrival order.

    `headers` answers lookups by lower-case name: a dict with lower-case names, or the HTTP
    library's own case-insensitive mapping, handed over as it is (no copy per response, which
    every open stream would hold). `close` releases the connection; it is idempotent.
    `interrupt`, if given, makes a read blocked in another thread return or raise without
    releasing anything (see the module docstring); None: `close` does it.
    """

    status_code: int
    headers: Mapping[str, str]
    stream: Iterator[bytes]
    close: Callable[[], None] = _noop
    interrupt: Callable[[], None] | None = None


@final
@attrs.frozen
class AsyncResponse:
    """The async twin of `Response`."""

    status_code: int
    headers: Mapping[str, str]
    stream: AsyncIterator[bytes]
    aclose: Callable[[], Awaitable[None]] = _anoop


class BaseTransport:
    """Subclass and implement `send` (and `close` if you hold resources)."""

    def send(self, request: Request) -> Response:
        raise NotImplementedError(f"{type(self).__name__} must implement send(request)")

    def close(self) -> None:
        """Release pooled connections."""

    def __enter__(self) -> BaseTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncBaseTransport:
    """Subclass and implement `send` (and `aclose` if you hold resources)."""

    async def send(self, request: Request) -> AsyncResponse:
        raise NotImplementedError(f"{type(self).__name__} must implement async send(request)")

    async def aclose(self) -> None:
        """Release pooled connections."""

    async def __aenter__(self) -> AsyncBaseTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
