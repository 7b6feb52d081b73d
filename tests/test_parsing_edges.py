"""The parsing core at its edges: a chunk refused whole, values nested deeper than Python
recurses, limits met in the middle of a read, buffers the caller reuses. Every test runs with
the C part and with Python alone, which must agree."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from _deep import DEEP, recursing
from hypothesis import given, settings
from hypothesis import strategies as st

import holysheep
from holysheep import (
    ChatAccumulator,
    RemoteProtocolError,
    RetryPolicy,
    StreamError,
    _chat,
    _sse,
)
from holysheep._exchange import Exchange
from holysheep.transports import MockResponse, MockTransport


@pytest.fixture(autouse=True, scope="module", params=["C", "pure Python"])
def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    built = _sse._c_feed, _chat._c_feed
    if request.param == "C" and built[0] is None:
        pytest.skip("the C part is not built here")
    if request.param == "pure Python":
        _sse._c_feed = _chat._c_feed = None
    yield request.param
    _sse._c_feed, _chat._c_feed = built


def event(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, str) else json.dumps(obj)).encode() + b"\n\n"


def choice(text: str | None = None, index: int = 0, **more: Any) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"index": index, "delta": delta, **more}


HELLO = event({"id": "good", "model": "m-1", "choices": [choice("Hello")]})


def snapshot(acc: ChatAccumulator) -> tuple[Any, ...]:
    """What a caller can read of the accumulation."""
    completion = acc.completion
    return completion, completion.last_chunk, acc.chunk_count, acc.usage, acc.finished


# -- a chunk is accumulated whole or not at all ------------------------------------------------


@pytest.mark.parametrize("bad", [5, None, "x", [choice(" world")], True])
@pytest.mark.parametrize("first", [True, False], ids=["bad last", "bad first"])
def test_a_chunk_with_a_choice_that_is_no_object_changes_nothing(bad: Any, first: bool) -> None:
    """A bad choice beside good ones refuses the whole chunk: its good choice's text, the
    chunk's id and model, its usage never reach the completion, and it is not counted."""
    acc = ChatAccumulator()
    shown = [chunk.text for chunk in acc.feed(HELLO)]
    before = snapshot(acc)
    good = [choice(" world", finish_reason="stop"), choice("other", index=1)]
    choices = [*good, bad] if first else [bad, *good]
    chunk = {"id": "bad", "model": "m-2", "choices": choices, "usage": {"total_tokens": 3}}
    with pytest.raises(RemoteProtocolError, match="expected choices to be objects") as info:
        acc.feed(HELLO.replace(b"Hello", b"!") + event(chunk))
    shown += [chunk.text for chunk in info.value.chunks]
    assert ["Hello", "!"] == shown
    assert "Hello!" == acc.completion.text
    assert (before[2] + 1, "good", "m-1", None) == (
        acc.chunk_count,
        acc.completion.id,
        acc.completion.model,
        acc.usage,
    )


_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
_good_choice = st.fixed_dictionaries(
    {"index": st.integers(0, 2)},
    optional={
        "delta": st.fixed_dictionaries(
            {},
            optional={
                "content": st.text(max_size=5),
                "role": st.sampled_from(["assistant", "tool"]),
                "refusal": st.text(max_size=3),
                "reasoning_content": st.text(max_size=3),
                "tool_calls": st.lists(
                    st.fixed_dictionaries(
                        {"index": st.integers(0, 2)},
                        optional={
                            "id": st.sampled_from(["a", "b"]),
                            "function": st.fixed_dictionaries(
                                {},
                                optional={
                                    "name": st.sampled_from(["f", "g"]),
                                    "arguments": st.one_of(st.text(max_size=4), _values),
                                },
                            ),
                        },
                    ),
                    max_size=2,
                ),
            },
        ),
        "finish_reason": st.one_of(st.sampled_from(["stop", "length"]), _values),
    },
)
_bad_choice = _values.filter(lambda value: not isinstance(value, dict))


