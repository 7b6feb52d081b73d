"""The C part of `ChatAccumulator.feed` (`chat_chunk` in _speedups.c) must do exactly what the
Python path does: same chunks, same state, same errors, for any event, valid or not. It makes
the chunks of a plain stream (the role chunk, content, the finish chunk, the usage chunk);
anything else it leaves to Python."""

from __future__ import annotations

import gc
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
from _deep import DEEP, recursing
from hypothesis import given, settings
from hypothesis import strategies as st

from holysheep import _chat
from holysheep._chat import ChatAccumulator, ChatChunk, ContentDelta, Finished, UsageReport
from holysheep._exceptions import HolySheepError
from holysheep._sse import ServerSentEvent

FAST = None if _chat._c_feed is None else _chat._speedups.chat_chunk
pytestmark = pytest.mark.skipif(FAST is None, reason="the C part is not built (or turned off)")

ROLE = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
BASE = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1764000000,
    "model": "gpt-4.1",
    "system_fingerprint": "fp_1",
}


def event_bytes(data: str) -> bytes:
    """`data` as one SSE event: a line per line of it (a JSON text may span lines)."""
    return "".join(f"data: {line}\n" for line in data.split("\n")).encode() + b"\n"


def content(text: str, **delta: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text, **delta}, "logprobs": None}
    return {**BASE, "choices": [choice | {"finish_reason": None}]}


def finish(reason: Any) -> dict[str, Any]:
    """The finish chunk, as OpenAI sends it with `include_usage`."""
    choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
    return {**BASE, "choices": [choice], "usage": None}


def usage(counts: Any) -> dict[str, Any]:
    """The usage chunk: no choices."""
    return {**BASE, "choices": [], "usage": counts}


# What OpenAI's API reports, details and all.
OPENAI_USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 5,
    "total_tokens": 14,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def state(acc: ChatAccumulator) -> tuple[Any, ...]:
    """Everything `_chunk` may change, read without changing it (`completion` joins the text).
    `repr` tells True from 1 and 1.0 and shows key order, which `==` does not; `Usage.raw` is
    not part of a `Usage`'s equality or repr."""
    choice = acc._choice0
    return (
        acc.chunk_count,
        acc._first_data,
        acc._last_data,
        acc.done,
        None
        if choice is None
        else (type(choice), [*choice.text], choice.blocks, choice.role, choice.finish_reason),
        acc._choices,
        repr(acc._usage),
        None if acc._usage is None else repr(acc._usage.raw),
    )


def seen(chunk: ChatChunk | None) -> Any:
    """A chunk as these tests compare it: its class, values and their types, usage's raw dict."""
    if chunk is None:
        return None
    raws = [repr(delta.usage.raw) for delta in chunk.deltas if isinstance(delta, UsageReport)]
    return type(chunk), chunk.text, repr(chunk.deltas), raws, type(chunk.raw), dict(chunk.raw)


@pytest.fixture
def accumulator() -> ChatAccumulator:
    acc = ChatAccumulator()
    acc.feed(event_bytes(json.dumps(ROLE)))  # choice 0 is known from here on
    return acc


def fast(acc: ChatAccumulator, data: str) -> Any:
    assert FAST is not None
    return FAST(acc, ServerSentEvent(data=data))


# -- what the C part takes, and what it leaves ------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        json.dumps(content("Hello")),
        json.dumps(content("naïve 羊 🐑", refusal=None), ensure_ascii=False),
        json.dumps(content('naïve 羊 🐑\n\t"q" \\ /')),  # \u escapes, pairs and short ones
        json.dumps(content("x", role="assistant", reasoning_content=None, tool_calls=None)),
        json.dumps({"choices": [{"delta": {"content": "no index"}}], "usage": None}),
        json.dumps(content("spaced"), indent=2),
        '{"choices":[{"index":0,"delta":{"content":"n"},"x":[1,-2.5,3e+10,true,false,{}]}]}',
    ],
)
def test_the_common_chunk_is_taken(accumulator: ChatAccumulator, data: str) -> None:
    chunk = fast(accumulator, data)
    expected = json.loads(data)["choices"][0]["delta"]["content"]
    assert (expected, (ContentDelta(expected, 0),)) == (chunk.text, chunk.deltas)
    assert json.loads(data) == dict(chunk.raw)
    assert (2, data) == (accumulator.chunk_count, accumulator._last_data)
    assert expected == accumulator.completion.text


