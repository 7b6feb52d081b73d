"""A custom transport written by a user: holysheep on plain urllib3, in about 100 lines.

Run against the embedded upstream: python examples/urllib3_transport.py
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import urllib3

import holysheep
from holysheep.transports import BaseTransport, Request, Response


class Urllib3Transport(BaseTransport):
    def __init__(self) -> None:
        self.pool = urllib3.PoolManager(maxsize=100, retries=False)

    def send(self, request: Request) -> Response:
        t = request.timeouts
        try:
            response = self.pool.request(
                request.method,
                request.url,
                body=request.content,
                headers=dict(request.headers),
                preload_content=False,  # stream the body
                # Bound the wait for the response head: a server may accept and never answer.
                timeout=urllib3.Timeout(connect=t.connect, read=t.head_timeout()),
            )
        except urllib3.exceptions.NewConnectionError as exc:  # refused, DNS: nothing was sent
            raise holysheep.ConnectError(f"could not connect to {request.url}: {exc}") from exc
        except urllib3.exceptions.ConnectTimeoutError as exc:  # translate at the edge
            limit = t.connect or 0.0
            raise holysheep.ConnectTimeoutError(
                f"connect timeout: no connection to {request.url} within {limit:g} s",
                limit=limit,
                elapsed=limit,
            ) from exc
        except (urllib3.exceptions.HTTPError, ValueError) as exc:  # ValueError: a bad header
            raise holysheep.APIConnectionError(f"could not reach {request.url}: {exc}") from exc
        # The head arrived: from here the client's ttft and idle timers rule, and the socket
        # timeout is only a backstop (the head timeout would cut a slow stream short). Reach
        # the socket through the body file: a body that ends when the server closes (no
        # length, no chunking) takes it from the connection, whose `sock` is then None.
        sock = None
        with contextlib.suppress(AttributeError):
            sock = response._fp.fp.raw._sock  # http.client response, buffered file, socket
            sock.settimeout(t.read_backstop())

        done = []

        def body() -> Iterator[bytes]:
            # urllib3 decodes gzip and deflate (a proxy may compress); anything else would
            # reach the SSE decoder as noise.
            encoding = response.headers.get("content-encoding", "identity").lower()
            if encoding not in ("identity", *response.CONTENT_DECODERS):
                raise holysheep.RemoteProtocolError(f"cannot decode Content-Encoding {encoding}")
            try:
                if response.chunked:
                    yield from response.read_chunked(decode_content=True)
                else:
                    yield from iter(lambda: response.read1(65536), b"")
            except (urllib3.exceptions.HTTPError, OSError, ValueError, AttributeError) as exc:
                # ValueError, AttributeError: close() in another thread closed the response.
                raise holysheep.APIConnectionError(f"stream broke: {exc}") from exc
            done.append(True)

        def interrupt() -> None:
            # From another thread while a read may be under way: wake it, and leave the close
            # to the reading thread (a socket closed under a read lends its number out).
            if sock is not None and not done:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        def close() -> None:
            # A finished body returns its connection to the pool; an abandoned one is closed,
            # so the server sees the client leave. Shut down first: a read blocked in another
            # thread holds the body file's lock, and close() alone would wait for the server.
            if done:
                response.release_conn()
            else:
                interrupt()
                response.close()

        headers = {name.lower(): value for name, value in response.headers.items()}
        return Response(response.status, headers, body(), close, interrupt)

    def close(self) -> None:
        self.pool.clear()


def main() -> None:
    from holysheep.testing import serve

    with (
        serve() as upstream,
        holysheep.Client(
            api_key="unused", base_url=upstream.base_url, transport=Urllib3Transport()
        ) as client,
    ):
        completion = client.chat.complete(
            model="gpt-4.1", messages=[{"role": "user", "content": "Say hello"}]
        )
        print(completion.text)


if __name__ == "__main__":
    main()