@settings(max_examples=200)
@given(
    st.lists(_good_choice, max_size=3),
    st.lists(_good_choice, max_size=3),
    _bad_choice,
    st.one_of(st.none(), st.just({"total_tokens": 9})),
)
def test_a_refused_chunk_leaves_the_accumulation_as_it_was(
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
    bad: Any,
    usage: dict[str, int] | None,
) -> None:
    """Whatever good choices surround a choice that is no object, and whatever they carry
    (text, tool calls, finish reasons of any type), the completion is as before the chunk."""
    acc = ChatAccumulator(require_end=False)
    acc.feed(HELLO)
    acc.feed(event({"choices": [choice(" there", index=1)]}))
    expected = snapshot(acc)
    with pytest.raises(RemoteProtocolError):
        acc.feed(event({"id": "bad", "choices": [*before, bad, *after], "usage": usage}))
    assert expected == snapshot(acc)


# -- nested deeper than Python recurses --------------------------------------------------------


def _call(arguments: str) -> str:
    return (
        '{"choices":[{"index":0,"delta":{"content":"lost","tool_calls":[{"index":0,"id":"c",'
        '"function":{"name":"f","arguments":' + arguments + "}}]}}]}"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(_call(DEEP), "nested too deeply", marks=recursing),
        pytest.param(
            '{"choices":[{"index":0,"delta":{"content":"lost"},"finish_reason":' + DEEP + "}]}",
            "nested too deeply",
            marks=recursing,
        ),
        (  # shown to a bounded depth
            '{"choices":[{"index":0,"delta":{"content":"lost"}},' + DEEP + "]}",
            r"expected choices to be objects, got '\[\[\[\[\[\[\[\.\.\.\]\]",
        ),
        pytest.param('{"error":{"message":' + DEEP + "}}", "nested too deeply", marks=recursing),
        pytest.param(
            '{"error":{"message":"","code":' + DEEP + "}}", "nested too deeply", marks=recursing
        ),
        pytest.param('{"error":' + DEEP + "}", "nested too deeply", marks=recursing),
    ],
    ids=["tool-call arguments", "finish_reason", "a choice", "error message", "code", "error"],
)
def test_a_value_nested_too_deep_is_a_remote_protocol_error(data: str, message: str) -> None:
    """A chunk nested too deeply to make text of is refused like invalid JSON, never a bare
    RecursionError, and the chunks the read completed before it come with the error."""
    acc = ChatAccumulator()
    acc.feed(HELLO)
    before = snapshot(acc)
    with pytest.raises(RemoteProtocolError, match=message) as info:
        acc.feed(HELLO.replace(b"Hello", b"!") + event(data))
    assert ["!"] == [chunk.text for chunk in info.value.chunks]
    assert "Hello!" == acc.completion.text
    assert before[2] + 1 == acc.chunk_count


@recursing
def test_an_error_event_nested_too_deep_is_a_remote_protocol_error() -> None:
    """`event: error` whose payload is nested too deep: refused, not a RecursionError."""
    acc = ChatAccumulator()
    with pytest.raises(RemoteProtocolError, match="nested too deeply"):
        acc.feed(HELLO + b"event: error\ndata: " + DEEP.encode() + b"\n\n")


def test_json_nested_deeper_than_the_json_module_parses_is_invalid_json() -> None:
    """Without orjson (an optional extra) the json module parses, and it recurses once per
    level: a chunk nested deeper than that is refused as invalid JSON."""
    acc = ChatAccumulator(json_loads=json.loads)
    deep = '{"x":' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(RemoteProtocolError, match="invalid JSON") as info:
        acc.feed(HELLO + event(deep))
    assert ["Hello"] == [chunk.text for chunk in info.value.chunks]
    # An error event's payload that cannot be parsed is reported as its text, as ever.
    with pytest.raises(StreamError, match=r"reported an error in the stream: \{\"x\":\[\[\["):
        ChatAccumulator(json_loads=json.loads).feed(
            b"event: error\ndata: " + deep.encode() + b"\n\n"
        )


def test_a_resumed_stream_replaying_a_deep_event_is_no_recursion_error() -> None:
    """A resume compares the first replayed event's id with json, which recurses: an event
    too deep for it is no chunk to compare, and a replay is dropped as any other."""
    exchange = Exchange(
        url="http://127.0.0.1:1/v1/chat/completions",
        api_key="k",
        body={"model": "m", "messages": [], "stream": True},
        timeouts=holysheep.Timeouts(),
        request_id="r",
    )
    exchange.track_event_ids(skip=frozenset({"1"}), expect_id="chatcmpl-A")
    exchange.start(0.0)
    exchange.on_headers(200, {"content-type": "text/event-stream"}, 0.1)
    deep = '{"error":' + "[" * 100_000 + "]" * 100_000 + "}"
    assert [] == exchange.on_data(b"id: 1\ndata: " + deep.encode() + b"\n\n", 0.2)