@pytest.mark.parametrize(
    "data",
    [
        json.dumps({**content("x"), "error": None}),
        json.dumps({"choices": [{"index": 1, "delta": {"content": "x"}}]}),
        json.dumps({"choices": [{"delta": {"content": "x"}, "message": {"content": "y"}}]}),
        json.dumps({"choices": [{"delta": {"content": "x", "refusal": "no"}}]}),
        json.dumps({"choices": [{"delta": {"content": "x"}}, {"delta": {"content": "y"}}]}),
        json.dumps({"choices": [{"delta": {"content": 5}}]}),
        json.dumps({"choices": [{"delta": {"role": 5}}]}),
        json.dumps({"choices": [{"delta": None, "finish_reason": "stop"}]}),
        json.dumps({"choices": None}),
        # finish reasons that are not strings
        json.dumps(finish(1)),
        json.dumps(finish(True)),
        json.dumps(finish({"type": "stop"})),
        json.dumps(finish(["stop"])),
        '{"choices":[{"delta":{},"finish_reason":"stop","finish_reason":null}]}',
        # usage values the C part does not build, and usage that is no object
        json.dumps(usage({"prompt_tokens": 1.0})),
        json.dumps(usage({"prompt_tokens": 1, "cost": 0.25})),
        '{"choices":[],"usage":{"prompt_tokens":1e3}}',
        json.dumps(usage({"prompt_tokens": 1234567890123456})),  # 16 digits
        json.dumps(usage({"prompt_tokens": -(10**20)})),
        json.dumps(usage({"prompt_tokens": [1]})),
        json.dumps(usage({"a": {"b": {"c": {"d": {}}}}})),  # nested five deep
        '{"choices":[],"usage":{"total_tokens":1,"total_tokens":2}}',
        '{"choices":[],"usage":{"total_tokens":1,"total_\\u0074okens":2}}',
        '{"choices":[],"usage":{"total_tokens":01}}',
        '{"choices":[],"usage":{"total_tokens":"\\ud800"}}',
        '{"choices":[],"usage":{"total_tokens":1},"usage":null}',
        json.dumps(usage(5)),
        json.dumps(usage("x")),
        json.dumps(usage([])),
        json.dumps(usage(True)),
        '{"choices":[{"index":0,"delta":{"content":"x","content":"y"}}]}',  # a key given twice
        '{"choices":[{"index":0,"delta":{"content":"x"}}],"choices":[]}',
        '{"choices":[{"index":-0,"delta":{"content":"x"}}]}',
        '{"choices":[{"index":0.0,"delta":{"content":"x"}}]}',
        '{"choices":[{"delta":{"content":"\\ud83d"}}]}',  # a lone surrogate: json takes it
        '{"choices":[{"delta":{"content":"x"}}],"n":1e400}',  # orjson refuses it
        '{"choices":[{"delta":{"content":"x"}}],"n":123456789012345678901}',  # parsers differ
        '{"choices":[{"delta":{"content":"x"}}],"n":[' * 70 + "]" * 70 + "}",
        '{"cho\\u0069ces":[{"delta":{"content":"x"}}]}',  # an escaped key
        '{"choices":[{"delta":{"content":"x"}}]} trailing',
        '{"choices":[{"delta":{"content":"x"}}],}',
        '{"choices":[{"delta":{"content":"a\x01"}}]}',
        "[DONE]",
        "",
    ],
)
def test_anything_else_is_left_untouched(accumulator: ChatAccumulator, data: str) -> None:
    before = state(accumulator), accumulator.completion
    assert fast(accumulator, data) is None
    assert before == (state(accumulator), accumulator.completion)


