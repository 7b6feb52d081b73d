"""MockTransport: the scripted transport users test their own code with."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

import holysheep
from holysheep import (
    FirstTokenTimeoutError,
    IncompleteStreamError,
    InternalServerError,
    LocalProtocolError,
    Timeouts,
    UnexpectedContentTypeError,
)
from holysheep.transports import AsyncMockTransport, MockResponse, MockTransport, sse_body

MESSAGES = [{"role": "user", "content": "hi"}]


def test_scripted_responses_are_served_in_order_and_requests_recorded() -> None:
    """A list script answers one request each; `requests` shows what was sent."""
    transport = MockTransport(
        [MockResponse(chunks=sse_body("one")), MockResponse(chunks=sse_body("two"))]
    )
    with holysheep.Client(
        api_key="k",
        base_url="http://mock/v1",
        transport=transport,
        retry=holysheep.RetryPolicy.none(),
    ) as client:
        first = client.chat.complete(model="m", messages=MESSAGES, max_tokens=3)
        second = client.chat.complete(model="m", messages=MESSAGES)
    assert ("one", "two") == (first.text, second.text)
    assert "http://mock/v1/chat/completions" == transport.requests[0].url
    assert 3 == json.loads(transport.requests[0].content)["max_tokens"]


EXHAUSTED = r"script ran out: it had 1 response, all used, and POST http://mock/v1/\S+ asked"


def test_a_script_that_runs_out_is_a_local_error_not_retried() -> None:
    """One request more than the script holds is the test's mistake: LocalProtocolError at
    once, not a connection error retried with backoff."""
    transport = MockTransport([MockResponse()])
    with holysheep.Client(api_key="k", base_url="http://mock/v1", transport=transport) as client:
        client.chat.complete(model="m", messages=MESSAGES)
        with pytest.raises(LocalProtocolError, match=EXHAUSTED):
            client.chat.complete(model="m", messages=MESSAGES)
    assert 2 == len(transport.requests)


@pytest.mark.anyio
async def test_an_async_script_that_runs_out_is_a_local_error_not_retried() -> None:
    """The async twin says the same, on asyncio and trio."""
    transport = AsyncMockTransport([MockResponse()])
    async with holysheep.AsyncClient(
        api_key="k", base_url="http://mock/v1", transport=transport
    ) as client:
        await client.chat.complete(model="m", messages=MESSAGES)
        with pytest.raises(LocalProtocolError, match=EXHAUSTED):
            await client.chat.complete(model="m", messages=MESSAGES)
    assert 2 == len(transport.requests)


def test_handler_sees_the_request() -> None:
    """A handler can answer based on the request."""

    def echo(request: holysheep.Request) -> MockResponse:
        body = json.loads(request.content)
        return MockResponse(chunks=sse_body(body["messages"][-1]["content"].upper()))

    client = holysheep.Client(api_key="k", transport=MockTransport(echo))
    assert "HI" == client.chat.complete(model="m", messages=MESSAGES).text


def test_fault_after_chunks_is_an_incomplete_stream_with_partial_text() -> None:
    """A dropped connection keeps the text that arrived."""
    chunks = sse_body("Hel", "lo")[:3]
    client = holysheep.Client(
        api_key="k",
        transport=MockTransport([MockResponse(chunks=chunks, fault="reset")]),
        retry=holysheep.RetryPolicy.none(),
    )
    seen = []
    with (
        pytest.raises(IncompleteStreamError) as info,
        client.chat.stream(model="m", messages=MESSAGES) as stream,
    ):
        seen.extend(chunk.text for chunk in stream)
    assert "Hello" == "".join(seen)
    assert info.value.completion is not None
    assert "Hello" == info.value.completion.text


def test_given_headers_are_added_to_the_event_stream_default() -> None:
    """An extra header keeps `text/event-stream`; a given Content-Type, in any case, wins."""
    extra = MockResponse(chunks=sse_body("Hi"), headers={"X-Request-ID": "srv-1"})
    json_body = MockResponse(chunks=[b"{}"], headers={"Content-Type": "application/json"})
    client = holysheep.Client(
        api_key="k", transport=MockTransport([extra, json_body]), retry=holysheep.RetryPolicy.none()
    )
    with client.chat.stream(model="m", messages=MESSAGES) as stream:
        stream.until_done()
    with pytest.raises(UnexpectedContentTypeError, match="application/json"):
        client.chat.complete(model="m", messages=MESSAGES)
    assert ("Hi", "srv-1") == (stream.completion.text, stream.request_id)
    assert {"content-type": "text/event-stream", "x-request-id": "srv-1"} == extra.headers
    assert {"content-type": "application/json"} == json_body.headers


def test_error_status_from_script() -> None:
    """Scripted statuses raise the typed error."""
    response = MockResponse(status_code=503, chunks=[b'{"error": {"message": "down"}}'])
    client = holysheep.Client(
        api_key="k", transport=MockTransport([response]), retry=holysheep.RetryPolicy.none()
    )
    with pytest.raises(InternalServerError, match="down"):
        client.chat.complete(model="m", messages=MESSAGES)


def test_delays_trip_the_clients_timeouts() -> None:
    """Delays really wait, so timeouts can be tested without a server."""
    client = holysheep.Client(
        api_key="k",
        transport=MockTransport([MockResponse(delay=1.0)]),
        timeout=Timeouts(ttft=0.05),
        retry=holysheep.RetryPolicy.none(),
    )
    with pytest.raises(FirstTokenTimeoutError):
        client.chat.complete(model="m", messages=MESSAGES)
    client.close()


@pytest.mark.anyio
async def test_async_mock_transport() -> None:
    """The async twin serves scripts the same way, on asyncio and trio."""
    transport = AsyncMockTransport([MockResponse(chunks=sse_body("a", "b")), MockResponse(delay=1)])
    async with holysheep.AsyncClient(
        api_key="k",
        transport=transport,
        timeout=Timeouts(ttft=0.05),
        retry=holysheep.RetryPolicy.none(),
    ) as client:
        async with client.chat.stream(model="m", messages=MESSAGES) as stream:
            texts = [chunk.text async for chunk in stream]
        assert ["", "a", "b", ""] == texts
        assert "ab" == stream.completion.text
        with pytest.raises(FirstTokenTimeoutError):
            await client.chat.complete(model="m", messages=MESSAGES)


def test_chunks_given_as_one_bytes_value_say_to_pass_a_list() -> None:
    """A whole body as one bytes value is refused where it is written, naming the field (it
    failed in the client with "object of type 'int' has no len()")."""
    body = b"".join(sse_body("Hi"))
    with pytest.raises(TypeError, match=r"chunks must be a list of bytes.*single bytes.*pass \["):
        MockResponse(chunks=body)  # type: ignore[arg-type]


def test_str_chunks_say_to_encode_them() -> None:
    """A str chunk is refused with its index and the fix (it failed inside the decoder)."""
    chunks = [chunk.decode() for chunk in sse_body("Hi")]
    with pytest.raises(TypeError, match=r"chunks\[0\] is a str.*encode it"):
        MockResponse(chunks=chunks)  # type: ignore[arg-type]


def test_generator_chunks_are_kept_so_a_retried_response_is_whole_again() -> None:
    """Chunks become a tuple: a response served twice (a handler returning the same one, the
    second time after a 503) streams in full both times instead of empty."""
    ok = MockResponse(chunks=(chunk for chunk in sse_body("Hi")))
    answers = iter([ok, MockResponse(status_code=503, chunks=[b"{}"]), ok])
    transport = MockTransport(lambda request: next(answers))
    client = holysheep.Client(
        api_key="k", transport=transport, retry=holysheep.RetryPolicy(wait_initial=0.01)
    )
    first = client.chat.complete(model="m", messages=MESSAGES)
    second = client.chat.complete(model="m", messages=MESSAGES)
    assert ("Hi", "Hi", 3) == (first.text, second.text, len(transport.requests))
    assert tuple(sse_body("Hi")) == ok.chunks


def test_headers_none_adds_no_headers() -> None:
    """`headers=None` means no extra headers, not an AttributeError."""
    assert {"content-type": "text/event-stream"} == MockResponse(headers=None).headers


def test_a_handler_returning_no_mock_response_is_a_type_error_naming_it() -> None:
    """A handler that returns None says so, instead of an AttributeError from the client."""
    client = holysheep.Client(api_key="k", transport=MockTransport(lambda request: None))  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="must return a MockResponse; it returned None"):
        client.chat.complete(model="m", messages=MESSAGES)


def test_an_async_handler_on_the_sync_transport_points_to_the_async_one() -> None:
    """An `async def` handler given to `MockTransport` is refused with the fix, and its
    coroutine is closed, so no "never awaited" warning follows."""

    async def handler(request: holysheep.Request) -> MockResponse:
        return MockResponse()

    client = holysheep.Client(api_key="k", transport=MockTransport(handler))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"returned <coroutine.*needs AsyncMockTransport"):
        client.chat.complete(model="m", messages=MESSAGES)


def test_a_single_mock_response_as_the_script_says_to_wrap_it() -> None:
    """A script is a handler or a list: one bare `MockResponse`, or a list holding something
    else, is refused when the transport is built."""
    with pytest.raises(TypeError, match=r"pass \[response\]"):
        MockTransport(MockResponse())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="item 1 is a dict"):
        MockTransport([MockResponse(), {"status_code": 200}])  # type: ignore[list-item]


@pytest.mark.anyio
async def test_an_async_handler_is_awaited() -> None:
    """`AsyncMockTransport` awaits an `async def` handler (its coroutine used to be taken for
    the response)."""

    async def handler(request: holysheep.Request) -> MockResponse:
        await anyio.sleep(0)
        return MockResponse(chunks=sse_body("async", " hi"))

    async with holysheep.AsyncClient(api_key="k", transport=AsyncMockTransport(handler)) as client:
        completion = await client.chat.complete(model="m", messages=MESSAGES)
    assert "async hi" == completion.text


@pytest.mark.anyio
async def test_an_async_handler_returning_no_mock_response_is_a_type_error_naming_it() -> None:
    """What an async handler returns is checked as a sync one's is."""

    async def handler(request: holysheep.Request) -> MockResponse:
        return "hello"  # type: ignore[return-value]

    async with holysheep.AsyncClient(api_key="k", transport=AsyncMockTransport(handler)) as client:
        with pytest.raises(TypeError, match="it returned 'hello'"):
            await client.chat.complete(model="m", messages=MESSAGES)


