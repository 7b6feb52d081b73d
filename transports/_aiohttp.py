"""An asyncio transport on `aiohttp`, for many concurrent streams in one process.

Why it exists: httpx's async pool does work proportional to the number of open connections on
every request and release, so with 1,000 concurrent streams raw httpx spends ~730 µs of CPU per
event, while raw aiohttp holds 5,000-10,000 concurrent streams at ~33 µs per event and ~20 KiB
of memory per open stream. `AsyncHTTPXTransport` stays the `AsyncClient` default (it runs on
asyncio and trio); this one is for a single asyncio process with thousands of streams.

Theory of operation
-------------------
One `aiohttp.ClientSession` per transport, created lazily by the first `send`: aiohttp binds a
session to the running event loop, so it cannot be made in a synchronous `__init__`. Its
connector has no connection limit by default, because a stream holds its connection for its
whole life and a cap would queue the stream after it.

aiohttp is told to do nothing the clients already do: no redirects, and no total timeout
(aiohttp's default would end every request after 300 s). Nor does it decompress: the request
asks for `identity`, but a proxy may compress anyway, and then `_DecodedBody` decodes gzip and
deflate as the other transports do, and names an encoding it cannot decode when the body is
read. aiohttp's own decoding fails a response in an encoding it cannot decode while parsing
its head, so a 429 in `br` became a connection error, without its status or `Retry-After`.
What remains is the connect timeout from the request's `Timeouts`. Unlike
the other transports it keeps no per-read socket timeout as a backstop: aiohttp implements one by
replacing a timer on every packet received, which at thousands of streams costs more than the
clients' own deadline timer, and that timer already bounds every read.

The body is a small async iterator that awaits `response.content.readany()` once per chunk:
whatever arrived since the last read, with no copying or re-chunking. It finishes when aiohttp
reports the end of the body; aiohttp then returns the connection to its pool by itself. Closing
a response that has not finished calls `ClientResponse.close()`, which closes the socket (never
drains it, never pools it) and fails a read blocked in another task at once, so the server sees
the client go away. The transport keeps its unfinished bodies in a set, and `aclose()` closes
them that way: closing the session alone leaves such a read waiting.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Iterator
from typing import Final, final
from weakref import WeakSet

try:
    import aiohttp
    from aiohttp.http_exceptions import HttpProcessingError
    from multidict import CIMultiDictProxy, istr  # aiohttp's own dependency
except ImportError as exc:  # pragma: no cover - the dev environment has aiohttp
    raise ImportError(
        "AiohttpTransport needs aiohttp, an optional dependency: pip install 'holysheep[aiohttp]'"
    ) from exc

from holysheep._exceptions import (
    APIConnectionError,
    ConfigurationError,
    LocalProtocolError,
)
from holysheep._exchange import CASELESS_HEADERS, Request, Timeouts
from holysheep.transports._base import (
    AsyncBaseTransport,
    AsyncResponse,
    BodyDecoder,
    body_decoder,
    closing_elsewhere,
    connect_error,
    connect_timeout,
    env_proxy,
    same_loop,
)

__all__ = ["AiohttpTransport"]

CASELESS_HEADERS.add(CIMultiDictProxy)  # handed over as they are (see `Exchange.on_headers`)

# Everything aiohttp (or the socket under it) raises for a failed exchange. `HttpProcessingError`
# is how aiohttp reports bytes it cannot parse; it is not a `ClientError`.
_ERRORS: Final = (aiohttp.ClientError, HttpProcessingError, OSError, asyncio.TimeoutError)

# aiohttp >= 3.10 names a connect timeout; 3.9 raises its parent, `ServerTimeoutError`, which
# `send` only sees before the response head, where the connect timeout is the only one aiohttp
# keeps (no total, no per-read timeout: the clients time everything else).
_CONNECT_TIMEOUT: Final[type[Exception]] = getattr(
    aiohttp, "ConnectionTimeoutError", aiohttp.ServerTimeoutError
)


@functools.lru_cache(maxsize=64)
def _client_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    # Cached: most programs use one or two `Timeouts` values for all their requests.
    return aiohttp.ClientTimeout(
        total=None,  # the clients enforce ttft, idle and total themselves
        connect=timeouts.connect,
        sock_connect=timeouts.connect,
    )


def _describe(exc: BaseException) -> str:
    """`exc` for an error message: its repr, except for a `ClientResponseError` (a bad status
    line, a body cut short), whose repr holds the request's headers, the API key among them;
    its str says the status, aiohttp's message and the URL."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}({exc})"
    return repr(exc)