@pytest.mark.parametrize("role_first", [True, False])
@pytest.mark.parametrize(
    "data",
    [
        json.dumps(ROLE),
        json.dumps({**content("", role="assistant", refusal=None), "usage": None}),
        json.dumps(content("")),  # nothing to add
        json.dumps(content("x", role="")),
        json.dumps({"choices": [{"delta": {"role": "assistant"}}]}),
        json.dumps({"choices": [{"delta": {"content": None, "role": None}}]}),
        json.dumps({"choices": [{"index": 0}]}),  # no delta
        json.dumps({"choices": []}),
        json.dumps(BASE),  # no choices at all
        json.dumps(finish("stop")),
        json.dumps(finish("length")),
        json.dumps(finish("")),  # no reason: nothing finishes
        json.dumps(finish(None)),
        json.dumps(finish('not one we know, "é" 🐑')),
        json.dumps(finish('not one we know, "é" 🐑'), ensure_ascii=False),
        json.dumps(finish("stop"), indent=2),
        json.dumps(
            {"choices": [{"delta": {"content": "x", "role": "r"}, "finish_reason": "stop"}]}
        ),
        json.dumps({**finish("stop"), "usage": {"total_tokens": 1}}),
        json.dumps({**content("x"), "usage": {"total_tokens": 1}}),
        json.dumps(usage(OPENAI_USAGE)),
        json.dumps(usage(OPENAI_USAGE), indent="\t", separators=(" , ", " : ")),
        json.dumps(usage({"input_tokens": 3, "output_tokens": 4})),  # Anthropic's names
        json.dumps(usage({"prompt_tokens": None, "input_tokens": 3, "output_tokens": 4})),
        json.dumps(usage({"prompt_tokens": 3, "completion_tokens": None, "total_tokens": None})),
        json.dumps(usage({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": None})),
        json.dumps(usage({"prompt_tokens": True, "completion_tokens": 2})),  # bools: no counts
        json.dumps(usage({"prompt_tokens": False, "completion_tokens": True, "total_tokens": 0})),
        json.dumps(usage({"prompt_tokens": -1, "completion_tokens": 0})),
        json.dumps(usage({"prompt_tokens": 999999999999999, "completion_tokens": 999999999999999})),
        json.dumps(usage({"prompt_tokens": -99999999999999, "total_tokens": "14"})),
        json.dumps(usage({"prompt_tokens": "9", "completion_tokens": "x\u00e9\n"})),
        '{"choices":[],"usage":{"prompt_tokens":-0,"completion_tokens":0}}',
        '{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"pr\\u006fmpt":3}}',
        json.dumps(usage({"details": {"a": {"b": {}}}, "total_tokens": 2})),  # four deep
        json.dumps(usage({})),  # no usage to Python: it is falsy
        json.dumps(usage(None)),
    ],
)
def test_the_other_chunks_of_a_plain_stream_are_taken(data: str, role_first: bool) -> None:
    """The role, finish and usage chunks (and what they may carry), first or not: made by
    C, the same chunk and state as Python's `feed_event` makes."""
    ours, reference = ChatAccumulator(), ChatAccumulator()
    if role_first:
        for acc in (ours, reference):
            acc.feed_event(ServerSentEvent(data=json.dumps(ROLE)))
    chunk = fast(ours, data)
    assert chunk is not None
    assert (seen(reference.feed_event(ServerSentEvent(data=data))), state(reference)) == (
        seen(chunk),
        state(ours),
    )


def test_a_plain_stream_goes_to_python_only_for_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """The events of the local upstream's stream with `include_usage` (and OpenAI's usage,
    with its details) are all made in C but `[DONE]`, and end as Python ends them."""
    from holysheep.testing._server import _events, _Planned

    to_python: list[str] = []
    feed_event = ChatAccumulator.feed_event

    def recorded(self: ChatAccumulator, event: ServerSentEvent) -> ChatChunk | None:
        to_python.append(event.data)
        return feed_event(self, event)

    base = {"id": "chatcmpl-1", "created": 1764000000, "model": "m", "system_fingerprint": "fp"}
    plan = [_Planned(["Hel", "lo", " there", ",", " sheep"], "stop")]
    counts = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    for counts_sent in (counts, OPENAI_USAGE):
        reads = [event_bytes(data.decode()) for _, data in _events(base, plan, counts_sent)]
        reads.append(b"data: [DONE]\n\n")
        assert 9 == len(reads)
        assert_same_as_python(reads)
        to_python.clear()
        acc = ChatAccumulator()
        with monkeypatch.context() as patch:
            patch.setattr(ChatAccumulator, "feed_event", recorded)
            for data in reads:
                acc.feed(data)
        acc.close()
        completion = acc.completion
        assert (["[DONE]"], "Hello there, sheep", "stop", "assistant", 14, counts_sent) == (
            to_python,
            completion.text,
            completion.finish_reason,
            completion.role,
            completion.usage and completion.usage.total_tokens,
            completion.usage and completion.usage.raw,
        )


def test_only_a_plain_open_accumulator_is_handled() -> None:
    data = json.dumps(content("x"))

    class Mine(ChatAccumulator):
        pass

    for acc in (Mine(), ChatAccumulator(json_loads=json.loads)):
        acc.feed(event_bytes(json.dumps(ROLE)))
        assert fast(acc, data) is None
    closed = ChatAccumulator(require_end=False)
    closed.feed(event_bytes(json.dumps(ROLE)))
    closed.close()
    assert fast(closed, data) is None
    typed = ChatAccumulator()
    typed.feed(event_bytes(json.dumps(ROLE)))
    assert FAST is not None
    assert FAST(typed, ServerSentEvent("ping", data)) is None


# -- the same as Python, for anything ----------------------------------------------------------

_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), _text)
_ABSENT = object()


def _often(common: Any, *others: Any) -> st.SearchStrategy[Any]:
    """The common value most of the time, so that most events are the common chunk, and
    every other now and then."""
    return st.sampled_from([common] * 24 + list(others))


@st.composite
def _chunk(draw: st.DrawFn) -> dict[str, Any]:
    """A common content chunk, with now and then something that makes it another."""
    delta: dict[str, Any] = {
        "content": draw(st.one_of(_text.filter(bool), _often("x", "", None, 3))),
        "role": draw(_often(_ABSENT, "assistant", "model", None, "")),
        "refusal": draw(_often(_ABSENT, None, "no")),
        "reasoning_content": draw(_often(_ABSENT, None, "hmm")),
        "tool_calls": draw(_often(_ABSENT, None)),
    }
    choice = {
        "index": draw(_often(0, _ABSENT, 1, None, "0", False)),
        "delta": {k: v for k, v in delta.items() if v is not _ABSENT},
        "logprobs": draw(st.one_of(_often(None), st.dictionaries(_text, _scalar, max_size=2))),
        "finish_reason": draw(_often(None, _ABSENT, "stop", "")),
        "message": draw(_often(_ABSENT, {"content": "m"})),
    }
    choices = draw(_often([choice], [], [choice, choice], [choice, None], [choice, 5]))
    obj = {
        **draw(_often(BASE, {})),
        "choices": [
            {k: v for k, v in c.items() if v is not _ABSENT} if isinstance(c, dict) else c
            for c in choices
        ],
        "usage": draw(_often(_ABSENT, None, {"total_tokens": 3})),
        "error": draw(_often(_ABSENT, None, {"message": "boom"})),
        "extra": draw(
            st.one_of(
                _often(_ABSENT, 1764000000, -2.5, "fp_1", [True, False, {}]),
                st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3), max_leaves=6),
                st.floats(allow_nan=False, allow_infinity=False),
            )
        ),
    }
    return {k: v for k, v in obj.items() if v is not _ABSENT}


