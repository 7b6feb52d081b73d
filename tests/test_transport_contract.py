"""What the clients make of what a transport hands them, including a user's transport that
bends the rules in docs/transports.md."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import pytest

import holysheep
from holysheep import LocalProtocolError, RetryPolicy
from holysheep._exchange import Request
from holysheep.transports import (
    AsyncBaseTransport,
    AsyncMockTransport,
    AsyncResponse,
    BaseTransport,
    MockResponse,
    MockTransport,
    Response,
    sse_body,
)

MESSAGES = [{"role": "user", "content": "hi"}]
SSE = {"content-type": "text/event-stream"}


def with_empty_pieces() -> list[bytes]:
    """A well-formed stream with empty pieces first, between events and inside one: what a
    decompressor or a generator may yield."""
    body = sse_body("Hello", " world")
    return [b"", body[0], b"", body[1][:7], b"", body[1][7:], *body[2:], b""]


def test_empty_pieces_of_a_body_are_not_its_end() -> None:
    """The sync client skips an empty piece and reads on."""
    transport = MockTransport([MockResponse(chunks=with_empty_pieces())])
    with holysheep.Client(api_key="k", base_url="http://mock/v1", transport=transport) as client:
        assert "Hello world" == client.chat.complete(model="m", messages=MESSAGES).text


@pytest.mark.anyio
async def test_async_empty_pieces_of_a_body_are_not_its_end() -> None:
    """An empty piece ended the async stream there, as if the body had: the text was lost, as
    IncompleteStreamError with 0 characters kept."""
    transport = AsyncMockTransport([MockResponse(chunks=with_empty_pieces())])
    async with holysheep.AsyncClient(
        api_key="k", base_url="http://mock/v1", transport=transport
    ) as client:
        completion = await client.chat.complete(model="m", messages=MESSAGES)
    assert "Hello world" == completion.text


class _Pieces(BaseTransport):
    """A user's transport whose body yields `pieces` as they are, whatever their type."""

    def __init__(self, pieces: Sequence[object]) -> None:
        self.pieces = pieces

    def send(self, request: Request) -> Response:
        return Response(200, SSE, iter(self.pieces))  # type: ignore[arg-type]


class _AsyncPieces(AsyncBaseTransport):
    def __init__(self, pieces: Sequence[object]) -> None:
        self.pieces = pieces

    async def send(self, request: Request) -> AsyncResponse:
        async def body() -> AsyncIterator[object]:
            for piece in self.pieces:
                yield piece

        return AsyncResponse(200, SSE, body())  # type: ignore[arg-type]


def _text_pieces() -> Iterator[object]:
    first, *rest = sse_body("Hi")
    yield first
    yield rest[0].decode()  # a str: the transport forgot to encode


@pytest.mark.parametrize(
    ("piece", "named"), [("str", "str"), (None, "NoneType"), (7, "int")], ids=["str", "none", "int"]
)
def test_a_body_piece_that_is_not_bytes_is_named(piece: object, named: str) -> None:
    """A transport that yields something other than bytes gets an error saying so, instead of
    a TypeError or AttributeError from deep inside the decoder."""
    pieces = [sse_body("Hi")[0], piece]
    transport = _Pieces(pieces)
    client = holysheep.Client(
        api_key="k", base_url="http://mock/v1", transport=transport, retry=RetryPolicy.none()
    )
    with pytest.raises(LocalProtocolError, match=f"must yield bytes, but it yielded {named}"):
        client.chat.complete(model="m", messages=MESSAGES)
    client.close()


@pytest.mark.anyio
@pytest.mark.parametrize("piece", ["str", None], ids=["str", "none"])
async def test_async_a_body_piece_that_is_not_bytes_is_named(piece: object) -> None:
    """The same on the async client (a None read was taken for a read cut short, and raised
    "deadline scope expired without a due timeout")."""
    transport = _AsyncPieces([sse_body("Hi")[0], piece])
    async with holysheep.AsyncClient(
        api_key="k", base_url="http://mock/v1", transport=transport, retry=RetryPolicy.none()
    ) as client:
        with pytest.raises(LocalProtocolError, match="must yield bytes"):
            await client.chat.complete(model="m", messages=MESSAGES)