def _translate(exc: BaseException, request: Request) -> Exception:
    if isinstance(exc, _CONNECT_TIMEOUT):
        return connect_timeout(request)
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS: nothing was sent
        return connect_error(request, exc)
    return APIConnectionError(f"could not reach {request.url}: {_describe(exc)}")


def _require_asyncio() -> None:
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no asyncio event loop running in this thread
        task = None
    if task is None:
        raise ConfigurationError(
            f"AiohttpTransport runs on asyncio only, and this code runs on {_library()}; "
            "use AsyncHTTPXTransport (the AsyncClient default), which runs on asyncio and trio"
        )


def _library() -> str:
    try:
        import sniffio  # trio depends on it, so it is there whenever trio is

        return sniffio.current_async_library()
    except Exception:
        return "another event loop"


@functools.lru_cache(maxsize=256)
def _header_name(name: str) -> str:
    """One case-insensitive name object per header name, shared by all requests.

    aiohttp keeps a request's headers for the life of its response, and turns each plain `str`
    name into a case-insensitive one of its own: about 35 bytes per header per open stream.
    """
    # Anything but a `str` goes to aiohttp as it is, for aiohttp to refuse.
    return istr(name) if isinstance(name, str) else name


class _Body:
    """A response body as an async iterator of raw chunks, one `readany()` per chunk."""

    __slots__ = ("__weakref__", "_content", "_open", "_response", "finished")

    def __init__(self, response: aiohttp.ClientResponse, open_bodies: WeakSet[_Body]) -> None:
        self._response = response
        self._content = response.content
        self._open = open_bodies  # the transport's, so `aclose()` can end a blocked read
        self.finished = False
        open_bodies.add(self)

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self._content.readany()
        except _ERRORS as exc:
            raise APIConnectionError(
                f"the connection failed while reading the stream: {_describe(exc)}"
            ) from exc
        if data:
            return data
        self.finished = True  # aiohttp has put the connection back in its pool
        self._open.discard(self)
        raise StopAsyncIteration

    async def close_response(self) -> None:
        self.close()

    def close(self) -> None:
        # A finished body's connection is already pooled and `close()` leaves it there; an
        # unfinished one is closed, which also fails a read blocked in another task at once.
        self._open.discard(self)
        self._response.close()


@final
class _DecodedBody(_Body):
    """A body a proxy compressed (`Content-Encoding`), decoded read by read (`BodyDecoder`).

    A class of its own, so that a plain body reads with no test for it. An encoding it cannot
    decode raises `RemoteProtocolError` at the first read: the response head, and its status,
    are the client's by then.
    """

    __slots__ = ("_checked", "_decoder", "_ended", "_pieces")

    def __init__(self, response: aiohttp.ClientResponse, open_bodies: WeakSet[_Body]) -> None:
        super().__init__(response, open_bodies)
        self._checked = False
        self._decoder: BodyDecoder | None = None  # None: `identity`
        # The pieces of the last read, taken one at a time: a read that expands without end
        # meets the SSE decoder's limits a piece at a time, never all in memory.
        self._pieces: Iterator[bytes] = iter(())
        self._ended = False

    async def __anext__(self) -> bytes:
        if not self._checked:
            self._checked = True
            self._decoder = body_decoder(self._response.headers)
        decoder = self._decoder
        if decoder is None:
            return await super().__anext__()
        while True:
            piece = next(self._pieces, None)
            if piece is not None:
                return piece
            if self._ended:
                raise StopAsyncIteration
            try:
                data = await super().__anext__()
            except StopAsyncIteration:
                self._ended = True
                self._pieces = decoder.flush()
                continue
            self._pieces = decoder.decode(data)