_count = st.one_of(
    st.integers(0, 10**6),
    st.integers(-(10**16), 10**16),  # 15 digits and under C builds, over them Python
    st.integers(-(10**20), 10**20),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    _text,
)
_usage_key = st.one_of(
    st.sampled_from(
        ["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens"]
    ),
    _text,
)
_any_usage = st.dictionaries(
    _usage_key,
    st.recursive(
        _count,
        lambda inner: st.one_of(
            st.dictionaries(_usage_key, inner, max_size=3), st.lists(inner, max_size=2)
        ),
        max_leaves=8,
    ),
    max_size=6,
)
_plain_usage = st.fixed_dictionaries(
    {
        "prompt_tokens": st.integers(0, 10**6),
        "completion_tokens": st.integers(0, 10**6),
        "total_tokens": st.integers(0, 2 * 10**6),
    },
    optional={
        "prompt_tokens_details": st.dictionaries(_usage_key, st.integers(0, 9), max_size=2),
        "completion_tokens_details": st.dictionaries(_usage_key, st.integers(0, 9), max_size=4),
    },
)


@st.composite
def _end_chunk(draw: st.DrawFn) -> dict[str, Any]:
    """The other chunks of a plain stream (the role chunk, the finish chunk, the usage chunk),
    with now and then something that makes them another."""
    kind = draw(st.sampled_from(["role", "finish", "usage"]))
    delta: dict[str, Any] = {}
    finish_reason: Any = None
    if kind == "role":
        delta = {
            "role": draw(_often("assistant", "", None, 5, "model", _ABSENT)),
            "content": draw(_often("", None, _ABSENT, "x", 0)),
            "refusal": draw(_often(None, _ABSENT, "no")),
        }
    elif kind == "finish":
        delta = draw(_often({}, _ABSENT, {"content": None}, {"content": "x"}))
        finish_reason = draw(
            st.one_of(
                _often("stop", "length", "tool_calls", "", None, 1, True, {}, ["stop"]),
                _text,
            )
        )
    if delta is not _ABSENT:
        delta = {k: v for k, v in delta.items() if v is not _ABSENT}
    choice = {
        "index": draw(_often(0, _ABSENT, 1)),
        "delta": delta,
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    choice = {k: v for k, v in choice.items() if v is not _ABSENT}
    if kind == "usage":
        choices = draw(_often([], _ABSENT, [choice]))
        counts = draw(
            st.one_of(_plain_usage, _any_usage, _often(OPENAI_USAGE, {}, None, 5, [], "x"))
        )
    else:
        choices = [choice]
        counts = draw(_often(None, _ABSENT, {"total_tokens": 3}))
    obj = {**draw(_often(BASE, {})), "choices": choices, "usage": counts}
    return {k: v for k, v in obj.items() if v is not _ABSENT}


@st.composite
def _event_data(draw: st.DrawFn, chunks: st.SearchStrategy[dict[str, Any]] | None = None) -> str:
    obj = draw(chunks if chunks is not None else st.one_of(_chunk(), _end_chunk()))
    text = json.dumps(
        obj,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, None, 1])),
        separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])),
    )
    edit = draw(_often("none", "cut", "insert", "duplicate"))
    if edit == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == "insert":
        at = draw(st.integers(0, len(text)))
        text = (
            text[:at]
            + draw(st.sampled_from([",", "}", '"', "\\", "1e999", " ", "\x00"]))
            + text[at:]
        )
    elif edit == "duplicate":
        text = text[:-1] + ',"choices":[]}'
    return text.replace("\r", "")


def outcome(reads: list[bytes], c_feed: bool) -> Iterator[Any]:
    """What feeding `reads` gives, with or without the C part: chunks or the error, and the
    accumulator's state after each read and at the end."""
    saved = _chat._c_feed
    _chat._c_feed = saved if c_feed else None
    try:
        acc = ChatAccumulator(require_end=False)
        for data in reads:
            try:
                chunks = acc.feed(data)
            except HolySheepError as exc:
                yield type(exc).__name__, str(exc), [seen(c) for c in exc.chunks], state(acc)
                break
            yield [seen(c) for c in chunks], state(acc)
        choice0 = acc._choice0  # before `completion`, which joins the text
        yield None if choice0 is None else ([*choice0.text], choice0.blocks, choice0.role)
        yield acc.completion, acc.chunk_count, acc.usage, acc.done, acc.finished
        yield acc._first_data, acc._last_data
    finally:
        _chat._c_feed = saved


def assert_same_as_python(reads: list[bytes]) -> None:
    assert [*outcome(reads, c_feed=False)] == [*outcome(reads, c_feed=True)]