def test_bytearray_and_memoryview_pieces_are_taken_as_bytes() -> None:
    """Bytes-like pieces are what many socket APIs return: taken as they are."""
    body = sse_body("Hel", "lo")
    pieces = [bytearray(body[0]), memoryview(body[1]), *body[2:]]
    with holysheep.Client(api_key="k", base_url="http://mock/v1", transport=_Pieces(pieces)) as c:
        assert "Hello" == c.chat.complete(model="m", messages=MESSAGES).text


class _MixedCaseHeaders(BaseTransport):
    """A user's transport handing over the server's header names as a plain dict, unlowered."""

    def __init__(self, status: int, headers: dict[str, str], body: list[bytes]) -> None:
        self.status, self.headers, self.body = status, headers, body

    def send(self, request: Request) -> Response:
        return Response(self.status, self.headers, iter(self.body))


def test_a_plain_dict_of_mixed_case_headers_is_read() -> None:
    """`Content-Type` in a plain dict was missed: "the server sent '(none)'" blamed the server,
    and the request id and Retry-After were lost with it."""
    headers = {"Content-Type": "text/event-stream", "X-Request-ID": "req-7"}
    transport = _MixedCaseHeaders(200, headers, sse_body("Hi"))
    with (
        holysheep.Client(api_key="k", base_url="http://mock/v1", transport=transport) as client,
        client.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        assert "Hi" == "".join(chunk.text for chunk in stream)
    assert "req-7" == stream.request_id
    # A lower-case content-type does not mean the others are: each one is found.
    limited = _MixedCaseHeaders(429, {"content-type": "application/json", "Retry-After": "7"}, [])
    client = holysheep.Client(
        api_key="k", base_url="http://mock/v1", transport=limited, retry=RetryPolicy.none()
    )
    with pytest.raises(holysheep.RateLimitError) as info:
        client.chat.complete(model="m", messages=MESSAGES)
    assert 7.0 == info.value.retry_after
    client.close()


def test_reading_on_after_an_iteration_stopped_early_is_an_error() -> None:
    """`next(iter(stream))` then `for chunk in stream`: the first iterator, dropped, closed the
    stream, and the loop then saw nothing, as if the answer had ended there."""
    transport = MockTransport([MockResponse(chunks=sse_body("Hel", "lo"))])
    with (
        holysheep.Client(api_key="k", base_url="http://mock/v1", transport=transport) as client,
        client.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        next(iter(stream))
        with pytest.raises(LocalProtocolError, match="closed before its end"):
            list(stream)
    assert "" == stream.completion.text  # the role chunk only: nothing lost unsaid


def test_iterating_a_finished_stream_again_gives_nothing_more() -> None:
    """A stream read to its end is an exhausted iterator, not an error."""
    transport = MockTransport([MockResponse(chunks=sse_body("Hi"))])
    with (
        holysheep.Client(api_key="k", base_url="http://mock/v1", transport=transport) as client,
        client.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        assert "Hi" == "".join(stream.text_stream())
        assert [] == list(stream)


def test_a_stream_that_ended_without_a_finish_can_be_read_again() -> None:
    """With `require_end=False` a stream may end with neither `[DONE]` nor a finish_reason;
    reading it again after that end gives nothing more, not a "closed before its end" error."""
    body = sse_body("Hi")[:2]  # the role chunk and the text; no finish, no [DONE]
    transport = MockTransport([MockResponse(chunks=body)])
    with (
        holysheep.Client(
            api_key="k", base_url="http://mock/v1", transport=transport, require_end=False
        ) as client,
        client.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        assert "Hi" == stream.until_done().text
        assert ([], "") == (list(stream), "".join(stream.text_stream()))


# -- a user's transport that breaks the rules: the clients say so, and lose nothing -----------


class _Blocking(BaseTransport):
    """Sends a first event, then blocks until closed: a stalled stream. `interrupt` raises, as
    a user's may, when `bad_interrupt`."""

    def __init__(self, bad_interrupt: bool) -> None:
        self.bad_interrupt = bad_interrupt

    def send(self, request: Request) -> Response:
        import threading

        closed = threading.Event()

        def body() -> Iterator[bytes]:
            yield sse_body("Hello")[1]
            closed.wait(10)

        def interrupt() -> None:
            raise OSError(107, "Transport endpoint is not connected")

        return Response(
            200, SSE, body(), closed.set, interrupt if self.bad_interrupt else closed.set
        )


def test_an_interrupt_that_raises_leaves_the_watchdog_running() -> None:
    """A raising `interrupt` ended the watchdog thread: that stream stayed blocked, and every
    later stream of the client had no timeouts. It is a warning now; the response is closed
    instead, and the other streams keep their timeouts."""
    bad = holysheep.Client(
        api_key="k",
        base_url="http://mock/v1",
        transport=_Blocking(bad_interrupt=True),
        timeout=holysheep.Timeouts(idle=0.2),
        retry=RetryPolicy.none(),
    )
    warned = pytest.warns(RuntimeWarning, match="_Blocking: interrupting a read raised OSError")
    with warned, pytest.raises(holysheep.IdleTimeoutError) as info:
        bad.chat.complete(model="m", messages=MESSAGES)
    assert info.value.completion is not None
    assert "Hello" == info.value.completion.text
    bad.transport = _Blocking(bad_interrupt=False)  # the same client, its watchdog still on
    with pytest.raises(holysheep.IdleTimeoutError):
        bad.chat.complete(model="m", messages=MESSAGES)
    bad.close()


class _CloseRaises(MockTransport):
    def send(self, request: Request) -> Response:
        response = super().send(request)

        def close() -> None:
            response.close()
            raise OSError(9, "Bad file descriptor")

        return Response(response.status_code, response.headers, response.stream, close)


class _AsyncCloseRaises(AsyncMockTransport):
    async def send(self, request: Request) -> AsyncResponse:
        response = await super().send(request)

        async def aclose() -> None:
            await response.aclose()
            raise OSError(9, "Bad file descriptor")

        return AsyncResponse(response.status_code, response.headers, response.stream, aclose)


UNAVAILABLE = MockResponse(
    status_code=503, chunks=[b'{"error": {"message": "busy"}}'], headers={"x-request-id": "r5"}
)
CUT = MockResponse(chunks=sse_body("Hello", " world")[:3], fault="dropped")


def test_a_close_that_raises_takes_the_place_of_nothing() -> None:
    """A raising close replaced the stream's outcome: a 503 was not retried, a cut stream's
    error lost its partial completion. Both stand now, with a warning."""
    fast = RetryPolicy(wait_initial=0.001, wait_max=0.001, wait_jitter=0)
    transport = _CloseRaises([UNAVAILABLE, MockResponse()])
    with holysheep.Client(
        api_key="k", base_url="http://m/v1", transport=transport, retry=fast
    ) as c:
        with pytest.warns(RuntimeWarning, match="_CloseRaises: closing a response raised"):
            assert "Hello!" == c.chat.complete(model="m", messages=MESSAGES).text
        assert 2 == len(transport.requests)
        c.transport = _CloseRaises([CUT])
        with c.chat.stream(model="m", messages=MESSAGES, retry=RetryPolicy.none()) as stream:
            warned = pytest.warns(RuntimeWarning, match="closing a response raised")
            with warned, pytest.raises(holysheep.StreamError) as info:
                stream.until_done()
    assert info.value.completion is not None
    assert "Hello world" == info.value.completion.text


@pytest.mark.anyio
async def test_async_a_close_that_raises_takes_the_place_of_nothing() -> None:
    fast = RetryPolicy(wait_initial=0.001, wait_max=0.001, wait_jitter=0)
    transport = _AsyncCloseRaises([UNAVAILABLE, MockResponse()])
    async with holysheep.AsyncClient(
        api_key="k", base_url="http://m/v1", transport=transport, retry=fast
    ) as client:
        with pytest.warns(RuntimeWarning, match="_AsyncCloseRaises: closing a response raised"):
            completion = await client.chat.complete(model="m", messages=MESSAGES)
        assert "Hello!" == completion.text
        assert 2 == len(transport.requests)


def test_a_piece_that_is_not_bytes_after_content_keeps_the_text() -> None:
    """The contract error came without the partial completion, status or request id."""
    transport = _Pieces([sse_body("Hello")[1], "data: more\n\n"])
    client = holysheep.Client(
        api_key="k", base_url="http://mock/v1", transport=transport, retry=RetryPolicy.none()
    )
    with pytest.raises(LocalProtocolError, match="must yield bytes") as info:
        client.chat.complete(model="m", messages=MESSAGES)
    assert info.value.completion is not None
    assert "Hello" == info.value.completion.text
    assert 200 == info.value.status_code
    assert info.value.request_id is not None
    client.close()


class _OSErrors(MockTransport):
    """Raises `errors` from `send`, one per request, then answers from the script."""

    def __init__(self, errors: list[OSError], script: list[MockResponse]) -> None:
        super().__init__(script)
        self.errors = errors

    def send(self, request: Request) -> Response:
        if self.errors:
            self.requests.append(request)
            raise self.errors.pop(0)
        return super().send(request)


class _BodyOSError(MockTransport):
    """Its first body breaks with a raw `ConnectionResetError` after `Hello`."""

    def send(self, request: Request) -> Response:
        response = super().send(request)
        if len(self.requests) > 1:
            return response

        def body() -> Iterator[bytes]:
            yield from sse_body("Hello")[:2]
            raise ConnectionResetError(104, "Connection reset by peer")

        return Response(response.status_code, response.headers, body(), response.close)


def test_an_os_error_from_a_users_transport_is_a_connection_error() -> None:
    """A raw OSError from `send` or the body went past everything: not retried, no request id,
    and under `complete()` the text so far was lost with it. It is an `APIConnectionError`
    (retried, restarted) naming the transport, with the OSError as its cause."""
    fast = RetryPolicy(wait_initial=0.001, wait_max=0.001, wait_jitter=0)
    refused = _OSErrors([ConnectionResetError(104, "reset"), TimeoutError("timed out")], [])
    client = holysheep.Client(api_key="k", base_url="http://m/v1", transport=refused, retry=fast)
    refused.errors.append(ConnectionRefusedError(111, "refused"))
    refused.errors.append(OSError(5, "I/O error"))
    with pytest.raises(holysheep.APIConnectionError) as info:
        client.chat.complete(model="m", messages=MESSAGES)
    assert 4 == len(refused.requests) == info.value.attempts  # every one retried
    assert "_OSErrors raised OSError(5, 'I/O error')" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.request_id is not None

    client.transport = _OSErrors([ConnectionRefusedError(111, "refused")], [MockResponse()])
    assert "Hello!" == client.chat.complete(model="m", messages=MESSAGES).text

    cut = client.transport = _BodyOSError([MockResponse(), MockResponse()])
    assert "Hello!" == client.chat.complete(model="m", messages=MESSAGES).text  # restarted
    assert 2 == len(cut.requests)
    client.transport = _BodyOSError([MockResponse()])
    with (
        client.chat.stream(model="m", messages=MESSAGES) as stream,
        pytest.raises(holysheep.StreamError) as broke,
    ):
        stream.until_done()
    assert broke.value.completion is not None
    assert "Hello" == broke.value.completion.text
    assert ConnectionResetError in _causes(broke.value)
    client.close()


def _causes(exc: BaseException | None) -> list[type[BaseException]]:
    found = []
    while exc is not None:
        found.append(type(exc))
        exc = exc.__cause__
    return found


class _AsyncOSErrors(AsyncMockTransport):
    def __init__(self, errors: list[OSError], script: list[MockResponse]) -> None:
        super().__init__(script)
        self.errors = errors

    async def send(self, request: Request) -> AsyncResponse:
        if self.errors:
            raise self.errors.pop(0)
        response = await super().send(request)
        if len(self.requests) > 1:
            return response

        async def body() -> AsyncIterator[bytes]:
            for piece in sse_body("Hello")[:2]:
                yield piece
            raise ConnectionResetError(104, "Connection reset by peer")

        return AsyncResponse(response.status_code, response.headers, body(), response.aclose)


@pytest.mark.anyio
async def test_async_an_os_error_from_a_users_transport_is_a_connection_error() -> None:
    fast = RetryPolicy(wait_initial=0.001, wait_max=0.001, wait_jitter=0)
    transport = _AsyncOSErrors([TimeoutError("timed out")], [MockResponse(), MockResponse()])
    async with holysheep.AsyncClient(
        api_key="k", base_url="http://m/v1", transport=transport, retry=fast
    ) as client:
        # The send's error is retried; the body's first attempt breaks after "Hello", and
        # `complete()` starts over.
        assert "Hello!" == (await client.chat.complete(model="m", messages=MESSAGES)).text
        assert 2 == len(transport.requests)
        client.transport = _AsyncOSErrors([], [MockResponse()])
        async with client.chat.stream(model="m", messages=MESSAGES) as stream:
            with pytest.raises(holysheep.StreamError) as broke:
                await stream.until_done()
    assert broke.value.completion is not None
    assert "Hello" == broke.value.completion.text
    assert ConnectionResetError in _causes(broke.value)


class _Head(BaseTransport):
    """Answers with the given status and headers as they are."""

    def __init__(self, status: object, headers: object, body: list[bytes] | None = None) -> None:
        self.status, self.headers = status, headers
        self.body = sse_body("Hi") if body is None else body

    def send(self, request: Request) -> Response:
        return Response(self.status, self.headers, iter(self.body))  # type: ignore[arg-type]


ERROR_BODY = [b'{"error": {"message": "slow down"}}']


@pytest.mark.parametrize(
    "headers",
    [
        [("Content-Type", "text/event-stream"), ("X-Request-ID", "req_1")],
        {b"content-type": b"text/event-stream", b"x-request-id": b"req_1"},
        {"Content-Type": "text/event-stream", "X-Request-ID": "req_1"}.items(),
        __import__("types").MappingProxyType(
            {"Content-Type": "text/event-stream", "X-Request-Id": "req_1"}
        ),
    ],
    ids=["pairs", "bytes", "items-view", "mapping-proxy"],
)
def test_response_headers_of_other_shapes_are_read(headers: object) -> None:
    """Pairs (the shape of `Request.headers`), bytes, or a mapping that is not a dict gave an
    AttributeError, or "the server sent '(none)'" blaming the server."""
    with holysheep.Client(api_key="k", base_url="http://m/v1", transport=_Head(200, headers)) as c:
        with c.chat.stream(model="m", messages=MESSAGES) as stream:
            assert "Hi" == stream.until_done().text
        assert "req_1" == stream.request_id


def _http_message() -> object:
    import email.parser
    import http.client

    head = "Content-Type: text/event-stream\r\nX-Request-ID: req_1\r\n\r\n"
    return email.parser.Parser(_class=http.client.HTTPMessage).parsestr(head)


def _urllib3_headers() -> object:
    import urllib3

    return urllib3.HTTPHeaderDict({"Content-Type": "text/event-stream", "X-Request-ID": "req_1"})


def _requests_headers() -> object:
    import requests.structures

    return requests.structures.CaseInsensitiveDict(
        {"Content-Type": "text/event-stream", "X-Request-ID": "req_1"}
    )


@pytest.mark.parametrize(
    "make",
    [_http_message, _urllib3_headers, _requests_headers],
    ids=["http.client", "urllib3", "requests"],
)
def test_an_http_librarys_own_headers_are_taken_as_they_are(make: Callable[[], object]) -> None:
    """The docs promise a library's case-insensitive headers are used as they are, with no
    copy per stream: http.client's message (not a Mapping) was refused, urllib3's and
    requests' were copied on every stream. Each class is probed once."""
    with holysheep.Client(api_key="k", base_url="http://m/v1", transport=_Head(200, None)) as c:
        for _ in range(2):
            headers = c.transport.headers = make()  # type: ignore[attr-defined]
            with c.chat.stream(model="m", messages=MESSAGES) as stream:
                assert "Hi" == stream.until_done().text
            assert "req_1" == stream.request_id
            assert headers is stream.response_headers


def test_a_header_value_of_no_known_type_is_not_an_error() -> None:
    """A None, a list (several `set-cookie`s) or another object in a header the client never
    reads failed the whole response."""
    headers = {
        "content-type": "text/event-stream",
        "x-none": None,
        "set-cookie": ["a=1", "b=2"],
        "x-object": object(),
    }
    client = holysheep.Client(api_key="k", base_url="http://m/v1", transport=_Head(200, headers))
    with client, client.chat.stream(model="m", messages=MESSAGES) as stream:
        assert "Hi" == stream.until_done().text
    assert "a=1, b=2" == stream.response_headers["set-cookie"]
    assert "x-none" not in stream.response_headers


def test_a_numeric_retry_after_is_read() -> None:
    headers = {"content-type": "application/json", "retry-after": 2}
    client = holysheep.Client(
        api_key="k",
        base_url="http://m/v1",
        transport=_Head(429, headers, ERROR_BODY),
        retry=RetryPolicy.none(),
    )
    with pytest.raises(holysheep.RateLimitError, match="slow down") as info:
        client.chat.complete(model="m", messages=MESSAGES)
    assert 2.0 == info.value.retry_after
    client.close()


@pytest.mark.parametrize(
    ("status", "headers", "message"),
    [
        ("200", SSE, "status_code must be an int, but it was str: '200'"),
        (None, SSE, "status_code must be an int, but it was NoneType"),
        (200, "content-type: text/event-stream", "must be a mapping of names to values"),
        (200, [("content-type",)], "must be a mapping of names to values"),
        (200, [(7, "text/event-stream")], "header name must be str, but it was int"),
    ],
    ids=["str-status", "no-status", "str-headers", "short-pair", "int-name"],
)
def test_a_response_head_that_breaks_the_rules_is_named(
    status: object, headers: object, message: str
) -> None:
    client = holysheep.Client(api_key="k", base_url="http://m/v1", transport=_Head(status, headers))
    with pytest.raises(LocalProtocolError, match=message) as info:
        client.chat.complete(model="m", messages=MESSAGES)
    assert info.value.request_id is not None
    client.close()


class _ReturnsNone(AsyncBaseTransport):
    async def send(self, request: Request) -> AsyncResponse:
        return None  # type: ignore[return-value]


class _ReturnsSync(AsyncBaseTransport):
    async def send(self, request: Request) -> AsyncResponse:
        return Response(200, SSE, iter(sse_body("Hi")))  # type: ignore[return-value]


@pytest.mark.anyio
@pytest.mark.parametrize("transport", [_ReturnsNone(), _ReturnsSync()], ids=["none", "sync"])
async def test_async_send_must_return_an_async_response(transport: AsyncBaseTransport) -> None:
    """None gave "deadline scope expired without a due timeout", an internal error; a sync
    Response an AttributeError about `__anext__`."""
    async with holysheep.AsyncClient(
        api_key="k", base_url="http://m/v1", transport=transport, retry=RetryPolicy.none()
    ) as client:
        name = type(transport).__name__
        with pytest.raises(LocalProtocolError, match=f"{name}.send\\(\\) must return an Async"):
            await client.chat.complete(model="m", messages=MESSAGES)


def test_a_transport_of_the_other_kind_is_refused_at_construction() -> None:
    """They failed at the first request: "'coroutine' object has no attribute 'status_code'",
    "object Response can't be used in 'await' expression"."""
    with pytest.raises(holysheep.ConfigurationError, match="AsyncMockTransport is an async"):
        holysheep.Client(api_key="k", transport=AsyncMockTransport([]))  # type: ignore[arg-type]
    with pytest.raises(holysheep.ConfigurationError, match="MockTransport is not an async"):
        holysheep.AsyncClient(api_key="k", transport=MockTransport([]))  # type: ignore[arg-type]
    with pytest.raises(holysheep.ConfigurationError, match="must have a send"):
        holysheep.Client(api_key="k", transport=object())  # type: ignore[arg-type]

    class _NoClose:
        def send(self, request: Request) -> Response:
            raise NotImplementedError

    with pytest.raises(holysheep.ConfigurationError, match="must have a close"):
        holysheep.Client(api_key="k", transport=_NoClose())  # type: ignore[arg-type]


def test_a_mock_response_takes_a_number_for_a_header() -> None:
    assert "2" == MockResponse(headers={"Retry-After": 2}).headers["retry-after"]


def test_a_transport_without_send_says_so() -> None:
    class _Bare(BaseTransport):
        pass

    with pytest.raises(NotImplementedError, match="_Bare must implement send"):
        _Bare().send(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"status_code": "200"}, "status_code must be an int from 100 to 599"),
        ({"status_code": 99}, "status_code must be an int from 100 to 599"),
        ({"headers": {"retry-after": None}}, "'retry-after': None is not"),
        ({"headers": [("x-request-id", "r")]}, "headers must be a mapping"),
        ({"delay": -1}, "delay is seconds, a number of 0 or more"),
        ({"delay": "1"}, "delay is seconds"),
        ({"fault": ConnectionResetError("peer")}, "fault is the message"),
    ],
    ids=["str-status", "low-status", "none-header", "pairs", "negative-delay", "str-delay", "exc"],
)
def test_a_mock_response_refuses_a_wrong_field_where_it_is_made(
    given: dict[str, object], message: str
) -> None:
    """Each was accepted and failed later, inside the client, with an unrelated error."""
    with pytest.raises(TypeError, match=message):
        MockResponse(**given)  # type: ignore[arg-type]
