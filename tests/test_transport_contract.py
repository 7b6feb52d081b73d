"""What the clients make of what a transport hands them, including a user's transport that
bends the rules in docs/transports.md."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

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