@settings(max_examples=400)
@given(
    st.lists(_event_data(), min_size=1, max_size=6),
    _often(True, False),
    st.sampled_from(["\n", "\r\n"]),
    st.lists(st.integers(0, 2000), max_size=6),
)
def test_any_events_give_what_python_gives(
    datas: list[str], role_first: bool, newline: str, cuts: list[int]
) -> None:
    """Any chunks, with LF or CRLF line ends, in reads cut anywhere (a CR ending one read and
    its LF starting the next included)."""
    events = [event_bytes(json.dumps(ROLE))] if role_first else []
    events += [event_bytes(data) for data in datas]
    stream = b"".join(events).replace(b"\n", newline.encode())
    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    assert_same_as_python([stream[a:b] for a, b in itertools.pairwise(bounds)])


def test_events_without_a_chunk_between_chunks_of_one_read_give_what_python_gives() -> None:
    """Keep-alives and other event types among the chunks of one read, and an error after
    them: the same chunks, returned or carried by the error (`HolySheepError.chunks`)."""
    keepalive, ping = b"data: \n\n", b"event: ping\ndata: {}\n\n"
    first = event_bytes(json.dumps(ROLE))
    read = b"".join(
        [
            keepalive,
            event_bytes(json.dumps(content("a"))),
            ping,
            keepalive,
            event_bytes(json.dumps(content("b"))),
            keepalive,
        ]
    )
    assert_same_as_python([first, read, read])

    def carried(c_feed: bool) -> tuple[list[tuple[str, Any]], str]:
        saved = _chat._c_feed
        _chat._c_feed = saved if c_feed else None
        acc = ChatAccumulator()
        try:
            acc.feed(first)
            acc.feed(read + b'data: {"error": {"message": "boom"}}\n\n')
        except HolySheepError as exc:
            return [(chunk.text, chunk.deltas) for chunk in exc.chunks], str(exc)
        finally:
            _chat._c_feed = saved
        raise AssertionError("no error")

    assert carried(c_feed=False) == carried(c_feed=True)
    assert ["a", "b"] == [text for text, _ in carried(c_feed=True)[0]]


def decoder_state(acc: ChatAccumulator) -> tuple[Any, ...]:
    d = acc.decoder
    return (
        d._at_start,
        d._special,
        d._skip_lf,
        d.closed,
        [*d._pending],
        d._pending_size,
        [*d._data],
        d.last_event_id,
    )


@pytest.mark.parametrize(
    "reads",
    [
        [event_bytes(json.dumps(ROLE))],
        [b"\xef\xbb\xbf" + event_bytes(json.dumps(ROLE))],  # a byte order mark, whole
        [b"\xef", b"\xbb\xbf" + event_bytes(json.dumps(ROLE))],  # split
        [b"\xef\xbb\xbf", event_bytes(json.dumps(ROLE))],  # alone
        [b"\xef\xbb" + event_bytes(json.dumps(ROLE))],  # no mark: its first two bytes
        [b"data", b": {}\n\n"],  # the first read holds no line end
        [b"\r", b"\ndata: {}\n\n"],  # a CR ending the first read
        [b"\n", event_bytes(json.dumps(ROLE))],
        [b": hi\n\n", event_bytes(json.dumps(ROLE))],
    ],
)
def test_the_first_reads_of_a_stream_give_what_python_gives(reads: list[bytes]) -> None:
    """The same chunks and the same decoder state after each read: the C part takes the first
    read of a stream itself unless it may hold (part of) a byte order mark."""

    def run(c_feed: bool) -> list[Any]:
        saved = _chat._c_feed
        _chat._c_feed = saved if c_feed else None
        try:
            acc = ChatAccumulator(require_end=False)
            return [([seen(c) for c in acc.feed(data)], decoder_state(acc)) for data in reads]
        finally:
            _chat._c_feed = saved

    assert run(c_feed=False) == run(c_feed=True)