# -- close() in the middle of a read's chunks -------------------------------------------------

ONE_READ = MockResponse(chunks=[b"".join(sse_body(*"abcdefghij"))])  # 13 chunks in one read


def test_closing_a_sync_stream_in_its_loop_hands_out_no_more_chunks() -> None:
    """The chunks one read brought are not handed out after `close()` (the rest of the batch
    still came: a "stop" button kept printing up to a read's worth of text)."""
    client = holysheep.Client(api_key="k", transport=MockTransport([ONE_READ]))
    with client, client.chat.stream(model="m", messages=[]) as stream:
        seen = []
        for chunk in stream:
            seen.append(chunk)
            stream.close()
    assert 1 == len(seen)


@pytest.mark.anyio
async def test_closing_an_async_stream_hands_out_no_more_chunks() -> None:
    """As for the sync stream: neither in the loop nor in a later one (`close()` then
    `async for`: the tutorial says it yields nothing)."""
    async with holysheep.AsyncClient(
        api_key="k", transport=AsyncMockTransport([ONE_READ, ONE_READ])
    ) as client:
        async with client.chat.stream(model="m", messages=[]) as stream:
            seen = []
            async for chunk in stream:
                seen.append(chunk)
                await stream.aclose()
        assert 1 == len(seen)
        async with client.chat.stream(model="m", messages=[]) as stream:
            async for _ in stream:
                break
            stream.close()
            assert [] == [chunk async for chunk in stream]