@recursing
def test_a_client_shows_what_came_before_a_chunk_nested_too_deep() -> None:
    """End to end: the client raises RemoteProtocolError after handing over the chunk that
    came in the same read, and the completion holds exactly what was shown."""
    body = HELLO + event(_call(DEEP)) + b"data: [DONE]\n\n"
    client = holysheep.Client(
        api_key="k",
        base_url="http://h/v1",
        transport=MockTransport(lambda request: MockResponse(chunks=[body])),
        retry=RetryPolicy.none(),
    )
    shown = []
    with (
        client,
        client.chat.stream(model="m", messages=[]) as stream,
        pytest.raises(RemoteProtocolError, match="nested too deeply") as info,
    ):
        shown.extend(chunk.text for chunk in stream)  # keeps what came before the error
    assert info.value.completion is not None
    assert "Hello" == "".join(shown) == info.value.completion.text == stream.completion.text


def test_an_error_payload_with_a_deep_message_still_reports_shallow_errors() -> None:
    """The guard changes nothing for an ordinary in-band error."""
    acc = ChatAccumulator()
    with pytest.raises(StreamError, match="overloaded"):
        acc.feed(event({"error": {"message": "overloaded", "code": [[1]]}}))


# -- a limit met in the middle of a read -------------------------------------------------------


def delivered(
    reads: list[bytes], make: Any = ChatAccumulator, **limits: int
) -> tuple[list[str], str, str | None]:
    """What a caller gets from `reads`: the text of each chunk, returned or carried by the
    error, the completion's text, and the error's message."""
    acc = make(decoder=holysheep.SSEDecoder(**limits), require_end=False)
    texts: list[str] = []
    try:
        for data in reads:
            texts += [chunk.text for chunk in acc.feed(data)]
    except RemoteProtocolError as exc:
        texts += [chunk.text for chunk in exc.chunks]
        return texts, acc.completion.text, str(exc)
    return texts, acc.completion.text, None


def content(text: str) -> bytes:
    return event({"choices": [choice(text)]})


class Subclass(ChatAccumulator):
    """Takes the Python path of `feed` (the C part handles only `ChatAccumulator` itself)."""


@pytest.mark.parametrize("make", [ChatAccumulator, Subclass])
@pytest.mark.parametrize(
    ("bad", "limits"),
    [
        (b"data: " + b"x" * 200 + b"\n\n", {"max_line_size": 100}),
        (b"data: " + b"x" * 200, {"max_line_size": 100}),
        (b"data: " + b"x" * 200 + b"\n\n", {"max_event_size": 100}),
    ],
    ids=["long line", "long unfinished line", "large event"],
)
def test_the_chunks_before_a_limit_do_not_depend_on_the_cut(
    bad: bytes, limits: dict[str, int], make: Any
) -> None:
    """The chunks before an event over a limit reach the caller whether they came in the
    same read as it or in an earlier one (in one read they come on `exc.chunks`)."""
    good = content("Hello") + content(" world")
    expected = delivered([good, bad], make, **limits)
    assert (["Hello", " world"], "Hello world") == expected[:2]
    assert expected[2] is not None
    assert expected == delivered([good + bad], make, **limits)
    assert expected[:2] == delivered([good[:9], good[9:] + bad], make, **limits)[:2]


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=20).map(content),  # 51 bytes and more: the limit is 100
            st.integers(1, 200).map(lambda n: b"data: " + b"x" * n + b"\n\n"),
            st.sampled_from([b": keep-alive\n\n", b"data: \n\n", b"event: ping\ndata: {}\n\n"]),
        ),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.integers(0, 400), max_size=6),
    st.sampled_from(["max_line_size", "max_event_size"]),
)
def test_chunks_and_limits_give_the_same_outcome_however_the_stream_is_split(
    events: list[bytes], cuts: list[int], limit: str
) -> None:
    """Any stream of chunks and of events over a limit: whatever the reads, the caller gets
    the same chunks, the same completion and the same kind of outcome."""
    stream = b"".join(events).replace(b"xxx", "é".encode())
    whole = delivered([stream], **{limit: 100})
    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    split = delivered([stream[a:b] for a, b in itertools.pairwise(bounds)], **{limit: 100})
    assert whole[:2] == split[:2]
    assert (whole[2] is None) == (split[2] is None)