def test_the_first_read_of_a_plain_stream_skips_the_python_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`SSEDecoder.feed` runs for no read of a plain stream, the first included (through it,
    the first read cost three Python calls per stream to look for a byte order mark); it
    still runs for one that may start with a mark, and for a closed decoder, which raises."""
    from holysheep._exceptions import LocalProtocolError
    from holysheep._sse import SSEDecoder

    called: list[bytes] = []
    feed = SSEDecoder.feed

    def recorded(self: SSEDecoder, data: bytes) -> list[ServerSentEvent]:
        called.append(data)
        return feed(self, data)

    monkeypatch.setattr(SSEDecoder, "feed", recorded)
    acc = ChatAccumulator()
    assert [] == acc.feed(b"\n")  # nothing but a blank line: all taken in C, at the start
    assert "Hello" == acc.feed(event_bytes(json.dumps(content("Hello"))))[0].text
    assert [] == called
    marked = ChatAccumulator()
    assert "Hi" == marked.feed(b"\xef\xbb\xbf" + event_bytes(json.dumps(content("Hi"))))[0].text
    assert 1 == len(called)
    closed = ChatAccumulator(require_end=False)
    closed.decoder.close()
    with pytest.raises(LocalProtocolError):
        closed.feed(event_bytes(json.dumps(content("x"))))
    assert 2 == len(called)


def test_a_crlf_split_across_reads_is_one_line_end() -> None:
    reads = [
        event_bytes(json.dumps(ROLE)),
        b'data: {"choices":[{"delta":\r',
        b'\ndata: {"content":"x"}}]}\r\n\r\n',
    ]
    assert_same_as_python(reads)
    chunks, _ = [*outcome(reads, c_feed=True)][2]
    expected = ("x", repr((ContentDelta("x"),)), {"choices": [{"delta": {"content": "x"}}]})
    assert [expected] == [(text, deltas, raw) for _, text, deltas, _, _, raw in chunks]


def _choice(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    return event_bytes(
        json.dumps({**BASE, "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})
    )


def _call(call_id: str, arguments: str, name: str | None = None) -> dict[str, Any]:
    function = {"arguments": arguments} if name is None else {"name": name, "arguments": arguments}
    return {"tool_calls": [{"index": 0, "id": call_id, "function": function}]}


@pytest.mark.parametrize(
    ("reads", "expected"),
    [
        (  # n=2: choice 0 finishes between common chunks (which C takes) and choice 1's
            [
                _choice(0, {"role": "assistant", "content": "Ye"}) + _choice(1, {"content": "Wel"}),
                _choice(0, {"content": "s."}) + _choice(0, {}, "stop"),
                _choice(1, {"content": "l, it"}) + _choice(1, {"content": " depends"}),
                b'data: {"choices": [{"index": 1, "de',
            ],
            (False, [("Yes.", "stop", []), ("Well, it depends", None, [])]),
        ),
        (  # parallel calls at index 0, interleaved, the id on every fragment, then text
            [
                _choice(0, {"role": "assistant", "content": "Let me see."}),
                _choice(0, _call("A", '{"x":', "f")) + _choice(0, _call("B", '{"y":', "g")),
                _choice(0, _call("A", "1}")) + _choice(0, _call("B", "2}")),
                _choice(0, {"content": " Done."}) + _choice(0, {}, "tool_calls"),
            ],
            (
                True,
                [
                    (
                        "Let me see. Done.",
                        "tool_calls",
                        [("A", "f", '{"x":1}'), ("B", "g", '{"y":2}')],
                    )
                ],
            ),
        ),
    ],
    ids=["one of two choices finished", "interleaved calls at one index"],
)
def test_several_choices_and_shared_index_calls_give_what_python_gives(
    reads: list[bytes], expected: tuple[bool, list[Any]]
) -> None:
    """Finish reasons and tool calls (which C leaves to Python) between common chunks (which
    it takes): the same completion and `finished` either way, and the right ones."""
    assert_same_as_python(reads)
    completion, *_, finished = [*outcome(reads, c_feed=True)][-2]
    choices = [
        (c.text, c.finish_reason, [(t.id, t.name, t.arguments) for t in c.tool_calls])
        for c in completion.choices
    ]
    assert expected == (finished, choices)


@pytest.mark.parametrize(
    "bad",
    [
        '{"choices":[{"index":0,"delta":{"content":" world"}},5]}',
        '{"choices":[{"index":0,"delta":{"content":" world"}},null]}',
        pytest.param(
            '{"choices":[{"index":0,"delta":{"content":" world"},"finish_reason":' + DEEP + "}]}",
            marks=recursing,
        ),
        pytest.param(
            '{"choices":[{"index":0,"delta":{"content":" world","tool_calls":[{"index":0,'
            '"function":{"name":"f","arguments":' + DEEP + "}}]}}]}",
            marks=recursing,
        ),
        '{"choices":[{"index":0,"delta":{"content":" world"}},' + DEEP + "]}",
        pytest.param('{"error":{"message":' + DEEP + "}}", marks=recursing),
    ],
    ids=["a number", "null", "deep finish", "deep arguments", "deep choice", "deep error"],
)
def test_a_refused_chunk_after_common_ones_gives_what_python_gives(bad: str) -> None:
    """A chunk refused for a choice that is no object or a value nested too deep, in the read
    of common chunks (which C takes): the same error, the same chunks carried by it, and the
    accumulation as before the refused chunk, on both paths."""
    common = event_bytes(json.dumps(content("Hello")))
    reads = [event_bytes(json.dumps(ROLE)), common + event_bytes(bad) + common]
    assert_same_as_python(reads)
    name, _, carried, after = [*outcome(reads, c_feed=True)][1]
    assert ("RemoteProtocolError", ["Hello"]) == (name, [chunk[1] for chunk in carried])
    assert (2, "Hello") == (after[0], "".join(after[4][1]))


@settings(max_examples=300)
@given(
    st.lists(_event_data(_end_chunk()), min_size=1, max_size=4),
    st.lists(_event_data(_chunk()), max_size=3),
    _often(True, False),
)
def test_the_ends_of_streams_give_what_python_gives(
    ends: list[str], contents: list[str], role_first: bool
) -> None:
    """Role, finish and usage chunks, odd ones among them (numbers of every kind, bools,
    strings, nested details, finish reasons of any text or type, escapes, whitespace), after
    some content, one read each: the same chunks, and the same state after every one."""
    datas = [json.dumps(ROLE)] if role_first else []
    reads = [event_bytes(data) for data in [*datas, *contents, *ends]]
    assert_same_as_python(reads)


@settings(max_examples=200)
@given(st.lists(st.text(max_size=40).map(lambda t: t.replace("\r", "")), min_size=1, max_size=4))
def test_any_text_gives_what_python_gives(datas: list[str]) -> None:
    reads = [event_bytes(json.dumps(ROLE))] + [event_bytes("{" + data) for data in datas]
    assert_same_as_python(reads)


@pytest.mark.parametrize(
    ("data", "taken"),
    [
        # 1-byte strings (ASCII and Latin-1) have a scanner loop of their own; 2- and 4-byte ones
        # the general one: the same events of each kind.
        (json.dumps(content("café ÿ\x7f µ"), ensure_ascii=False), True),
        (json.dumps(content("Ā ĀĀ"), ensure_ascii=False), True),
        (json.dumps(content("🐑 x"), ensure_ascii=False), True),
        (json.dumps(content('é"\\/\n\x1f'), ensure_ascii=False), True),  # escapes, 1-byte
        (json.dumps(content('Ā"\\/\n\x1f'), ensure_ascii=False), True),  # escapes, 2-byte
        ('{"choices":[{"delta":{"content":"é\x1f"}}]}', False),  # a raw control character
        ('{"choices":[{"delta":{"content":"Ā\x1f"}}]}', False),
        ('{"choices":[{"delta":{"content":"🐑\x00"}}]}', False),
        ('{"choices":[{"delta":{"content":"é', False),  # the text ends inside a string
        ('{"choices":[{"delta":{"content":"é\\', False),  # ... or inside an escape
        ('{"choices":[{"delta":{"content":"Ā', False),
        # Keys that almost match are other keys: ignored, or null where Python needs it.
        (
            '{"choices":[{"delta":{"content":"x","conten":null,"contentt":null,"Content":null}}]}',
            True,
        ),
        ('{"choices":[{"delta":{"content":"x","conten":"y"}}]}', False),
        ('{"choices":[{"delta":{"contenÿ":"y","content":"x"}}]}', False),
        ('{"choices":[{"delta":{"contenĀ":"y","content":"x"}}]}', False),
        ('{"choices":[{"delta":{"content":"x"},"indexx":1,"inde":"s"}],"choice":1,"usag":2}', True),
        ('{"choices":[{"delta":{"content":"x"}}],"usage ":{"total_tokens":1}}', True),
        ('{"choices":[{"delta":{"content":"x"}}],"usagĀ":1}', True),
        # Whitespace: each of the four JSON allows, anywhere between tokens.
        ('{ "choices" :\t[\n{ "delta" :{"content" : "w" } ,"index":0 }\r\n] }', True),
        ('{"choices":[{"delta":{"content":"Ā"}}]}\n ', True),
        (' {"choices":[{"delta":{"content":"x"}}]}', False),  # left to Python, which takes it
        ('{"choices":[{"delta":{"content":"x"}}]\x0b}', False),  # a vertical tab is not one
        ('{"choices":[{"delta":{"content":"x"}}]\xa0}', False),  # nor a no-break space
    ],
)
def test_scanner_edges_give_what_python_gives(data: str, taken: bool) -> None:
    """Each kind of string, escapes, near-miss keys and whitespace: taken by C where it can
    be, and always the same chunks and state as Python's."""
    acc = ChatAccumulator(require_end=False)
    acc.feed(event_bytes(json.dumps(ROLE)))
    assert taken == (fast(acc, data) is not None)
    assert_same_as_python([event_bytes(json.dumps(ROLE)), *[event_bytes(data)] * 2])


