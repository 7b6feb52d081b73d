"""Scripted transports for users' own tests: no sockets, responses as lists of byte chunks.

`MockTransport(handler)` calls `handler(request)` for each request; the handler returns a
`MockResponse` (status, headers, body chunks, a delay before each chunk, and an optional fault
raised after the chunks). A list of `MockResponse`s works too: each request takes the next
one, and a request after the last one raises `LocalProtocolError` (the script is wrong, so no
retry can help). Delays really wait (`time.sleep` / `anyio.sleep`), so the clients' timeouts
can be exercised.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import final

import anyio
import attrs

from holysheep._exceptions import APIConnectionError, LocalProtocolError
from holysheep._exchange import Request
from holysheep.transports._base import AsyncBaseTransport, AsyncResponse, BaseTransport, Response

__all__ = ["AsyncMockTransport", "MockResponse", "MockTransport", "sse_body"]


def sse_body(*texts: str, finish_reason: str = "stop", model: str = "mock") -> list[bytes]:
    """The chunks of a well-formed chat stream whose content pieces are `texts`."""
    import json

    def event(delta: dict[str, object], finish: str | None = None) -> bytes:
        chunk = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    return [
        event({"role": "assistant", "content": ""}),
        *(event({"content": text}) for text in texts),
        event({}, finish_reason),
        b"data: [DONE]\n\n",
    ]


def _over_defaults(headers: Mapping[str, str]) -> dict[str, str]:
    """The given headers over `content-type: text/event-stream`, names in lower case: adding
    an `x-request-id` must not turn a stream into an unexpected content type."""
    return {"content-type": "text/event-stream", **{k.lower(): v for k, v in headers.items()}}


@final
@attrs.frozen
class MockResponse:
    """One scripted response.

    `headers` are added to the default `content-type: text/event-stream` (a given content
    type replaces it; names are case-insensitive). `delay` is waited before each chunk
    (seconds); `fault`, if set, is raised after the last chunk as the transport's
    `APIConnectionError` (a dropped connection).
    """

    status_code: int = 200
    chunks: Sequence[bytes] = attrs.field(factory=lambda: sse_body("Hello", "!"))
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_over_defaults)
    delay: float = 0.0
    fault: str | None = None


Handler = Callable[[Request], MockResponse]


def _as_handler(script: Handler | Sequence[MockResponse]) -> Handler:
    if callable(script):
        return script
    responses = list(script)
    scripted = len(responses)
    lock = threading.Lock()

    def next_response(request: Request) -> MockResponse:
        # A mistake in the test's script, not a network fault: LocalProtocolError is never
        # retried, where an APIConnectionError would be, with backoff, for seconds.
        with lock:
            if not responses:
                raise LocalProtocolError(
                    f"the MockTransport script ran out: it had {scripted} response"
                    f"{'' if scripted == 1 else 's'}, all used, and {request.method} "
                    f"{request.url} asked for one more"
                )
            return responses.pop(0)

    return next_response


class MockTransport(BaseTransport):
    """A sync transport that answers from a script; `requests` records what was sent."""

    def __init__(self, script: Handler | Sequence[MockResponse]) -> None:
        self._handler = _as_handler(script)
        self.requests: list[Request] = []

    def send(self, request: Request) -> Response:
        self.requests.append(request)
        mock = self._handler(request)
        closed = threading.Event()

        def body() -> Iterator[bytes]:
            for chunk in mock.chunks:
                if mock.delay and closed.wait(mock.delay):
                    return
                if closed.is_set():
                    return
                yield chunk
            if mock.fault is not None:
                raise APIConnectionError(mock.fault)

        return Response(mock.status_code, dict(mock.headers), body(), closed.set)


class AsyncMockTransport(AsyncBaseTransport):
    """The async twin of `MockTransport`."""

    def __init__(self, script: Handler | Sequence[MockResponse]) -> None:
        self._handler = _as_handler(script)
        self.requests: list[Request] = []

    async def send(self, request: Request) -> AsyncResponse:
        self.requests.append(request)
        mock = self._handler(request)
        closed = anyio.Event()

        async def body() -> AsyncIterator[bytes]:
            for chunk in mock.chunks:
                if mock.delay:
                    with anyio.move_on_after(mock.delay):
                        await closed.wait()
                if closed.is_set():
                    return
                yield chunk
            if mock.fault is not None:
                raise APIConnectionError(mock.fault)

        async def aclose() -> None:
            closed.set()

        return AsyncResponse(mock.status_code, dict(mock.headers), body(), aclose)