class _Closer(holysheep.Observer):
    """Closes the stream it is given when told of the first token."""

    def __init__(self) -> None:
        self.stream: Any = None

    def on_first_token(self, info: Any, stats: Any) -> None:
        self.stream.close()


def test_a_stream_an_observer_closes_hands_out_nothing_more() -> None:
    """`close()` from `on_first_token`, before the read's chunks are handed out: none is."""
    closer = _Closer()
    client = holysheep.Client(api_key="k", transport=MockTransport([ONE_READ]), observers=[closer])
    with client, client.chat.stream(model="m", messages=[]) as stream:
        closer.stream = stream
        assert [] == list(stream)
    assert "abcdefghij" == stream.completion.text  # what arrived is kept


@pytest.mark.anyio
async def test_an_async_stream_an_observer_closes_hands_out_nothing_more() -> None:
    """As for the sync stream (the async one handed out the whole read)."""
    closer = _Closer()
    async with (
        holysheep.AsyncClient(
            api_key="k", transport=AsyncMockTransport([ONE_READ]), observers=[closer]
        ) as client,
        client.chat.stream(model="m", messages=[]) as stream,
    ):
        closer.stream = stream
        assert [] == [chunk async for chunk in stream]
    assert "abcdefghij" == stream.completion.text


@pytest.mark.anyio
async def test_each_async_chunk_lets_other_tasks_run_as_a_socket_read_does() -> None:
    """With no `delay` the body never awaited: a task meant to stop the stream after its first
    piece ran only once all 2,000 were read, and a timeout around it never fired."""
    transport = AsyncMockTransport([MockResponse(chunks=sse_body(*["x"] * 2000))])
    read = 0
    async with holysheep.AsyncClient(api_key="k", transport=transport) as client:
        stream = client.chat.stream(model="m", messages=MESSAGES)
        async with stream, anyio.create_task_group() as group:

            async def stop_after_the_first() -> None:
                while read == 0:
                    await anyio.sleep(0)
                await stream.aclose()

            group.start_soon(stop_after_the_first)
            async for chunk in stream:
                read += bool(chunk.text)
    assert 1 <= read <= 3  # (trio may run the stopper a turn later)