class AiohttpTransport(AsyncBaseTransport):
    """Async transport on `aiohttp.ClientSession`, for thousands of streams; asyncio only.

    `max_connections` and `max_connections_per_host` bound the connector (None: no limit, the
    default, since every open stream holds a connection). `keepalive_timeout` is how long an
    idle connection stays pooled. `verify` is True, False, or a CA bundle path. Pass your own
    `session` to control everything else; it is not closed by `aclose()`. Make it with
    `auto_decompress=False`, so that the transport decodes what a proxy compressed (as the
    other transports do), and an error status in an encoding nobody decodes keeps its status.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession | None = None,
        *,
        max_connections: int | None = None,
        max_connections_per_host: int | None = None,
        keepalive_timeout: float = 15.0,
        verify: bool | str = True,
    ) -> None:
        self._owns_session = session is None
        self._session = session
        self._closed = False
        # Bodies not yet finished or closed: `aclose()` closes them. aiohttp's own close leaves
        # a read blocked on one of them waiting until the clients' idle timeout. Weakly: one
        # dropped unclosed is aiohttp's to release when it is garbage (held here, its
        # connection stayed in use until `aclose()`).
        self._open: WeakSet[_Body] = WeakSet()
        self.max_connections = max_connections
        self.max_connections_per_host = max_connections_per_host
        self.keepalive_timeout = keepalive_timeout
        self.verify = verify
        self._proxies: dict[str, str | None] = {}  # per origin, see `_proxy_for`
        self._loop: object = None  # the event loop our own session belongs to (`same_loop`)

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """The session in use; None until the first request if the transport made its own."""
        return self._session

    def _new_session(self) -> aiohttp.ClientSession:
        context: ssl.SSLContext | bool = self.verify is not False
        if isinstance(self.verify, str):
            context = ssl.create_default_context(cafile=self.verify)
        connector = aiohttp.TCPConnector(
            limit=self.max_connections or 0,  # 0 is aiohttp's "no limit"
            limit_per_host=self.max_connections_per_host or 0,
            keepalive_timeout=self.keepalive_timeout,
            ssl=context,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # `_DecodedBody` decodes: see the module docstring
            timeout=aiohttp.ClientTimeout(total=None),
        )

    def _proxy_for(self, url: str) -> str | None:
        """The proxy `HTTP(S)_PROXY` / `ALL_PROXY` / `NO_PROXY` name for `url`'s origin, read
        once per origin.

        What requests and httpx do by default. Not aiohttp's `trust_env=True`: that also looks
        up ~/.netrc on every request (in a worker thread) and refuses a request whose host is
        there, since it carries an `authorization` header of its own.
        """
        # Scheme and host: an https URL may have a proxy of its own.
        origin = "/".join(url.split("/", 3)[:3])
        if origin not in self._proxies:
            proxy = env_proxy(url)
            if len(self._proxies) < 64:
                self._proxies[origin] = proxy
            return proxy
        return self._proxies[origin]

    async def send(self, request: Request) -> AsyncResponse:
        _require_asyncio()
        session = self._session
        if session is None:
            if self._closed:
                raise LocalProtocolError("AiohttpTransport is closed: cannot send another request")
            session = self._session = self._new_session()
        if self._owns_session:
            self._loop = same_loop(self._loop, asyncio.get_running_loop(), "AiohttpTransport")
        try:
            response = await session.request(
                request.method,
                request.url,
                headers=[(_header_name(name), value) for name, value in request.headers],
                data=request.content,
                timeout=_client_timeout(request.timeouts),
                allow_redirects=False,
                proxy=self._proxy_for(request.url) if self._owns_session else None,
            )
        except _ERRORS as exc:
            raise _translate(exc, request) from exc
        if "content-encoding" in response.headers and not session.auto_decompress:
            body: _Body = _DecodedBody(response, self._open)
        else:
            body = _Body(response, self._open)
        return AsyncResponse(
            response.status,
            response.headers,  # case-insensitive already: no copy per stream
            body,
            body.close_response,
        )

    async def aclose(self) -> None:
        """Close the session this transport made (a session passed in is left open)."""
        if self._owns_session and self._session is not None:
            # Only the loop that made the session can close its connections (see the httpx
            # transport): said clearly, not a quiet return that strands them.
            closing_elsewhere(self._loop, asyncio.get_running_loop(), "AiohttpTransport")
        self._closed = True
        while self._open:
            self._open.pop().close()
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()