# Any 1-byte character, the edges of what ends a run of plain characters often.
_latin1 = st.text(
    st.one_of(st.characters(max_codepoint=0xFF), st.sampled_from('\x00\x1f "\\\x7f\x80\xff')),
    max_size=12,
)


def _raw(text: str) -> str:
    """`text` as a JSON string with only quotes and backslashes escaped: control characters
    stay raw, which JSON forbids."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@settings(max_examples=300)
@given(st.lists(st.tuples(_latin1, _latin1, st.booleans()), min_size=1, max_size=4))
def test_any_latin1_text_gives_what_python_gives(items: list[tuple[str, str, bool]]) -> None:
    """1-byte strings (ASCII and Latin-1) have a scanner loop of their own: any such content
    and key, escaped as JSON escapes them or raw, control characters and all."""
    datas = [
        f'{{"choices":[{{"delta":{{"content":{_raw(text)},{_raw(key)}:null}}}}]}}'
        if raw
        else json.dumps({"choices": [{"delta": {"content": text, key: None}}]}, ensure_ascii=False)
        for text, key, raw in items
    ]
    assert_same_as_python([event_bytes(json.dumps(ROLE))] + [event_bytes(d) for d in datas])


@settings(max_examples=100)
@given(st.lists(_text.filter(bool), min_size=1, max_size=40), st.integers(1, 5))
def test_long_answers_are_kept_in_blocks_as_python_keeps_them(
    texts: list[str], per_read: int
) -> None:
    """Deltas are joined in blocks as they arrive; several events per read are one C call."""
    events = [event_bytes(json.dumps(ROLE))] + [event_bytes(json.dumps(content(t))) for t in texts]
    reads = [b"".join(events[i : i + per_read]) for i in range(0, len(events), per_read)]
    assert_same_as_python(reads)


def test_setup_refuses_classes_it_would_build_wrong_and_keeps_what_it_had(
    accumulator: ChatAccumulator,
) -> None:
    """A class with a slot the C part would leave empty, or without one it sets, is refused,
    and the C part goes on with the classes it was given before."""
    from holysheep import _speedups

    classes = {
        "ChatAccumulator": ChatAccumulator,
        "_ChoiceState": _chat._ChoiceState,
        "ChatChunk": ChatChunk,
        "ContentDelta": ContentDelta,
        "Finished": Finished,
        "UsageReport": UsageReport,
        "Usage": _chat.Usage,
        "_ParsedLater": _chat._ParsedLater,
        "SSEDecoder": _chat.SSEDecoder,
    }

    def setup(**instead: type) -> None:
        given = {**classes, **instead}
        _speedups.setup_chat(*given.values(), HolySheepError, _chat._loads, _chat._BLOCK)

    class WiderChunk:
        __slots__ = ("deltas", "event", "raw", "text", "trace")

    class NarrowerChunk:
        __slots__ = ("deltas", "raw", "text")

    class WiderUsage:
        __slots__ = ("completion_tokens", "cost", "prompt_tokens", "raw", "total_tokens")

    class NarrowerFinished:
        __slots__ = ("reason",)

    setup()  # the classes it has: taken
    for name, wrong in [
        ("ChatChunk", WiderChunk),
        ("ChatChunk", NarrowerChunk),
        ("Usage", WiderUsage),
        ("Finished", NarrowerFinished),
    ]:
        with pytest.raises(TypeError):
            setup(**{name: wrong})
    chunk = fast(accumulator, json.dumps(content("still")))
    assert (_chat.ChatChunk, "still") == (type(chunk), chunk.text)
    chunk = fast(accumulator, json.dumps(usage({"total_tokens": 2})))
    assert (UsageReport(_chat.Usage(None, None, 2)),) == chunk.deltas


def test_a_decoder_of_the_callers_own_is_used() -> None:
    """The C loop decodes with the accumulator's decoder, whatever it returns the events in."""

    class Counting(_chat.SSEDecoder):
        reads = 0

        def feed(self, data: bytes) -> Any:
            Counting.reads += 1
            return tuple(super().feed(data))

    reads = [event_bytes(json.dumps(ROLE)), event_bytes(json.dumps(content("mine")))]
    acc = ChatAccumulator(decoder=Counting())
    texts = [chunk.text for data in reads for chunk in acc.feed(data)]
    assert (["", "mine"], 2, "mine") == (texts, Counting.reads, acc.completion.text)