def test_an_infinite_delay_is_a_response_that_never_comes() -> None:
    """`delay=float("inf")` passed validation, then the sync transport failed at once with an
    `OverflowError` from `Event.wait`, instead of the timeout under test."""
    transport = MockTransport([MockResponse(delay=float("inf"))])
    client = holysheep.Client(
        api_key="k",
        transport=transport,
        timeout=Timeouts(ttft=0.2),
        retry=holysheep.RetryPolicy.none(),
    )
    with pytest.raises(FirstTokenTimeoutError):
        client.chat.complete(model="m", messages=MESSAGES)
    client.close()


def test_a_closed_mock_transport_refuses_requests_as_the_real_ones_do() -> None:
    """Both mocks answered a client that shared a transport with one closed before it, where
    every real transport raises: a test fixture hid what production meets."""
    transport = MockTransport([MockResponse(), MockResponse()])
    with holysheep.Client(api_key="k", transport=transport) as first:
        first.chat.complete(model="m", messages=MESSAGES)
    second = holysheep.Client(api_key="k", transport=transport)
    with pytest.raises(LocalProtocolError, match="MockTransport is closed: cannot send another"):
        second.chat.complete(model="m", messages=MESSAGES)


@pytest.mark.anyio
async def test_a_closed_async_mock_transport_refuses_requests_and_ends_open_bodies() -> None:
    """`aclose()` also ends a body still being read (a real pool closes its connections)."""
    transport = AsyncMockTransport([MockResponse(delay=60), MockResponse()])
    async with holysheep.AsyncClient(
        api_key="k", transport=transport, retry=holysheep.RetryPolicy.none()
    ) as client:
        stream = client.chat.stream(model="m", messages=MESSAGES)
        await stream.__aenter__()
        await transport.aclose()
        with anyio.fail_after(5), pytest.raises(holysheep.HolySheepError) as info:
            await stream.__anext__()  # fails at once, not after 60 s
        await stream.aclose()
        assert "AsyncMockTransport was closed while this body was being read" in str(info.value)
        with pytest.raises(LocalProtocolError, match="AsyncMockTransport is closed"):
            await client.chat.complete(model="m", messages=MESSAGES)


def test_sse_body_with_usage_sends_the_usage_chunk_the_real_api_sends() -> None:
    """Code that reads `completion.usage` (cost tracking) failed against the mock's stream."""
    transport = MockTransport(
        [
            MockResponse(chunks=sse_body("Hel", "lo", usage=True)),
            MockResponse(chunks=sse_body("Hi", usage={"prompt_tokens": 9, "completion_tokens": 1})),
        ]
    )
    with holysheep.Client(api_key="k", transport=transport) as client:
        counted = client.chat.complete(model="m", messages=MESSAGES)
        given = client.chat.complete(model="m", messages=MESSAGES)
    assert counted.usage is not None
    assert given.usage is not None
    assert ("Hello", 0, 2, 2) == (
        counted.text,
        counted.usage.prompt_tokens,
        counted.usage.completion_tokens,
        counted.usage.total_tokens,
    )
    assert (9, 1) == (given.usage.prompt_tokens, given.usage.completion_tokens)
    assert 5 == len(sse_body("Hel", "lo")) == len(sse_body("Hel", "lo", usage=True)) - 1


def test_a_mock_response_can_be_hashed() -> None:
    """attrs made it hashable, and its headers dict made `hash()` raise."""
    response = MockResponse(headers={"x-request-id": "r"})
    assert {response} == {MockResponse(headers={"x-request-id": "r"})}
