"""Scripted transports for users' own tests: no sockets, responses as lists of byte chunks.

`MockTransport(handler)` calls `handler(request)` for each request; the handler returns a
`MockResponse` (status, headers, body chunks, a delay before each chunk, and an optional fault
raised after the chunks). `AsyncMockTransport` also takes an `async def` handler. A list of
`MockResponse`s works too: each request takes the next one, and a request after the last one
raises `LocalProtocolError` (the script is wrong, so no retry can help). Delays really wait
(`time.sleep` / `anyio.sleep`), so the clients' timeouts can be exercised.

Mistakes in a script are the test's own, so they raise `TypeError` where they are made (a
`MockResponse` built with a bad `chunks`, a handler returning something else), naming what was
given, rather than surfacing later as an obscure error from inside the client.
"""

from __future__ import annotations

import inspect
import reprlib
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import final

import anyio
import anyio.lowlevel
import attrs

from holysheep._exceptions import APIConnectionError, LocalProtocolError
from holysheep._exchange import Request
from holysheep.transports._base import AsyncBaseTransport, AsyncResponse, BaseTransport, Response

__all__ = ["AsyncMockTransport", "MockResponse", "MockTransport", "sse_body"]


def sse_body(
    *texts: str,
    finish_reason: str = "stop",
    model: str = "mock",
    usage: bool | Mapping[str, int] = False,
) -> list[bytes]:
    """The chunks of a well-formed chat stream whose content pieces are `texts`.

    `usage=True` adds the usage chunk the real API sends before `[DONE]` (the clients ask for
    it), counting a token a piece and a prompt of 0; a mapping is sent as the usage object.
    """
    import json

    def event(delta: dict[str, object] | None, finish: str | None = None, **extra: object) -> bytes:
        chunk: dict[str, object] = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": []
            if delta is None
            else [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    chunks = [
        event({"role": "assistant", "content": ""}),
        *(event({"content": text}) for text in texts),
        event({}, finish_reason),
    ]
    if usage is not False:
        counts = (
            dict(usage)
            if isinstance(usage, Mapping)
            else {"prompt_tokens": 0, "completion_tokens": len(texts), "total_tokens": len(texts)}
        )
        chunks.append(event(None, usage=counts))  # no choices, as OpenAI sends it
    return [*chunks, b"data: [DONE]\n\n"]


def _over_defaults(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The given headers over `content-type: text/event-stream`, names in lower case: adding
    an `x-request-id` must not turn a stream into an unexpected content type. None: none."""
    given = headers or {}
    if not isinstance(given, Mapping):
        raise TypeError(
            f"MockResponse headers must be a mapping of names to values, like "
            f"{{'retry-after': '2'}}; got {reprlib.repr(given)}"
        )
    headers = {"content-type": "text/event-stream"}
    pairs: Iterable[tuple[object, object]] = given.items()  # whatever the test wrote
    for name, value in pairs:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)  # `{"retry-after": 2}`, as the clients take it from a transport
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(
                f"MockResponse headers are str names and str values, as on the wire; "
                f"{name!r}: {value!r} is not"
            )
        headers[name.lower()] = value
    return headers


def _status(instance: object, attribute: object, status: object) -> None:
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise TypeError(f"MockResponse status_code must be an int from 100 to 599; got {status!r}")


def _delay(instance: object, attribute: object, delay: object) -> None:
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not delay >= 0:
        raise TypeError(f"MockResponse delay is seconds, a number of 0 or more; got {delay!r}")


def _fault(instance: object, attribute: object, fault: str | None) -> None:
    if fault is not None and not isinstance(fault, str):
        raise TypeError(
            "MockResponse fault is the message of the APIConnectionError raised after the "
            f"chunks (a str), or None; got {reprlib.repr(fault)}"
        )


def _as_chunks(chunks: Iterable[bytes]) -> tuple[bytes, ...]:
    """A tuple, so the response can be served again (a retry, a handler returning the same
    one): a generator would be empty the second time, and the stream end without `[DONE]`."""
    if isinstance(chunks, str | bytes | bytearray | memoryview):
        # Iterating one would yield characters or ints, failing far from here.
        raise TypeError(
            f"MockResponse chunks must be a list of bytes, one per read, not a single "
            f"{type(chunks).__name__} value: pass [{reprlib.repr(chunks)}]"
        )
    try:
        return tuple(chunks)
    except TypeError:
        raise TypeError(
            f"MockResponse chunks must be a list of bytes, one per read; got {reprlib.repr(chunks)}"
        ) from None


def _all_bytes(instance: object, attribute: object, chunks: Sequence[object]) -> None:
    for index, chunk in enumerate(chunks):
        if isinstance(chunk, bytes):
            continue
        hint = (
            "encode it (b'...' or text.encode())"
            if isinstance(chunk, str)
            else "each must be bytes"
        )
        raise TypeError(
            f"MockResponse chunks[{index}] is a {type(chunk).__name__}, "
            f"{reprlib.repr(chunk)}: {hint}"
        )


@final
@attrs.frozen
class MockResponse:
    """One scripted response.

    `chunks` is a list of bytes, each delivered as one read (kept as a tuple, so a response
    can be served more than once). `headers` are added to the default
    `content-type: text/event-stream` (a given content type replaces it; names are
    case-insensitive; None adds none). `delay` is waited before each chunk (seconds); `fault`,
    if set, is raised after the last chunk as the transport's `APIConnectionError` (a dropped
    connection).
    """

    status_code: int = attrs.field(default=200, validator=_status)
    chunks: tuple[bytes, ...] = attrs.field(
        factory=lambda: tuple(sse_body("Hello", "!")), converter=_as_chunks, validator=_all_bytes
    )
    # Out of the hash (a dict has none), not out of equality: a response can go in a set.
    headers: Mapping[str, str] = attrs.field(factory=dict, converter=_over_defaults, hash=False)
    delay: float = attrs.field(default=0.0, validator=_delay)
    fault: str | None = attrs.field(default=None, validator=_fault)


Handler = Callable[[Request], MockResponse]
AsyncHandler = Callable[[Request], MockResponse | Awaitable[MockResponse]]


def _as_handler(
    script: Callable[[Request], object] | Sequence[MockResponse],
) -> Callable[[Request], object]:
    if callable(script):
        return script
    given: object = script  # the types say a MockResponse cannot be here; a test may say otherwise
    if isinstance(given, MockResponse):
        raise TypeError(
            "a MockTransport script is a handler or a list of MockResponses: pass [response]"
        )
    responses = list(script)
    for index, response in enumerate(responses):
        if not isinstance(response, MockResponse):
            raise TypeError(
                f"a MockTransport script holds MockResponses; item {index} is a "
                f"{type(response).__name__}, {reprlib.repr(response)}"
            )
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


def _checked(result: object) -> MockResponse:
    """The handler's answer, which must be a `MockResponse`: anything else would fail later,
    inside the client, with an error that does not point at the handler."""
    if isinstance(result, MockResponse):
        return result
    hint = ""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # it will never run: no "never awaited" warning on top
        hint = " (an async handler needs AsyncMockTransport)"
    raise TypeError(
        f"a MockTransport handler must return a MockResponse; it returned "
        f"{reprlib.repr(result)}{hint}"
    )


def _wait_for(delay: float) -> float | None:
    """`delay` as `Event.wait` takes it: None (until closed) past what it can wait, such as
    `float("inf")`, a response that never comes (`wait` overflowed)."""
    return None if delay > threading.TIMEOUT_MAX else delay


class _Closing:
    """Being closed, as the two mocks share it with the real transports: the bodies still
    being read end (`_open` holds the events that end them), and a later request is refused."""

    def __init__(self) -> None:
        self._closed = False
        self._open: set[threading.Event | anyio.Event] = set()

    def _close_all(self) -> None:
        self._closed = True
        for closed in list(self._open):
            closed.set()

    def _check_open(self) -> None:
        # As the real transports say it: a test that shares a mock between clients meets what
        # sharing a real transport does, once the first client is closed.
        if self._closed:
            raise LocalProtocolError(
                f"{type(self).__name__} is closed: cannot send another request"
            )

    def _cut_short(self) -> None:
        # A body ended by its response's own close ends quietly; one ended by closing the
        # whole transport fails, as a read from a closed pool's connection does.
        if self._closed:
            raise APIConnectionError(
                f"{type(self).__name__} was closed while this body was being read"
            )


class MockTransport(_Closing, BaseTransport):
    """A sync transport that answers from a script; `requests` records what was sent.

    `close()` ends every body still being read, and a request sent after it raises
    `LocalProtocolError`, as with the real transports.
    """

    def __init__(self, script: Handler | Sequence[MockResponse]) -> None:
        self._handler = _as_handler(script)
        self.requests: list[Request] = []
        super().__init__()

    def close(self) -> None:
        self._close_all()

    def send(self, request: Request) -> Response:
        self._check_open()
        self.requests.append(request)
        mock = _checked(self._handler(request))
        closed = threading.Event()
        self._open.add(closed)

        def close() -> None:
            closed.set()
            self._open.discard(closed)

        def body() -> Iterator[bytes]:
            for chunk in mock.chunks:
                if mock.delay:
                    closed.wait(_wait_for(mock.delay))
                if closed.is_set():
                    self._cut_short()
                    return
                yield chunk
            if mock.fault is not None:
                raise APIConnectionError(mock.fault)

        return Response(mock.status_code, dict(mock.headers), body(), close)


class AsyncMockTransport(_Closing, AsyncBaseTransport):
    """The async twin of `MockTransport`; its handler may also be an `async def`.

    Each chunk is a checkpoint, as a socket read is: other tasks run, and a cancel scope or
    timeout around the stream fires, even with no `delay`.
    """

    def __init__(self, script: AsyncHandler | Sequence[MockResponse]) -> None:
        self._handler = _as_handler(script)
        self.requests: list[Request] = []
        super().__init__()

    async def aclose(self) -> None:
        self._close_all()

    async def send(self, request: Request) -> AsyncResponse:
        self._check_open()
        self.requests.append(request)
        result = self._handler(request)
        if inspect.isawaitable(result):
            result = await result
        mock = _checked(result)
        closed = anyio.Event()
        self._open.add(closed)

        async def body() -> AsyncIterator[bytes]:
            for chunk in mock.chunks:
                if mock.delay:
                    with anyio.move_on_after(mock.delay):
                        await closed.wait()
                else:
                    # A read without one would hand over every chunk in one turn of the loop:
                    # a task meant to stop the stream after the first never ran.
                    await anyio.lowlevel.checkpoint()
                if closed.is_set():
                    self._cut_short()
                    return
                yield chunk
            if mock.fault is not None:
                raise APIConnectionError(mock.fault)

        async def aclose() -> None:
            closed.set()
            self._open.discard(closed)

        return AsyncResponse(mock.status_code, dict(mock.headers), body(), aclose)