def test_a_decoder_that_fails_mid_read_leaves_what_python_leaves() -> None:
    """Events a caller's decoder yields before it raises are taken, one at a time, as Python
    takes them; the error, not ours, goes on as raised, without the chunks (only a
    HolySheepError carries them)."""

    class Failing(_chat.SSEDecoder):
        def feed(self, data: bytes) -> Any:
            yield from super().feed(data)
            raise ValueError("broken")

    def run(c_feed: bool) -> tuple[int, str, bool]:
        saved = _chat._c_feed
        _chat._c_feed = saved if c_feed else None
        try:
            acc = ChatAccumulator(decoder=Failing())
            with pytest.raises(ValueError, match="broken"):
                acc.feed(event_bytes(json.dumps(ROLE)))
            with pytest.raises(ValueError, match="broken") as info:
                acc.feed(b"".join(event_bytes(json.dumps(content(t))) for t in "abc"))
            return acc.chunk_count, acc.completion.text, hasattr(info.value, "chunks")
        finally:
            _chat._c_feed = saved

    assert (4, "abc", False) == run(c_feed=True) == run(c_feed=False)


def test_the_values_of_a_chunk_that_cannot_hold_a_cycle_are_left_to_reference_counting() -> None:
    """C leaves the content and finish deltas, and their tuple, out of the garbage
    collector's lists, as CPython leaves a tuple of strings: each holds a str and an int and
    is frozen, so no cycle can run through it. (Python's own are tracked; with 10,000 open
    streams that was a fifth of the collector's time.) A usage report holds a dict, and
    stays tracked with its tuple; so does the chunk, whose `raw` parses to a dict."""
    acc = ChatAccumulator()
    role, text, end, counted = (
        fast(acc, json.dumps(data))
        for data in (ROLE, content("Hi"), finish("stop"), usage(OPENAI_USAGE))
    )
    assert None not in (role, text, end, counted)
    for chunk in (text, end):
        assert chunk is not None
        (delta,) = chunk.deltas
        assert isinstance(delta, ContentDelta | Finished)
        assert (False, False, True) == (
            gc.is_tracked(delta),
            gc.is_tracked(chunk.deltas),
            gc.is_tracked(chunk),
        )
    assert counted is not None
    assert isinstance(counted.deltas[0], UsageReport)
    assert gc.is_tracked(counted.deltas)
