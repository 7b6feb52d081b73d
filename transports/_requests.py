"""The default sync transport, on `requests` (urllib3 underneath)."""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import requests
import requests.adapters
import urllib3

from holysheep._exceptions import (
    APIConnectionError,
    LocalProtocolError,
)
from holysheep._exchange import Request
from holysheep.transports._base import (
    BaseTransport,
    Response,
    causes,
    check_encoding,
    connect_error,
    connect_timeout,
)

__all__ = ["RequestsTransport"]

# urllib3 hands out at most this many bytes per read; big enough that a fast stream costs few
# calls, and `read1`/chunked reads return as soon as anything arrives, so it never delays one.
_READ_SIZE = 64 * 1024


class RequestsTransport(BaseTransport):
    """Streams over a `requests.Session` with a pool sized for many concurrent streams.

    `max_connections` bounds the pool per host (requests' default of 10 would make the 11th
    concurrent stream from a thread pool open and drop a fresh connection each time).

    Proxy and CA-bundle settings from the environment (`HTTPS_PROXY`, `NO_PROXY`,
    `REQUESTS_CA_BUNDLE`, ...) are read once per origin, on its first request, as httpx does:
    `requests` re-reads the whole environment for every request, which costs more than
    parsing a short stream.
    """

    def __init__(
        self,
        session: requests.Session | None = None,
        *,
        max_connections: int = 100,
        verify: bool | str | None = None,
    ) -> None:
        self._owns_session = session is None
        self.session = session if session is not None else requests.Session()
        if self._owns_session:
            adapter = requests.adapters.HTTPAdapter(
                pool_connections=4, pool_maxsize=max_connections, max_retries=0
            )
            self.session.mount("http://", adapter)
            self.session.mount("https://", adapter)
        # None: the session's own `verify` (True for ours), so a session set up for a private
        # CA is used as it is; a value given here wins over it.
        self.verify = verify
        self._settings: dict[str, Any] = {}
        self._closed = False

    def send(self, request: Request) -> Response:
        if self._closed:
            raise LocalProtocolError("RequestsTransport is closed: cannot send another request")
        t = request.timeouts
        session = self.session
        try:
            prepared = session.prepare_request(
                requests.Request(
                    request.method,
                    request.url,
                    data=request.content,
                    headers=dict(request.headers),
                    # Our `authorization` header as it is: without an `auth` of its own, requests
                    # looks up ~/.netrc for the host on every request and replaces the API key
                    # with the Basic credentials it finds there. A session's own auth (a
                    # signer, say) still applies.
                    auth=session.auth or _as_is,
                )
            )
            origin = request.url.split("/", 3)[2]
            settings = self._settings.get(origin)
            if settings is None:
                settings = session.merge_environment_settings(
                    request.url, {}, True, self.verify, None
                )
                self._settings[origin] = settings
            # The connect, too, within what the head may take: a connection made slowly (a
            # blackholed host, a full backlog) must not outlast `ttft` or `total`, which the
            # sync client cannot cut short while the transport sends.
            head = t.head_timeout()
            response = session.send(
                prepared, timeout=(head, head), allow_redirects=False, **settings
            )
        except requests.exceptions.ConnectTimeout as exc:
            raise connect_timeout(request) from exc
        except requests.exceptions.ReadTimeout as exc:
            raise APIConnectionError(f"no response head from {request.url}: {exc}") from exc
        except requests.exceptions.ConnectionError as exc:
            if _never_sent(exc):
                raise connect_error(request, exc) from exc
            raise APIConnectionError(f"could not reach {request.url}: {exc}") from exc
        except requests.exceptions.RequestException as exc:
            raise APIConnectionError(f"could not reach {request.url}: {exc}") from exc
        raw: urllib3.HTTPResponse = response.raw
        # The head arrived; from here the clients' ttft/idle timers rule, and the socket
        # timeout is only a backstop in case a timer fails.
        sock = _socket_of(raw)
        if sock is not None:
            sock.settimeout(t.read_backstop())
        headers = {name.lower(): value for name, value in response.headers.items()}
        return Response(response.status_code, headers, *_body_and_closer(response))

    def close(self) -> None:
        self._closed = True
        if self._owns_session:
            self.session.close()


def _as_is(prepared: requests.PreparedRequest) -> requests.PreparedRequest:
    return prepared


def _never_sent(exc: requests.exceptions.ConnectionError) -> bool:
    """Whether the connection failed before the request went out (refused, DNS, TLS).

    requests raises one `ConnectionError` for that and for a connection that broke after the
    request was sent; urllib3's reason inside tells them apart. A TLS error is one only when
    the certificate was refused: urllib3 reports any TLS error as `SSLError`, one that broke a
    response the server was already answering too.
    """
    if isinstance(exc, requests.exceptions.ProxyError):
        return True  # urllib3 wraps only errors before the proxy connection is made
    if isinstance(exc, requests.exceptions.SSLError):
        return any(isinstance(cause, ssl.SSLCertVerificationError) for cause in causes(exc))
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, urllib3.exceptions.MaxRetryError):
        reason = reason.reason
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _body_and_closer(
    response: requests.Response,
) -> tuple[Iterator[bytes], Callable[[], None], Callable[[], None]]:
    raw: urllib3.HTTPResponse = response.raw
    finished = False

    def body() -> Iterator[bytes]:
        nonlocal finished
        check_encoding(raw.headers.get("content-encoding"), raw.CONTENT_DECODERS)
        try:
            if raw.chunked and raw.supports_chunked_reads():
                yield from raw.read_chunked(_READ_SIZE, decode_content=True)
            else:
                read1 = raw.read1
                while data := read1(_READ_SIZE, decode_content=True):
                    yield data
        except (urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError) as exc:
            # ValueError/AttributeError: the response was closed under us from another thread.
            raise APIConnectionError(
                f"the connection failed while reading the stream: {exc}"
            ) from exc
        finished = True

    def interrupt() -> None:
        # Wakes a read blocked in another thread; the socket stays open until `close`.
        if not finished:
            sock = _socket_of(raw)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close() -> None:
        # Shut the socket down first: close() alone does not wake a thread blocked in
        # recv(), and an unfinished body must not go back to the pool.
        interrupt()
        response.close()

    return body(), close, interrupt


def _socket_of(raw: urllib3.HTTPResponse) -> socket.socket | None:
    connection = getattr(raw, "_connection", None) or getattr(raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if isinstance(sock, socket.socket):
        return sock
    # The connection may already be back in the pool; reach the socket through the body file.
    fp = getattr(getattr(raw, "_fp", None), "fp", None)
    sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None