@pytest.mark.parametrize("track_ids", [False, True], ids=["plain", "resumed"])
def test_a_client_exchange_hands_over_the_chunks_before_a_limit(track_ids: bool) -> None:
    """The clients' exchange hands over the chunks the read completed before the event over
    a limit, then raises, on a first stream and on a resumed one (which tracks event ids)."""
    exchange = Exchange(
        url="http://127.0.0.1:1/v1/chat/completions",
        api_key="k",
        body={"model": "m", "messages": [], "stream": True},
        timeouts=holysheep.Timeouts(),
        request_id="r",
    )
    if track_ids:
        exchange.track_event_ids(skip=frozenset({"0"}))
    exchange.accumulator.decoder = holysheep.SSEDecoder(max_line_size=100)
    exchange.start(0.0)
    exchange.on_headers(200, {"content-type": "text/event-stream"}, 0.1)
    body = b"id: 1\n" + content("Hello") + b"data: " + b"x" * 200 + b"\n\n"
    assert ["Hello"] == [chunk.text for chunk in exchange.on_data(body, 0.2)]
    assert isinstance(exchange.failure, RemoteProtocolError)
    assert "max_line_size" in str(exchange.failure)


# -- the caller's buffers ------------------------------------------------------------------------


def reused_buffer(stream: bytes, cuts: list[int]) -> Iterator[bytearray]:
    """The reads of `stream`, each in the same bytearray, refilled as `recv_into` refills it."""
    buffer = bytearray()
    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    for start, end in itertools.pairwise(bounds):
        buffer[:] = stream[start:end]
        yield buffer
        buffer[:] = b"\xff" * len(buffer)  # what a reused buffer may hold meanwhile


@settings(max_examples=200)
@given(
    st.lists(st.text(max_size=8).map(content), min_size=1, max_size=4),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_a_buffer_the_caller_reuses_changes_nothing(chunks: list[bytes], cuts: list[int]) -> None:
    """A bytearray filled again after each read gives what bytes give: the decoder and the
    accumulator keep copies, never the caller's buffer."""
    stream = b"".join(chunks).replace(b"\n\n", b"\r\n\r\n", 1)
    expected = holysheep.SSEDecoder().feed(stream)
    decoder = holysheep.SSEDecoder()
    assert expected == [e for read in reused_buffer(stream, cuts) for e in decoder.feed(read)]
    acc = ChatAccumulator()
    texts = [chunk.text for read in reused_buffer(stream, cuts) for chunk in acc.feed(read)]
    assert [chunk.text for chunk in ChatAccumulator().feed(stream)] == texts


@pytest.mark.parametrize(
    "wrap", [bytearray, memoryview, lambda data: memoryview(bytearray(data))[0:]]
)
def test_any_bytes_like_read_is_taken(wrap: Any) -> None:
    """A memoryview, or a bytearray, is a read like bytes, for the decoder and the chat layer,
    a byte order mark split across reads included."""
    decoder = holysheep.SSEDecoder()
    assert [] == decoder.feed(wrap(b"\xef\xbb"))
    assert [] == decoder.feed(wrap(b"\xbfdata: hel"))
    assert [_sse.ServerSentEvent(data="hello")] == decoder.feed(wrap(b"lo\n\n"))
    acc = ChatAccumulator()
    assert ["Hello"] == [chunk.text for chunk in acc.feed(wrap(HELLO))]


@pytest.mark.parametrize("read", ["data: x\n\n", 5, None, [1]])
def test_a_read_that_is_no_bytes_is_a_type_error(read: Any) -> None:
    """A str (text, not bytes) or anything else is refused, saying what `feed` takes; an int
    is not taken as a count of zero bytes, as `bytes(5)` would."""
    with pytest.raises(TypeError, match=r"feed\(\) takes bytes \(or a bytes-like object\)"):
        holysheep.SSEDecoder().feed(read)
    with pytest.raises(TypeError, match=r"feed\(\) takes bytes"):
        ChatAccumulator().feed(read)
